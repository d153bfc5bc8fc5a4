"""``make loadtest``: clip corpus + loopback clip server (+ a gateway on the demo checkpoint when no host is
given), a bounded headless locust run, then CSV, locust's HTML report and a PNG plot under ``--out``.

    python -m loadtests.run [--host http://127.0.0.1:8000] [--tags mixed] [--users 4] [--run-time 60]

Loopback only: a remote deployment is load-tested with locust itself (see the README). Exit status: 0 when
every request succeeded, 1 on any failed request, 3 when none was made, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests import clips, servers  # noqa: E402

RESULTS = ROOT / "loadtests" / "results" / "runs"  # gitignored; the committed sample is results/sample*


def plot(prefix: Path, png: Path) -> None:
    """TTFT p50/p95 and request throughput (real HTTP requests, not metric entries) over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(f"{prefix}_stats_history.csv") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError("empty stats history")
    t0 = min(int(r["Timestamp"]) for r in rows)

    def num(v: str) -> float | None:
        try:
            return float(v)
        except ValueError:
            return None

    names = sorted({r["Name"] for r in rows if r["Name"].startswith("time_to_first_token")})
    name = "time_to_first_token" if "time_to_first_token" in names else (names or [""])[0]
    ttft = [(int(r["Timestamp"]) - t0, num(r["50%"]), num(r["95%"])) for r in rows if name and r["Name"] == name]
    rps: dict[int, float] = {}
    users: dict[int, float] = {}
    for r in rows:
        t = int(r["Timestamp"]) - t0
        if r["Type"] not in ("METRIC", "") and r["Name"] != "Aggregated":
            rps[t] = rps.get(t, 0.0) + (num(r["Requests/s"]) or 0.0)
        users[t] = num(r["User Count"]) or 0.0
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    if ttft:
        a.plot([t for t, _, _ in ttft], [p or float("nan") for _, p, _ in ttft], label="TTFT p50")
        a.plot([t for t, _, _ in ttft], [p or float("nan") for _, _, p in ttft], label="TTFT p95")
    a.set_ylabel("ms")
    a.set_title(f"{name or 'time_to_first_token'} (percentiles over locust's 10 s window)")
    a.legend(loc="upper left")
    times = sorted(rps)
    b.plot(times, [rps[t] for t in times], label="HTTP requests/s (sliding)", color="tab:green")
    b.set_ylabel("requests/s")
    b.set_xlabel("seconds since start")
    b2 = b.twinx()
    ut = sorted(users)
    b2.plot(ut, [users[t] for t in ut], label="users", color="tab:gray", linestyle="--")
    b2.set_ylabel("users")
    b.set_title("throughput")
    b.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default=None,
                    help="gateway base URL on this machine (default: start one on the demo checkpoint)")
    ap.add_argument("--tags", nargs="*", default=["mixed"], help="scenario tags (default: mixed)")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--spawn-rate", type=float, default=1.0)
    ap.add_argument("--run-time", type=float, default=60.0, help="seconds (bounded run)")
    ap.add_argument("--clips", default="default", help=f"clip set ({', '.join(clips.SETS)}) or comma list of names")
    ap.add_argument("--long-clip", default="", help="clip name for the job scenario (default: the last clip)")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--api-key", default=os.environ.get("API_KEY", ""))
    ap.add_argument("--clip-port", type=int, default=0,
                    help="port of the clip server this run starts on 127.0.0.1 (default: a free one); a --host "
                         "gateway must allow 127.0.0.1:PORT as a media host")
    ap.add_argument("--model-dir", type=Path, default=servers.DEMO_MODEL)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default=time.strftime("%Y%m%d-%H%M%S"), help="file prefix under --out")
    args = ap.parse_args(argv)
    if args.host and not servers.is_loopback(args.host):
        print("loadtests.run targets 127.0.0.1 only; for a remote deployment run locust directly "
              "(loadtests/README.md)", file=sys.stderr)
        return 2
    names = clips.SETS.get(args.clips) or args.clips.split(",")
    paths = clips.ensure(names)
    clip_server = clips.ClipServer(clips.DEFAULT_DIR, args.clip_port)
    gateway = None
    try:
        host = args.host
        if host is None:
            if not (args.model_dir / "config.json").is_file():
                print(f"no checkpoint at {args.model_dir}; run `make demo-model`", file=sys.stderr)
                return 2
            print(f"starting framewise serve on {args.model_dir} (pinned to CPU {servers.server_cpu()}) ...", flush=True)
            gateway = servers.framewise(args.model_dir, Path(tempfile.mkdtemp(prefix="fw-loadtest-")),
                                        allowed_hosts=f"127.0.0.1:{clip_server.port}", api_key=args.api_key,
                                        cpus=[servers.server_cpu()])
            host = gateway.base_url
        prefix = args.out / args.name
        long_clip = paths[args.long_clip].name if args.long_clip else paths[names[-1]].name
        cmd = [sys.executable, "-m", "loadtests.swarm", "--host", host, "--users", str(args.users),
               "--spawn-rate", str(args.spawn_rate), "--run-time", str(args.run_time), "--out", str(prefix),
               "--tags", *args.tags, "--",
               "--clip-base-url", clip_server.base_url, "--clips", ",".join(p.name for p in paths.values()),
               "--long-clip", long_clip, "--frames", str(args.frames), "--max-tokens", str(args.max_tokens),
               "--api-key", args.api_key]
        pin = ["taskset", "-c", ",".join(map(str, servers.other_cpus()))] if gateway else []
        print(f"locust: {args.users} users, tags {args.tags}, {args.run_time:g} s against {host}", flush=True)
        rc = subprocess.run([*pin, *cmd], cwd=ROOT).returncode
    finally:
        if gateway is not None:
            gateway.close()
        clip_server.close()
    summary_path = Path(f"{prefix}_summary.json")
    if summary_path.exists():
        plot(prefix, Path(f"{prefix}.png"))
        res = json.loads(summary_path.read_text())
        print(f"\n{'entry':44s} {'n':>6s} {'fail':>5s} {'p50 ms':>8s} {'p95 ms':>8s}")
        for e in res["entries"]:
            print(f"{e['type'][:6] + ' ' + e['name']:44s} {e['requests']:6d} {e['failures']:5d} "
                  f"{e['median_ms'] or 0:8.0f} {e['p95_ms'] or 0:8.0f}")
        for e in res["errors"]:
            print(f"FAILED {e['occurrences']}x {e['method']} {e['name']}: {e['error']}")
        for x in res["exceptions"]:
            print(f"EXCEPTION {x['count']}x {x['msg']}")
        print(f"\nresults: {prefix}_stats.csv, {prefix}.html, {prefix}.png, {summary_path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
