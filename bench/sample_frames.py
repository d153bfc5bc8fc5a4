"""Frame-sampling benchmark: Framewise's PyAV sampler vs vLLM 0.32's OpenCV loader vs the ffmpeg CLI.

    .venv/bin/python bench/sample_frames.py [--runs 5] [--out bench/results/sampling.json]

Clips (generated once into .cache/bench/): 60 s and 10 min of 1280x720 H.264 at 30 fps
(x264 "veryfast": B-frames, keyframe every 250 frames). Each method returns the same
uniformly sampled frames at full resolution as RGB; the median of ``--runs`` timings is
reported, plus peak RSS of a fresh process sampling 96 frames from the 10 min clip.
vLLM's loader gets the bytes already in memory (as in its server); ffmpeg's time includes
its process start. Framewise also appears scaled to 336 px (what a LLaVA model receives).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIPS = {"60s": 60, "10min": 600}
FRAMES = (8, 32, 96)


def make_clip(path: Path, seconds: int) -> None:
    import av

    from server.video.synth import frame_pattern

    total = seconds * 30
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 1280, 720, "yuv420p"
        s.options = {"preset": "veryfast"}
        for i in range(total):
            f = av.VideoFrame.from_ndarray(frame_pattern(i, total, 1280, 720), format="rgb24")
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def framewise(path: str, n: int, edge: int | None = None):
    from server.video.decode import sample_video
    from server.video.sampling import SamplingParams

    return sample_video(path, SamplingParams(num_frames=n), default_frames=n, max_frames=n, shortest_edge=edge).frames


def vllm_opencv(data: bytes, n: int):
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    frames, _ = VIDEO_LOADER_REGISTRY.load("opencv").load_bytes(data, num_frames=n)
    return frames


def ffmpeg_select(path: str, n: int, total: int):
    from server.video.sampling import uniform_indices

    expr = "+".join(f"eq(n\\,{i})" for i in uniform_indices(total, n))
    out = subprocess.run(["ffmpeg", "-loglevel", "error", "-threads", "2", "-i", path, "-vf", f"select={expr}",
                          "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    return len(out) // (1280 * 720 * 3)


def timed(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss(argv: list[str]) -> float:
    """Peak RSS (MiB) of a fresh process, measured by /usr/bin/time."""
    res = subprocess.run(["/usr/bin/time", "-f", "%M", *argv], capture_output=True, text=True, check=True)
    return int(res.stderr.strip().splitlines()[-1]) / 1024


def python_rss(call: str) -> float:
    """Peak RSS of a fresh Python process that imports this module and makes ``call``."""
    return peak_rss([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                                           f"from bench.sample_frames import *; {call}"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sampling.json"))
    args = ap.parse_args()
    cache = ROOT / ".cache" / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, seconds in CLIPS.items():
        path = cache / f"clip_{name}_720p.mp4"
        if not path.exists():
            print(f"encoding {path} ...", flush=True)
            make_clip(path, seconds)
        data = path.read_bytes()
        total = seconds * 30
        for n in FRAMES:
            assert framewise(str(path), n).shape[0] == n and vllm_opencv(data, n).shape[0] == n
            assert ffmpeg_select(str(path), n, total) == n
            row = {
                "clip": name, "frames": n,
                "framewise_s": timed(lambda p=str(path), n=n: framewise(p, n), args.runs),
                "framewise_336px_s": timed(lambda p=str(path), n=n: framewise(p, n, 336), args.runs),
                "vllm_opencv_s": timed(lambda d=data, n=n: vllm_opencv(d, n), args.runs),
                "ffmpeg_s": timed(lambda p=str(path), n=n, t=total: ffmpeg_select(p, n, t), args.runs),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    big = str(cache / "clip_10min_720p.mp4")
    from server.video.sampling import uniform_indices

    select = "+".join(f"eq(n\\,{i})" for i in uniform_indices(18000, 96))
    rss = {
        "python_baseline_mib": python_rss("import av, numpy, vllm.multimodal.video"),
        "framewise_mib": python_rss(f"framewise({big!r}, 96)"),
        "vllm_opencv_mib": python_rss(f"import vllm.multimodal.video; vllm_opencv(open({big!r}, 'rb').read(), 96)"),
        "ffmpeg_mib": peak_rss(["ffmpeg", "-loglevel", "error", "-threads", "2", "-i", big, "-vf",
                                f"select={select}", "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt",
                                "rgb24", "-y", os.devnull]),
    }
    print(json.dumps(rss))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "peak_rss_10min_96_frames": rss, "runs": args.runs,
                                          "machine": f"{os.cpu_count()} CPUs"}, indent=2))
    print("\n| clip | frames | Framewise | Framewise @336px | vLLM OpenCV | ffmpeg CLI | vLLM / Framewise | "
          "Framewise / ffmpeg |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clip']} | {r['frames']} | {r['framewise_s']:.3f} s | {r['framewise_336px_s']:.3f} s | "
              f"{r['vllm_opencv_s']:.3f} s | {r['ffmpeg_s']:.3f} s | {r['vllm_opencv_s'] / r['framewise_s']:.1f}x | "
              f"{r['framewise_s'] / r['ffmpeg_s']:.2f}x |")


if __name__ == "__main__":
    main()
