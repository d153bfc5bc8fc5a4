"""End to end: Framewise (``framewise serve``) vs vLLM's own OpenAI server on the same checkpoint.

    .venv/bin/python bench/serve_e2e.py [--quick] [--parts load,repeat,overhead,length] [--cases a,b1,...]

Both servers run the demo checkpoint (TC-LLaVA through the plugin: vLLM's server loads it via the
``vllm.general_plugins`` entry point), are pinned to the same one CPU (``taskset``), and get the same
clips over HTTP from a loopback static server, the same frame count (Framewise: ``video_url.num_frames``;
vLLM: ``media_io_kwargs.video.num_frames``, the server started with ``--media-io-kwargs
'{"video":{"num_frames":8}}'``) and the same requests from one asyncio/httpx streaming client on the other
CPU(s). TTFT = time to the first SSE chunk carrying a choice (both servers send it once the engine has
produced the first token); e2e = time to ``[DONE]``.

Parts:
  load      concurrency 1/4/8 for (a) a 60 s clip, 8 frames; (b) 10 min textured clips, 2 s and 8 s GOPs,
            8 and 16 frames. Every request gets a byte-distinct copy of its clip (same frames, another
            metadata tag), so no server answers from a content-hash cache: each request decodes.
  repeat    (c) ten questions about one 10 min clip, one at a time: question 1 vs questions 2-10.
  overhead  the gateway's own cost: the same decoded frames (frame-cache hit on an uploaded file) through
            ``framewise serve`` vs straight into ``AsyncLLM`` in-process, same engine arguments.
  length    one request at a time, 8 frames, 1/10/30/60/120 min clips (stream-copy concatenations):
            TTFT and peak RSS (sum of the server's processes' VmHWM) against duration.
Results: ``bench/results/serve_e2e.json`` (``serve_e2e_quick.json`` with ``--quick``) and PNG plots.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from loadtests import clips, servers  # noqa: E402
from loadtests.servers import chat_body  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DERIVED = "derived"  # copies and concatenations, under the clip directory (served as /derived/...)
LOAD_CASES = {  # name: (clip, frames)
    "a": ("60s-h264", 8),
    "b-gop2s-8": ("10min-textured-gop2s", 8),
    "b-gop2s-16": ("10min-textured-gop2s", 16),
    "b-gop8s-8": ("10min-textured-gop8s", 8),
    "b-gop8s-16": ("10min-textured-gop8s", 16),
}
QUICK_CASES = {"quick": ("short-h264", 8)}
FRAMEWISE_ARGS = ("--max-video-mb", "4096", "--max-duration-s", "10000", "--queue-above-s", "1000000",
                  "--queue-above-mb", "1000000", "--decode-timeout-s", "600", "--fetch-timeout-s", "600")


# ---- the load generator ----------------------------------------------------------------------


async def one_request(client: httpx.AsyncClient, base_url: str, body: dict) -> dict:
    """One streamed chat completion: TTFT, e2e, or the error."""
    start = time.perf_counter()
    ttft = None
    try:
        async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"}
            done, tokens, usage = False, 0, {}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"ok": False, "error": str(chunk["error"])[:300]}
                usage = chunk.get("usage") or usage
                if chunk.get("choices"):
                    ttft = ttft or time.perf_counter() - start
                    tokens += sum(1 for c in chunk["choices"] if (c.get("delta") or {}).get("content"))
            if not done or ttft is None:
                return {"ok": False, "error": "stream ended without [DONE] or without a choice"}
    except (httpx.HTTPError, ValueError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return {"ok": True, "ttft": ttft, "e2e": time.perf_counter() - start, "content_chunks": tokens,
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens")}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def run_level(base_url: str, bodies: list[dict], concurrency: int, timeout: float) -> dict:
    """``bodies`` with at most ``concurrency`` in flight; TTFT/e2e p50/p95, requests/s, errors."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def go(body):
            async with sem:
                return await one_request(client, base_url, body)

        start = time.perf_counter()
        results = await asyncio.gather(*[go(b) for b in bodies])
        wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    ttft, e2e = [r["ttft"] for r in ok], [r["e2e"] for r in ok]
    return {"requests": len(bodies), "errors": len(bodies) - len(ok), "wall_s": round(wall, 3),
            "rps": round(len(ok) / wall, 4), "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
            "e2e_p50": pct(e2e, 0.5), "e2e_p95": pct(e2e, 0.95), "ttft_all": [round(t, 4) for t in ttft],
            "prompt_tokens": sorted({r["prompt_tokens"] for r in ok if r["prompt_tokens"] is not None}),
            "completion_tokens": sorted({r["completion_tokens"] for r in ok if r["completion_tokens"] is not None}),
            "error_samples": [r["error"] for r in results if not r["ok"]][:3]}


