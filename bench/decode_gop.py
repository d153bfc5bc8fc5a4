"""Decode cost of the gateway's sampler on the load-test clips (realistic keyframe intervals).

    .venv/bin/python bench/decode_gop.py [--runs 3] [--cpus 1] [--save-ref ref.npz | --check-ref ref.npz]

One ``sample_video`` call per run, as a decode worker makes it (scaled to the demo model's 336 px edge,
``DecodeLimits()`` defaults), pinned to ``--cpus`` CPUs (1: as in ``bench/serve_e2e.py``, where the server
has one core). Reports the median wall time, frames decoded and seeks. Every run checks the frames: their
pixels code the source frame index (``framewise.server.video.synth``), which must be the frame on screen at each
sampled instant. CPU seconds (all threads) are reported next to wall time: on a shared machine they
move less with the load. ``--save-ref``/``--check-ref`` also compare the returned pixels byte for byte with an
earlier run (another implementation of the decoder must return exactly the same frames).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framewise.server.video.decode import sample_video  # noqa: E402
from framewise.server.video.sampling import FrameSampling  # noqa: E402
from framewise.server.video.synth import CODE_BITS, read_index  # noqa: E402
from loadtests import clips  # noqa: E402

# clip, frames, source frames per coded pattern period (a concatenation repeats its base clip's indices)
CASES = [("10min-textured-gop8s", 16, 1200), ("10min-textured-gop8s", 8, 1200),
         ("10min-textured-gop2s", 16, 1800), ("10min-textured-gop2s", 8, 1800), ("60s-h264", 8, 1800)]
EDGE = 336


def expected_indices(duration: float, fps: float, n: int, period: int) -> list[int]:
    """The index coded in the frame on screen at each uniform instant."""
    return [int(math.floor((i + 0.5) * duration / n * fps + 1e-6)) % period % (1 << CODE_BITS) for i in range(n)]


def fetch_seconds(names: list[str], runs: int) -> dict[str, float]:
    """Median seconds for the gateway's fetcher (``MediaFetcher``: HTTP on loopback, SHA-256, spool file) to
    fetch each clip from a clip server on the other CPUs: what a request for a URL pays before decoding."""
    import asyncio
    import subprocess
    import tempfile

    import httpx

    from framewise.server.media.fetch import MediaFetcher
    from loadtests import servers

    port = servers.free_port()
    others = [c for c in sorted(os.sched_getaffinity(0) | set(range(os.cpu_count() or 1)))
              if c not in os.sched_getaffinity(0)] or sorted(os.sched_getaffinity(0))
    proc = subprocess.Popen(["taskset", "-c", ",".join(map(str, others)), sys.executable, "-m", "loadtests.clips",
                             "serve", "--set", ",".join(names), "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(200):
            try:
                httpx.get(f"http://127.0.0.1:{port}/{clips.IMAGE}", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)

        async def go() -> dict[str, float]:
            out = {}
            with tempfile.TemporaryDirectory() as spool:
                f = MediaFetcher([f"127.0.0.1:{port}"], timeout_s=600, max_redirects=0, spool_dir=spool)
                await f.start()
                for name in names:
                    times = []
                    for _ in range(runs):
                        got = await f.fetch(f"http://127.0.0.1:{port}/{clips.CORPUS[name].filename}", 1 << 40)
                        times.append(got.seconds)
                        os.unlink(got.path)
                    out[name] = round(statistics.median(times), 3)
                await f.close()
            return out

        return asyncio.run(go())
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=1, help="pin to this many CPUs (the last ones)")
    ap.add_argument("--cases", default="", help="comma list of clip:frames (default: all)")
    ap.add_argument("--fetch", action="store_true", help="also time the gateway's fetch of each clip over HTTP")
    ap.add_argument("--save-ref", type=Path)
    ap.add_argument("--check-ref", type=Path)
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))[-args.cpus:]
    os.sched_setaffinity(0, cpus)
    cases = CASES
    if args.cases:
        want = {tuple(c.split(":")) for c in args.cases.split(",")}
        cases = [c for c in CASES if (c[0], str(c[1])) in want]
    paths = clips.ensure(sorted({c for c, _, _ in cases}), log=lambda m: print(m, flush=True))
    ref = dict(np.load(args.check_ref)) if args.check_ref else {}
    saved, rows = {}, []
    for name, n, period in cases:
        times, cpu, v = [], [], None
        for _ in range(args.runs):
            t0, c0 = time.perf_counter(), time.process_time()
            v = sample_video(str(paths[name]), FrameSampling(num_frames=n), default_frames=n, max_frames=n,
                             shortest_edge=EDGE)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        got = [read_index(f) for f in v.frames]
        want = expected_indices(v.info.duration, v.info.frame_rate, n, period)
        key = f"{name}-{n}"
        saved[key] = v.frames
        same = None if key not in ref else bool(np.array_equal(ref[key], v.frames))
        row = {"clip": name, "frames": n, "median_s": round(statistics.median(times), 3),
               "runs_s": [round(t, 3) for t in times],
               "cpu_s": round(statistics.median(cpu), 3), "decoded_frames": v.decoded_frames, "seeks": v.seeks,
               "decoders": v.extra.get("decoders"), "indices_ok": got == want, "same_as_ref": same}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if got != want:
            print(f"  WRONG FRAMES: got {got}\n  want {want}", flush=True)
    if args.fetch:
        print(json.dumps({"fetch_s": fetch_seconds(sorted({c for c, _, _ in cases}), args.runs)}), flush=True)
    if args.save_ref:
        np.savez(args.save_ref, **saved)
    print(json.dumps({"cpus": cpus, "load": os.getloadavg()}))
    return 0 if all(r["indices_ok"] and r["same_as_ref"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
