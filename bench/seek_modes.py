"""Decode work of ``seek: exact`` vs ``seek: keyframe`` (issue 25), against a keyframe-only floor.

    .venv/bin/python -m bench.seek_modes [--runs 3] [--clips 10min-textured-gop2s,10min-textured-gop8s,120min-h264]
                                         [--frames 8,16,32]

One ``sample_video`` call per run, as a decode worker makes it (336 px edge, ``DecodeLimits()`` defaults),
pinned to one CPU like the benchmark's server. Per clip, frame count and mode: median wall and CPU seconds,
frames decoded per frame returned, seeks, and the mean / max distance between each returned frame and its
planned instant (from the index coded in the frame's pixels: the frame's true position, not the decoder's
word), and the bytes read of the file (every read counted: ``server/media/readers.py``). The floor: the same keyframes sought and decoded one frame each by a bare PyAV loop (no sampling
planner, no scaling), the least any keyframe sampler can do. Ratios are of CPU seconds (one core: the decode
time a request waits for on a pinned server, and robust to other load on the machine). Results: ``bench/results/seek_modes.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from framewise.server.video.decode import sample_video  # noqa: E402
from framewise.server.video.sampling import FrameSampling  # noqa: E402
from framewise.server.video.synth import CODE_BITS, read_index  # noqa: E402
from loadtests import clips  # noqa: E402

EDGE = 336
DEFAULT_CLIPS = "10min-textured-gop2s,10min-textured-gop8s,120min-h264"
PERIODS = {"10min-textured-gop2s": 1800, "10min-textured-gop8s": 1200, "120min-h264": 1800}  # coded index period


def true_time(frame, returned_t: float, fps: float, period: int) -> float:
    """The frame's position from the index in its pixels (which repeats every ``period`` frames in a
    concatenated clip): the occurrence nearest the time the decoder reported."""
    index = read_index(frame)
    modulus = min(period, 1 << CODE_BITS)
    base = round((returned_t * fps - index) / modulus) * modulus
    return (base + index) / fps


def keyframe_floor(path: str, keys: list[float]) -> float:
    """CPU seconds to seek to each keyframe and decode its one frame (bare PyAV, one codec thread)."""
    import av

    start = time.process_time()
    with av.open(path) as c:
        s = c.streams.video[0]
        s.codec_context.thread_count = 1
        tb = float(s.time_base)
        t0 = float(s.start_time * s.time_base) if s.start_time is not None else 0.0
        for k in keys:
            c.seek(int((k + t0) / tb), stream=s, backward=True)
            next(iter(c.decode(s)))
    return time.process_time() - start


def measure(path: Path, name: str, n: int, seek: str, runs: int) -> dict:
    walls, cpus, v = [], [], None
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        v = sample_video(str(path), FrameSampling(num_frames=n, seek=seek), default_frames=n, max_frames=n,
                         shortest_edge=EDGE)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    fps = v.info.frame_rate
    true = [true_time(f, t, fps, PERIODS.get(name, 1 << CODE_BITS)) for f, t in zip(v.frames, v.timestamps, strict=True)]
    off = [abs(a - b) for a, b in zip(true, v.extra["targets"], strict=True)]
    return {"clip": name, "frames": n, "seek": seek, "wall_s": round(statistics.median(walls), 3),
            "cpu_s": round(statistics.median(cpus), 3), "decoded_frames": v.decoded_frames,
            "decoded_per_frame": round(v.decoded_frames / n, 1), "seeks": v.seeks,
            "keyframes_used": v.extra["seek_used"].count("keyframe"),
            "bytes_read": v.extra["bytes_read"], "read_pct": round(100 * v.extra["bytes_read"] / path.stat().st_size, 2),
            "mean_offset_s": round(sum(off) / n, 3), "max_offset_s": round(max(off), 3),
            "reported_is_true": all(abs(a - b) < 0.5 / fps for a, b in zip(true, v.timestamps, strict=True)),
            "returned_s": [round(t, 3) for t in true], "_keys": [t for t, u in zip(true, v.extra["seek_used"],
                                                                                 strict=True) if u == "keyframe"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.seek_modes", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clips", default=DEFAULT_CLIPS)
    ap.add_argument("--frames", default="8,16,32")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "seek_modes.json")
    args = ap.parse_args(argv)
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[-1:])
    names = args.clips.split(",")
    paths = clips.ensure(names, log=lambda m: print(m, flush=True))
    rows = []
    for name in names:
        for n in map(int, args.frames.split(",")):
            pair = [measure(paths[name], name, n, seek, args.runs) for seek in ("exact", "keyframe")]
            keys = pair[1].pop("_keys")
            pair[0].pop("_keys")
            floor = statistics.median(keyframe_floor(str(paths[name]), keys) for _ in range(args.runs)) if keys else None
            pair[1]["floor_s"] = round(floor, 3) if floor is not None else None
            pair[1]["speedup_vs_exact"] = round(pair[0]["cpu_s"] / pair[1]["cpu_s"], 2)  # CPU: robust to load
            pair[1]["vs_floor"] = round(pair[1]["cpu_s"] / floor, 2) if floor else None
            for r in pair:
                print(json.dumps({k: v for k, v in r.items() if k != "returned_s"}), flush=True)
            rows += pair
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M"), "cpu": "1 (pinned)",
                                    "load": os.getloadavg(), "rows": rows}, indent=1))
    print(f"results: {args.out}")
    return 0 if all(r["reported_is_true"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