# ---- clips --------------------------------------------------------------------------------


class Clips:
    """The corpus, byte-distinct copies and concatenations, served from one loopback HTTP server process."""

    def __init__(self, names: list[str], cpus: list[int]):
        self.dir = clips.DEFAULT_DIR
        self.paths = clips.ensure(names, self.dir, log=lambda m: print(m, flush=True))
        (self.dir / DERIVED).mkdir(exist_ok=True)
        self.port = servers.free_port()
        pin = ["taskset", "-c", ",".join(map(str, cpus))]
        self.proc = subprocess.Popen([*pin, sys.executable, "-m", "loadtests.clips", "serve", "--set",
                                      ",".join(names), "--port", str(self.port)], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, start_new_session=True)
        for _ in range(200):
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/{clips.IMAGE}", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)

    def url(self, path: Path) -> str:
        return f"http://127.0.0.1:{self.port}/{path.relative_to(self.dir)}"

    def copies(self, name: str, n: int) -> list[Path]:
        src = self.paths[name]
        return [clips.distinct_copy(src, self.dir / DERIVED / f"{src.stem}-copy{i}{src.suffix}", str(i))
                for i in range(n)]

    def concat(self, name: str, times: int) -> Path:
        src = self.paths[name]
        return clips.concat(src, times, self.dir / DERIVED / f"{src.stem}-x{times}{src.suffix}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# ---- peak RSS ------------------------------------------------------------------------------


def reset_peak_rss(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)


def peak_rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 1024, 1)


# ---- parts ---------------------------------------------------------------------------------


def part_load(server: str, srv: servers.Server, media: Clips, cases: dict, levels: dict, args) -> list[dict]:
    rows = []
    for case, (name, frames) in cases.items():
        total = sum(max(c, args.min_requests) for c in levels[case])
        copies = iter(media.copies(name, total))  # each request its own bytes: no content-hash cache hit
        for c in levels[case]:
            n = max(c, args.min_requests)
            bodies = [chat_body(server, media.url(next(copies)), frames, args.max_tokens) for _ in range(n)]
            res = asyncio.run(run_level(srv.base_url, bodies, c, args.timeout))
            row = {"case": case, "clip": name, "frames": frames, "server": server, "concurrency": c, **res}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ttft_all"}), flush=True)
    return rows


def part_repeat(server: str, srv: servers.Server, media: Clips, name: str, questions: int, args) -> dict:
    """One video (its own byte-distinct copy, cold), ``questions`` different questions, one at a time."""
    [path] = [clips.distinct_copy(media.paths[name], media.dir / DERIVED / f"{media.paths[name].stem}-repeat-"
                                  f"{server}{media.paths[name].suffix}", f"repeat-{server}")]
    qs = [f"Question {i + 1}: what happens in this video?" for i in range(questions)]
    ttfts = []
    for q in qs:
        res = asyncio.run(run_level(srv.base_url, [chat_body(server, media.url(path), 8, args.max_tokens, q)], 1,
                                    args.timeout))
        ttfts.append(res["ttft_p50"])
        if res["errors"]:
            return {"server": server, "clip": name, "errors": res["errors"], "error_samples": res["error_samples"]}
    rest = [t for t in ttfts[1:] if t is not None]
    row = {"server": server, "clip": name, "questions": questions, "errors": 0, "first_ttft": ttfts[0],
           "next_ttft_p50": pct(rest, 0.5), "next_ttft_max": max(rest) if rest else None, "ttft_all": ttfts,
           "first_over_next": round(ttfts[0] / pct(rest, 0.5), 1) if rest else None}
    print(json.dumps(row), flush=True)
    return row


