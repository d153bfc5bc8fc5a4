"""Video-affinity routing, measured (issue 24): gateway replicas on this machine behind Envoy, the locust
``repeat`` scenario (several questions about each video, many videos), four set-ups and a replica killed mid-run.

    .venv/bin/python -m bench.affinity [--users 4] [--run-time 150] [--questions 4] [--videos 160]

Set-ups (fresh gateways for each, the same clips, the same load; Envoy is ``deploy/envoy`` as shipped, its
endpoints made static loopback ports):

    one        (d) one replica behind Envoy: whatever it decodes and prefills, it keeps
    rr         (a) two replicas, Envoy round robin (the shipped file with both clusters ROUND_ROBIN, no hash)
    rr-shared  (b) two replicas, round robin, the frame cache shared on the files volume
    affinity   (c) two replicas, Envoy's video-affinity ring hash (bounded load), the shared frame cache
    kill       (c), and one replica killed (SIGKILL to its process group, engine included) half-way

Measured per set-up: the frame-cache hit rate (lookups answered from memory or the shared cache, summed over
the replicas: ``framewise_frame_cache_lookups_total``), vLLM's prefix-cache hit rate (its own counters, tokens:
``vllm:prefix_cache_hits_total`` / ``vllm:prefix_cache_queries_total``), the TTFT of follow-up and of first
questions (p50/p95 over every sample, from the locust request log), failures, and the requests each replica
served (Envoy's access log). Replica i is pinned to CPU i (``one``: CPU 1); locust, Envoy and the clip server
share both CPUs. Results: ``bench/results/affinity.json`` and ``affinity.png``; bench/README.md has the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests import clips, servers  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CLIP_DIR = ROOT / ".cache" / "clips" / "affinity"
SETUPS = {  # name: (replicas, balance, shared frame cache, kill one half-way)
    "one": (1, "affinity", False, False),
    "rr": (2, "round-robin", False, False),
    "rr-shared": (2, "round-robin", True, False),
    "affinity": (2, "affinity", True, False),
    "kill": (2, "affinity", True, True),
}
LABELS = {"one": "(d) one replica", "rr": "(a) round robin", "rr-shared": "(b) round robin + shared cache",
          "affinity": "(c) affinity + shared cache", "kill": "(c) + one replica killed half-way"}
FOLLOW_UP, FIRST = "time_to_first_token [repeat next]", "time_to_first_token [repeat first]"


def video_specs(n: int) -> list[clips.ClipSpec]:
    """``n`` distinct 10 s 720p H.264 clips with the textured pattern (the decode cost of real footage; 15 fps,
    one keyframe: ~1 s to sample 8 frames here), each its own colours."""
    return [clips.ClipSpec(f"video-{k:03d}", 10, 1280, 720, 15, textured=True, variant=k + 1, preset="superfast")
            for k in range(n)]


def ensure_videos(n: int) -> list[Path]:
    CLIP_DIR.mkdir(parents=True, exist_ok=True)
    specs = [s for s in video_specs(n) if not (CLIP_DIR / s.filename).exists()]
    if specs:
        print(f"encoding {len(specs)} clips into {CLIP_DIR} ...", flush=True)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda s: clips.encode(s, CLIP_DIR / s.filename), specs))
    return [CLIP_DIR / s.filename for s in video_specs(n)]


def metrics(base_url: str) -> dict[str, float]:
    """The counters this benchmark reads, summed over their label sets (``name{result=...}`` kept apart)."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        name = key.split("{", 1)[0]
        if name == "framewise_frame_cache_lookups_total":
            name += "{" + key.split('result="', 1)[1].split('"', 1)[0] + "}"
        elif name not in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"):
            continue
        out[name] = out.get(name, 0.0) + float(value)
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def frame_hits(m: dict[str, float]) -> tuple[float, float]:
    hits = sum(v for k, v in m.items() if k.endswith(("{memory}", "{shared}")))
    return hits, hits + m.get("framewise_frame_cache_lookups_total{miss}", 0.0)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def warm_up(base_url: str, clip_url: str) -> None:
    """One question per replica before the clock starts (first-request costs are not what this measures)."""
    body = servers.chat_body("framewise", clip_url, 8, 4, stream=False)
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=300)
    r.raise_for_status()


def access_log(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            rec["t"] = datetime.fromisoformat(rec["time"].replace("Z", "+00:00")).timestamp()
            out.append(rec)
    return out


def run_setup(name: str, args, videos: list[Path], clip_server: clips.ClipServer, work: Path) -> dict:
    replicas, balance, shared, kill = SETUPS[name]
    work.mkdir(parents=True, exist_ok=True)
    files = work / "files"
    extra = ("--shared-frame-cache-mb", "2048") if shared else ()
    cpus = [[1]] if replicas == 1 else [[0], [1]]
    print(f"\n== {LABELS[name]}: starting {replicas} gateway(s) ...", flush=True)
    with ThreadPoolExecutor(replicas) as pool:
        gws = list(pool.map(lambda i: servers.framewise(
            args.model_dir, work / f"gateway-{i}", allowed_hosts=f"127.0.0.1:{clip_server.port}", cpus=cpus[i],
            files_dir=files, args=(*extra, "--enforce-eager")), range(replicas)))
    proxy = None
    try:
        for gw in gws:
            warm_up(gw.base_url, clip_server.url("warm-up.mp4"))
        proxy = servers.envoy(work / "envoy", [gw.port for gw in gws], balance=balance)
        before = [metrics(gw.base_url) for gw in gws]
        log = work / "locust.jsonl"
        prefix = work / "locust"
        cmd = [sys.executable, "-m", "loadtests.swarm", "--host", proxy.base_url, "--users", str(args.users),
               "--spawn-rate", str(args.users), "--run-time", str(args.run_time), "--out", str(prefix),
               "--tags", "repeat", "--", "--clip-base-url", clip_server.base_url,
               "--clips", ",".join(f"affinity/{p.name}" for p in videos), "--clip-order", "cycle",
               "--questions", str(args.questions), "--frames", "8", "--max-tokens", str(args.max_tokens)]
        t0 = time.time()
        locust = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "FRAMEWISE_LOCUST_LOG": str(log)},
                                  stdout=open(work / "locust.out", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
        series, stop = [], threading.Event()

        def sample() -> None:  # the counters every 2 s: hit rate over time (the kill run's recovery)
            while not stop.wait(2.0):
                row = {"t": time.time() - t0}
                for i, gw in enumerate(gws):
                    if gw.proc.poll() is None:
                        with contextlib.suppress(httpx.HTTPError):
                            row[i] = delta(metrics(gw.base_url), before[i])
                series.append(row)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        killed_at = None
        if kill:
            time.sleep(args.run_time / 2)
            killed_at = time.time()
            os.killpg(gws[1].proc.pid, signal.SIGKILL)
            print(f"   killed replica 1 (port {gws[1].port}) at {killed_at - t0:.0f} s", flush=True)
        rc = locust.wait(timeout=args.run_time + 600)
        stop.set()
        sampler.join()
        after = [delta(metrics(gw.base_url), b) if gw.proc.poll() is None else None for gw, b in zip(gws, before, strict=False)]
    finally:
        for s in [proxy, *gws]:
            if s is not None:
                s.close()
    return summarise(name, gws, after, series, log, access_log(work / "envoy" / "envoy.log"), t0, killed_at, rc)


def summarise(name, gws, after, series, log: Path, envoy_log: list[dict], t0: float, killed_at, rc) -> dict:
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    reqs = [r for r in recs if r["kind"] == "request" and r["name"].startswith("chat [repeat")]
    # counters: the end of the run for live replicas, the last sample before the kill for a killed one
    totals: dict[str, float] = {}
    for i, m in enumerate(after):
        if m is None:
            m = next((row[i] for row in reversed(series) if i in row), {})
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + v
    hits, lookups = frame_hits(totals)
    ports = {f"127.0.0.1:{gw.port}": i for i, gw in enumerate(gws)}
    chats = [r for r in envoy_log if r["path"] == "/v1/chat/completions"]
    out = {
        "setup": name, "label": LABELS[name], "locust_exit": rc, "questions": len(reqs),
        "failed": sum(not r["ok"] for r in reqs),
        "frame_cache_hit_rate": hits / lookups if lookups else None, "frame_cache_lookups": lookups,
        "frame_cache": {k.split("{")[1][:-1]: v for k, v in totals.items() if k.startswith("framewise_frame")},
        "prefix_cache_hit_rate": (totals.get("vllm:prefix_cache_hits_total", 0.0)
                                  / totals["vllm:prefix_cache_queries_total"])
        if totals.get("vllm:prefix_cache_queries_total") else None,
        "served_by_replica": [sum(ports.get(r["upstream"]) == i for r in chats) for i in range(len(gws))],
        "hit_rate_series": [{"t": round(row["t"], 1), **{f"replica{i}": list(frame_hits(row[i])) for i in row
                                                         if i != "t"}} for row in series],
        "ttft_series": [{"t": round(r["t"] - t0, 2), "name": r["name"], "ms": round(r["ms"], 1)}
                        for r in recs if r["kind"] == "metric" and r["name"] in (FOLLOW_UP, FIRST)],
    }
    # the replica each video was served by (Envoy's key header is the video), and how keys moved on a kill
    homes: dict[str, set[int]] = {}
    for r in chats:
        if r.get("video_key") and r["upstream"] in ports:
            homes.setdefault(r["video_key"], set()).add(ports[r["upstream"]])
    derive(out)
    out["videos"] = len(homes)
    out["videos_on_both_replicas"] = sum(len(v) > 1 for v in homes.values())
    if killed_at is not None:
        dead = f"127.0.0.1:{gws[1].port}"
        in_flight = [r for r in reqs if r["start"] < killed_at < r["end"]]
        failed = [r for r in reqs if not r["ok"]]
        on_dead = [r for r in chats if r["upstream"] == dead]
        out["kill"] = {
            "at_s": round(killed_at - t0, 1),
            "in_flight_at_kill": len(in_flight),
            "failed": len(failed),
            "failed_not_in_flight": sum(not (r["start"] < killed_at < r["end"]) for r in failed),
            "failures": sorted({r.get("code") or r.get("error", "")[:200] for r in failed}),
            "served_by_dead_after_kill": sum(r["t"] > killed_at + 1 for r in on_dead),
            "keys_moved": sum(1 for k, v in homes.items() if v == {0, 1}),
            "hit_rate_before": _rate(out["hit_rate_series"], None, killed_at - t0),
            "hit_rate_after": _rate(out["hit_rate_series"], killed_at - t0 + 10, None),
        }
    return out


def derive(r: dict) -> dict:
    """TTFT statistics of one set-up from its raw samples (``ttft_series``)."""
    for key, name in (("follow_up_ttft_ms", FOLLOW_UP), ("first_ttft_ms", FIRST)):
        v = [p["ms"] for p in r["ttft_series"] if p["name"] == name]
        r[key] = {"n": len(v), "p50": pct(v, 0.5), "p90": pct(v, 0.9), "p95": pct(v, 0.95),
                  "mean": round(sum(v) / len(v), 1) if v else None}
    return r


def _rate(series: list[dict], start: float | None, end: float | None) -> float | None:
    """The frame-cache hit rate of the lookups made between ``start`` and ``end`` (seconds since the start)."""
    def at(t: float | None, last: bool) -> tuple[float, float]:
        rows = [r for r in series if (t is None or (r["t"] <= t if last else r["t"] >= t))]
        if not rows:
            return 0.0, 0.0
        row = rows[-1] if last else rows[0]
        if t is None and not last:
            return 0.0, 0.0
        return (sum(v[0] for k, v in row.items() if k != "t"), sum(v[1] for k, v in row.items() if k != "t"))

    h0, n0 = at(start, False) if start is not None else (0.0, 0.0)
    h1, n1 = at(end, True)
    return (h1 - h0) / (n1 - n0) if n1 > n0 else None


def targets(res: dict[str, dict]) -> list[dict]:
    """Issue 24's three targets, then the same comparison with (a) on the mean and p95 (not targets: context)."""
    d, a, c = res.get("one"), res.get("rr"), res.get("affinity")
    if not (d and a and c):
        return []
    fa, fc, fd = a["follow_up_ttft_ms"], c["follow_up_ttft_ms"], d["follow_up_ttft_ms"]
    rows = [
        ("(c) frame-cache hit rate >= 95 % of (d)", c["frame_cache_hit_rate"] / d["frame_cache_hit_rate"], ">=", 0.95),
        ("(c) follow-up TTFT p50 <= 1.2x (d)", fc["p50"] / fd["p50"], "<=", 1.2),
        ("(c) follow-up TTFT p50 >= 2x better than (a)", fa["p50"] / fc["p50"], ">=", 2.0),
        ("(also) (c) follow-up TTFT mean vs (a)", fa["mean"] / fc["mean"], ">=", 2.0),
        ("(also) (c) follow-up TTFT p95 vs (a)", fa["p95"] / fc["p95"], ">=", 2.0),
    ]
    return [{"target": t, "value": round(v, 3), "met": bool(v >= x if op == ">=" else v <= x)} for t, v, op, x in rows]


def plot(res: dict[str, dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("one", "rr", "rr-shared", "affinity") if n in res]
    fig, axes = plt.subplots(1, 2 if "kill" in res else 1, figsize=(13 if "kill" in res else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [res[n]["follow_up_ttft_ms"]["p50"] for n in names], 0.4, label="follow-up TTFT p50")
    ax.bar([i + 0.2 for i in x], [res[n]["follow_up_ttft_ms"]["p95"] for n in names], 0.4, label="follow-up TTFT p95")
    ax.set_xticks(list(x), [LABELS[n].replace(" + ", "\n+ ") for n in names], fontsize=8)
    ax.set_ylabel("ms")
    ax2 = ax.twinx()
    ax2.plot(list(x), [100 * res[n]["frame_cache_hit_rate"] for n in names], "ko-", label="frame-cache hit rate")
    ax2.set_ylim(0, 100)
    ax2.set_ylabel("frame-cache hit rate, %")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    ax.set_title("follow-up questions about a video: two replicas behind Envoy")
    if "kill" in res:
        k = res["kill"]
        ax = axes[0][1]
        pts = [(p["t"], p["ms"]) for p in k["ttft_series"] if p["name"] == FOLLOW_UP]
        ax.plot([t for t, _ in pts], [ms for _, ms in pts], ".", ms=3, label="follow-up TTFT")
        ax.set_ylabel("ms")
        ax.set_xlabel("seconds since the start")
        ax.axvline(k["kill"]["at_s"], color="red", linestyle="--", label="replica 1 killed")
        ax2 = ax.twinx()
        rows = k["hit_rate_series"]
        win = []
        for a, b in zip(rows, rows[5:], strict=False):  # hit rate over a 10 s window, all live replicas
            h = sum(v[0] for kk, v in b.items() if kk != "t") - sum(v[0] for kk, v in a.items() if kk != "t" and kk in b)
            n = sum(v[1] for kk, v in b.items() if kk != "t") - sum(v[1] for kk, v in a.items() if kk != "t" and kk in b)
            if n > 0:
                win.append((b["t"], 100 * h / n))
        ax2.plot([t for t, _ in win], [v for _, v in win], "k-", label="frame-cache hit rate (10 s window)")
        ax2.set_ylim(0, 100)
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="lower right", fontsize=8)
        ax.set_title("(c) with replica 1 killed half-way")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.affinity", description=__doc__.split("\n")[0])
    ap.add_argument("--setups", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--run-time", type=float, default=150.0, help="seconds of load per set-up")
    ap.add_argument("--questions", type=int, default=4, help="questions per video")
    ap.add_argument("--videos", type=int, default=160, help="distinct clips (each new until the list wraps)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--model-dir", type=Path, default=servers.DEMO_MODEL)
    ap.add_argument("--out", type=Path, default=RESULTS / "affinity.json")
    ap.add_argument("--workdir", type=Path, default=None, help="keep logs here (default: a temp dir, removed)")
    ap.add_argument("--replot", action="store_true",
                    help="no run: recompute the statistics and targets of --out from its raw samples, and plot")
    args = ap.parse_args(argv)
    if args.replot:
        doc = json.loads(args.out.read_text())
        res = {r["setup"]: derive(r) for r in doc["setups"]}
        doc["targets"] = targets(res)
        args.out.write_text(json.dumps(doc, indent=1))
        plot(res, args.out.with_suffix(".png"))
        print_targets(doc)
        return 0
    if not (args.model_dir / "config.json").is_file():
        print(f"no checkpoint at {args.model_dir}; run `make demo-model`", file=sys.stderr)
        return 2
    videos = ensure_videos(args.videos)
    warm = CLIP_DIR.parent / "warm-up.mp4"
    if not warm.exists():
        clips.encode(clips.ClipSpec("warm-up", 4, 640, 360, 15, variant=999), warm)
    clip_server = clips.ClipServer(CLIP_DIR.parent)
    res: dict[str, dict] = {}
    if args.out.exists():  # set-ups not rerun keep their last numbers
        res = {r["setup"]: r for r in json.loads(args.out.read_text())["setups"]}
    try:
        with (contextlib.nullcontext(str(args.workdir)) if args.workdir
              else tempfile.TemporaryDirectory(prefix="fw-affinity-")) as tmp:
            for name in args.setups:
                r = run_setup(name, args, videos, clip_server, Path(tmp) / name)
                res[name] = r
                print(f"   questions {r['questions']} failed {r['failed']}  frame-cache hit "
                      f"{r['frame_cache_hit_rate']:.3f}  prefix-cache hit {r['prefix_cache_hit_rate'] or 0:.3f}  "
                      f"follow-up TTFT p50 {r['follow_up_ttft_ms']['p50']:.0f} p95 {r['follow_up_ttft_ms']['p95']:.0f} ms"
                      f"  first p50 {r['first_ttft_ms']['p50']:.0f} ms  by replica {r['served_by_replica']}", flush=True)
                if "kill" in r:
                    print(f"   kill: {json.dumps(r['kill'])}", flush=True)
    finally:
        clip_server.close()
    doc = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} CPUs",
           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "targets": targets(res), "setups": [res[n] for n in SETUPS if n in res]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    plot(res, args.out.with_suffix(".png"))
    print_targets(doc)
    print(f"results: {args.out}, {args.out.with_suffix('.png')}")
    return 0


def print_targets(doc: dict) -> None:
    for r in doc["setups"]:
        f = r["follow_up_ttft_ms"]
        print(f"{r['label']:36s} follow-up TTFT p50 {f['p50']:.0f} p90 {f['p90']:.0f} p95 {f['p95']:.0f} "
              f"mean {f['mean']:.0f} ms")
    for t in doc["targets"]:
        print(f"{t['target']}: {t['value']:.2f} {'met' if t['met'] else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