def part_length(server: str, srv: servers.Server, media: Clips, lengths: list[tuple[int, Path]], args) -> list[dict]:
    rows = []
    for minutes, path in lengths:
        pids = srv.pids()
        reset_peak_rss(pids)
        res = asyncio.run(run_level(srv.base_url, [chat_body(server, media.url(path), 8, args.max_tokens)], 1,
                                    args.timeout))
        row = {"server": server, "minutes": minutes, "bytes": path.stat().st_size, "ttft": res["ttft_p50"],
               "prompt_tokens": res["prompt_tokens"],
               "e2e": res["e2e_p50"], "errors": res["errors"], "error_samples": res["error_samples"],
               "peak_rss_mib": peak_rss_mib(srv.pids())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def part_overhead(srv: servers.Server, media: Clips, clip: str, reps: int, worker, args) -> dict:
    """The gateway's own cost, side by side: ``clip`` uploaded once, then ``reps`` rounds of one streamed request
    about ``file-<id>`` through the gateway (frame-cache hits after the first) and one straight into the in-process
    ``AsyncLLM`` ``worker`` (:class:`bench.gateway_stages.InProcess`: same frames, prompt and SamplingParams, same
    CPU), alternating, so that the machine's load weighs on both alike."""
    up = httpx.post(f"{srv.base_url}/v1/files", files={"file": (media.paths[clip].name,
                                                                media.paths[clip].read_bytes())}, timeout=60)
    up.raise_for_status()
    body = chat_body("framewise", up.json()["id"], 8, args.overhead_tokens)
    gw, direct, errors = [], [], 0

    async def rounds(n: int, keep: bool) -> None:
        nonlocal errors
        async with httpx.AsyncClient(timeout=args.timeout) as client:
            for _ in range(n):
                r = await one_request(client, srv.base_url, body)
                d = worker.request()
                if keep:
                    errors += not r["ok"]
                    if r["ok"]:
                        gw.append(r)
                    direct.append(d)

    asyncio.run(rounds(3, False))  # warm: decode, frame cache, prefix cache, both engines
    asyncio.run(rounds(reps, True))
    g = {"ttft_p50": pct([r["ttft"] for r in gw], 0.5), "e2e_p50": pct([r["e2e"] for r in gw], 0.5),
         "errors": errors, "requests": reps}
    i = {"ttft_p50": pct([d["ttft"] for d in direct], 0.5), "e2e_p50": pct([d["e2e"] for d in direct], 0.5),
         "requests": reps}
    return {"gateway": g, "inprocess": i, "ttft_overhead_ms": round((g["ttft_p50"] - i["ttft_p50"]) * 1000, 2),
            "e2e_overhead_ms": round((g["e2e_p50"] - i["e2e_p50"]) * 1000, 2), "errors": errors,
            "method": "interleaved: one gateway request, then one in-process request, same CPU"}


def inprocess_worker(model: Path, clip: Path, cpus: list[int], env: dict | None = None, max_tokens: int = 1):
    """A running in-process ``AsyncLLM`` baseline (:class:`bench.gateway_stages.InProcess`)."""
    from bench.gateway_stages import InProcess

    log = Path(tempfile.gettempdir()) / f"fw-serve-e2e-inprocess-{os.getpid()}.log"
    return InProcess(model, clip, "asyncio", cpus, log, env=env, max_tokens=max_tokens)


ENGINE_GIB = 4.0  # one demo-checkpoint engine (API process, engine core, worker with 1 GiB KV cache): ~3.6 GiB


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / (1 << 20)
    return 0.0


def start_server(server: str, model: Path, workdir: Path, media: Clips, cpus: list[int],
                 env: dict | None = None) -> servers.Server:
    if server == "framewise":
        return servers.framewise(model, workdir / server, allowed_hosts=f"127.0.0.1:{media.port}",
                                 args=FRAMEWISE_ARGS, cpus=cpus, env=env)
    return servers.vllm_openai(model, workdir / server, num_frames=8, cpus=cpus, env=env)


# ---- report ---------------------------------------------------------------------------------


def ratios(load: list[dict]) -> list[dict]:
    out = []
    by = {(r["case"], r["concurrency"], r["server"]): r for r in load}
    for (case, c, server), fw in by.items():
        if server != "framewise" or (case, c, "vllm") not in by:
            continue
        v = by[(case, c, "vllm")]

        def div(a, b):
            return round(a / b, 2) if a and b else None

        out.append({"case": case, "clip": fw["clip"], "frames": fw["frames"], "concurrency": c,
                    "vllm_over_framewise_ttft_p50": div(v["ttft_p50"], fw["ttft_p50"]),
                    "vllm_over_framewise_ttft_p95": div(v["ttft_p95"], fw["ttft_p95"]),
                    "framewise_over_vllm_rps": div(fw["rps"], v["rps"]),
                    "errors": fw["errors"] + v["errors"]})
    return out


def targets(res: dict) -> list[dict]:
    t = []
    b = [r for r in res.get("ratios", []) if r["case"].startswith("b")]
    if b:
        worst_ttft = min(min(r["vllm_over_framewise_ttft_p50"] or 0, r["vllm_over_framewise_ttft_p95"] or 0) for r in b)
        worst_rps = min(r["framewise_over_vllm_rps"] or 0 for r in b)
        t.append({"target": "10 min textured: Framewise TTFT p50 and p95 <= 1/5 of vLLM's (worst ratio)",
                  "value": worst_ttft, "met": worst_ttft >= 5, "rows": len(b)})
        t.append({"target": "10 min textured: requests/s >= 3x vLLM's (worst ratio)", "value": worst_rps,
                  "met": worst_rps >= 3, "rows": len(b)})
    fw = [r for r in res.get("repeat", []) if r["server"] == "framewise" and not r.get("errors")]
    if fw:
        ratio = round(fw[0]["first_ttft"] / fw[0]["next_ttft_max"], 1)
        t.append({"target": "ten questions: questions 2-10 >= 10x faster TTFT than the first (slowest follow-up)",
                  "value": ratio, "met": ratio >= 10})
    if "overhead" in res:
        o = res["overhead"]["ttft_overhead_ms"]
        t.append({"target": "gateway overhead vs in-process AsyncLLM <= 5 ms p50 (TTFT)", "value": o, "met": o <= 5})
    ln = {r["minutes"]: r for r in res.get("length", []) if r["server"] == "framewise" and not r["errors"]}
    if ln and min(ln) < max(ln):
        ratio = round(ln[max(ln)]["ttft"] / ln[min(ln)]["ttft"], 2)
        t.append({"target": f"length: Framewise TTFT {max(ln)} min <= 2x {min(ln)} min", "value": ratio,
                  "met": ratio <= 2})
    errors = sum(r.get("errors", 0) for part in ("load", "repeat", "length") for r in res.get(part, []))
    errors += res.get("overhead", {}).get("errors", 0)
    t.append({"target": "0 failed requests in every run", "value": errors, "met": errors == 0})
    return t


def plots(res: dict, stem: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    length = res.get("length", [])
    if length:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        for server, style in (("framewise", "o-"), ("vllm", "s--")):
            rows = sorted((r for r in length if r["server"] == server and not r["errors"]), key=lambda r: r["minutes"])
            if rows:
                a.plot([r["minutes"] for r in rows], [r["ttft"] for r in rows], style, label=server)
                b.plot([r["minutes"] for r in rows], [r["peak_rss_mib"] for r in rows], style, label=server)
        a.set(xlabel="clip duration (min)", ylabel="TTFT (s)", title="TTFT vs video length (8 frames)")
        b.set(xlabel="clip duration (min)", ylabel="peak RSS of the server (MiB)", title="peak RSS vs video length")
        for ax in (a, b):
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(f"{stem}_length.png", dpi=90)
        plt.close(fig)
        written.append(f"{stem}_length.png")
    load = res.get("load", [])
    if load:
        keys = sorted({(r["case"], r["concurrency"]) for r in load}, key=lambda k: (k[0], k[1]))
        fig, ax = plt.subplots(figsize=(max(6, len(keys) * 0.9), 4))
        for i, server in enumerate(("framewise", "vllm")):
            vals = [next((r["ttft_p50"] for r in load if (r["case"], r["concurrency"], r["server"]) == (*k, server)),
                         None) or 0 for k in keys]
            ax.bar([x + i * 0.4 for x in range(len(keys))], vals, 0.4, label=server)
        ax.set_xticks([x + 0.2 for x in range(len(keys))], [f"{c}\nc={n}" for c, n in keys], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("TTFT p50 (s, log)")
        ax.set_title("TTFT p50 under load (same clips, frames, CPU)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(f"{stem}_load.png", dpi=90)
        plt.close(fig)
        written.append(f"{stem}_load.png")
    return written


def save(res: dict, out: Path) -> None:
    """Partial results as they come (a long run cut short keeps what it measured)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**res, "partial": True}, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small clip, a few requests, both servers (~2 min)")
    ap.add_argument("--parts", default="load,repeat,overhead,length")
    ap.add_argument("--servers", default="framewise,vllm")
    ap.add_argument("--cases", default=",".join(LOAD_CASES),
                    help=f"load cases ({', '.join(LOAD_CASES)}), each optionally with its own levels: b-gop8s-16@1/4")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--min-requests", type=int, default=3, help="requests per level: max(concurrency, this)")
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--repeat-clip", default="10min-textured-gop2s")
    ap.add_argument("--lengths", default="1,10,30,60,120", help="minutes (1 = the 60 s clip, else x 10 min)")
    ap.add_argument("--overhead-reps", type=int, default=30)
    ap.add_argument("--overhead-tokens", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--model", type=Path, default=servers.DEMO_MODEL)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    # a compile cache of its own: vLLM's default one is shared with every other engine on the machine, and an
    # engine killed while compiling can leave a truncated artefact there
    os.environ.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm-serve-e2e"))
    parts = set(args.parts.split(","))
    if args.quick:
        cases, levels = QUICK_CASES, {"quick": [1, 2]}
        args.min_requests, args.questions, args.overhead_reps = 2, 3, 5
        repeat_clip, length_src, lengths = "short-h264", "short-h264", [1, 3]
    else:
        default_levels = [int(c) for c in args.concurrency.split(",")]
        cases, levels = {}, {}
        for item in filter(None, args.cases.split(",")):  # "case" or "case@1/4": its own concurrency levels
            case, _, own = item.partition("@")
            cases[case] = LOAD_CASES[case]
            levels[case] = [int(c) for c in own.split("/")] if own else default_levels
        repeat_clip, length_src = args.repeat_clip, "10min-h264"
        lengths = [int(m) for m in args.lengths.split(",")]
    out = args.out or RESULTS / ("serve_e2e_quick.json" if args.quick else "serve_e2e.json")
    names = sorted({c for c, _ in cases.values()} | {repeat_clip, length_src, "short-h264"}
                   | ({"60s-h264"} if not args.quick and 1 in lengths else set()))
    client_cpus, server_cpus = servers.other_cpus(), [servers.server_cpu()]
    os.sched_setaffinity(0, client_cpus)
    media = Clips(names, client_cpus)
    length_clips = []
    if "length" in parts:
        for m in lengths:
            if args.quick:
                length_clips.append((m, media.concat(length_src, m)))
            else:
                length_clips.append((m, media.paths["60s-h264"] if m == 1 else media.concat(length_src, m // 10)))
    res: dict = {"quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "machine": f"{os.cpu_count()} CPUs", "server_cpus": server_cpus, "client_cpus": client_cpus,
                 "max_tokens": args.max_tokens, "load": [], "repeat": [], "length": []}
    work = Path(tempfile.mkdtemp(prefix="fw-serve-e2e-"))
    server_names = args.servers.split(",")
    # --quick proves the benchmark runs, not its numbers: engines start while others are measured, as many at once as
    # the machine has memory for (3: the in-process engine and the next server start with the first server; 2: the
    # next server starts once the in-process engine is done), each with a compile cache of its own (no two processes
    # write one at once). A full run starts each engine alone.
    free = mem_available_gib()
    at_once = 1 if not args.quick else 3 if free >= 3 * ENGINE_GIB else 2 if free >= 2 * ENGINE_GIB else 1
    print(f"engines at once: {at_once} ({free:.1f} GiB available)", flush=True)
    early = ThreadPoolExecutor(at_once - 1) if at_once > 1 else None
    cache_root = Path(os.environ["VLLM_CACHE_ROOT"])

    def cache(name: str) -> dict | None:
        return {"VLLM_CACHE_ROOT": str(cache_root / name)} if early else None

    short = media.paths["short-h264"]
    pending = {}
    if early and "overhead" in parts and "framewise" in server_names:
        pending["inprocess"] = early.submit(inprocess_worker, args.model, short, server_cpus, cache("inprocess"),
                                            args.overhead_tokens)
    if at_once == 3 and len(server_names) > 1:
        nxt = server_names[1]
        pending[nxt] = early.submit(start_server, nxt, args.model, work, media, server_cpus, cache(nxt))
    try:
        for n, server in enumerate(server_names):
            t0 = time.perf_counter()
            srv = pending.pop(server).result() if server in pending else start_server(
                server, args.model, work, media, server_cpus, cache(server))
            print(f"{server} ready in {time.perf_counter() - t0:.0f} s", flush=True)
            try:
                if "overhead" in parts and server == "framewise":  # first: the in-process engine then stops
                    worker = (pending.pop("inprocess").result() if "inprocess" in pending
                              else inprocess_worker(args.model, short, server_cpus, max_tokens=args.overhead_tokens))
                    try:
                        res["overhead"] = part_overhead(srv, media, "short-h264", args.overhead_reps, worker, args)
                    finally:
                        worker.close()
                    print(json.dumps(res["overhead"]), flush=True)
                    save(res, out)
                if early and n + 1 < len(server_names) and server_names[n + 1] not in pending:
                    nxt = server_names[n + 1]
                    pending[nxt] = early.submit(start_server, nxt, args.model, work, media, server_cpus, cache(nxt))
                if "load" in parts:
                    res["load"] += part_load(server, srv, media, cases, levels, args)
                    save(res, out)
                if "repeat" in parts:
                    res["repeat"].append(part_repeat(server, srv, media, repeat_clip, args.questions, args))
                    save(res, out)
                if "length" in parts:
                    res["length"] += part_length(server, srv, media, length_clips, args)
                    save(res, out)
            finally:
                srv.close()
    finally:
        for f in pending.values():  # started early, never used (an error came first)
            with contextlib.suppress(Exception):
                f.result().close()
        if early:
            early.shutdown(wait=True)
        media.close()
    res["ratios"] = ratios(res["load"])
    res["targets"] = targets(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    res["plots"] = plots(res, out.with_suffix(""))
    out.write_text(json.dumps(res, indent=2))
    print_tables(res)
    print(f"results: {out}")
    return 0 if all(t["met"] for t in res["targets"] if t["target"].startswith("0 failed")) else 1


def print_tables(res: dict) -> None:
    def s(v):
        return "-" if v is None else f"{v:.3f}"

    if res["load"]:
        print("\n| case | clip | frames | c | server | TTFT p50 | TTFT p95 | e2e p50 | e2e p95 | req/s | errors |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in res["load"]:
            print(f"| {r['case']} | {r['clip']} | {r['frames']} | {r['concurrency']} | {r['server']} | "
                  f"{s(r['ttft_p50'])} | {s(r['ttft_p95'])} | {s(r['e2e_p50'])} | {s(r['e2e_p95'])} | "
                  f"{r['rps']:.3f} | {r['errors']}/{r['requests']} |")
    if res["ratios"]:
        print("\n| case | c | vLLM/Framewise TTFT p50 | TTFT p95 | Framewise/vLLM req/s |")
        print("|---|---|---|---|---|")
        for r in res["ratios"]:
            print(f"| {r['case']} | {r['concurrency']} | {r['vllm_over_framewise_ttft_p50']}x | "
                  f"{r['vllm_over_framewise_ttft_p95']}x | {r['framewise_over_vllm_rps']}x |")
    for r in res["repeat"]:
        print(f"repeat {r['server']}: first {s(r.get('first_ttft'))} s, next p50 {s(r.get('next_ttft_p50'))} s")
    if res["length"]:
        print("\n| minutes | server | TTFT s | peak RSS MiB |")
        print("|---|---|---|---|")
        for r in res["length"]:
            print(f"| {r['minutes']} | {r['server']} | {s(r['ttft'])} | {r['peak_rss_mib']} |")
    print()
    for t in res["targets"]:
        print(f"[{'met' if t['met'] else 'NOT MET'}] {t['target']}: {t['value']}")


if __name__ == "__main__":
    sys.exit(main())
