"""Frame-sampling benchmark: Framewise's PyAV sampler vs vLLM 0.32's OpenCV loader vs the ffmpeg CLI.

    .venv/bin/python bench/sample_frames.py [--runs 5] [--out bench/results/sampling.json]

Clips (generated once into .cache/bench/): 60 s and 10 min of 1280x720 H.264 at 30 fps
(x264 "veryfast": B-frames, keyframe every 250 frames): flat synthetic frames (~50 kbit/s,
cheap to decode) and, for 10 min, a textured panning variant at ~5 Mbit/s (the cost per frame
of real footage). ``--clips 10min-textured`` runs one of them. Each method returns the same
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framewise.server.video.sampling import uniform_indices  # noqa: E402
from framewise.server.video.synth import CODE_BITS, read_index, textured_pattern  # noqa: E402

CLIPS = {"60s": (60, False), "10min": (600, False), "10min-textured": (600, True)}  # seconds, textured
FRAMES = (8, 32, 96)


def make_clip(path: Path, seconds: int, textured: bool = False) -> None:
    import av

    from framewise.server.video.synth import frame_pattern

    total = seconds * 30
    texture = np.random.default_rng(0).integers(0, 256, (196, 336, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 1280, 720, "yuv420p"
        s.options = {"preset": "veryfast"}
        for i in range(total):
            rgb = textured_pattern(i, total, texture) if textured else frame_pattern(i, total, 1280, 720)
            f = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def framewise(path: str, n: int, edge: int | None = None):
    from framewise.server.video.decode import sample_video
    from framewise.server.video.sampling import FrameSampling

    return sample_video(path, FrameSampling(num_frames=n), default_frames=n, max_frames=n, shortest_edge=edge).frames


def vllm_opencv(data: bytes, n: int):
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    frames, _ = VIDEO_LOADER_REGISTRY.load("opencv").load_bytes(data, num_frames=n)
    return frames


def ffmpeg_select(path: str, n: int, total: int):
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
    ap.add_argument("--clips", default=",".join(CLIPS), help=f"comma list of {', '.join(CLIPS)}")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sampling.json"))
    args = ap.parse_args()
    cache = ROOT / ".cache" / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.clips.split(","):
        seconds, textured = CLIPS[name]
        path = cache / f"clip_{name}_720p.mp4"
        if not path.exists():
            print(f"encoding {path} ...", flush=True)
            make_clip(path, seconds, textured)
        data = path.read_bytes()
        total = seconds * 30
        for n in FRAMES:
            # the pixels encode the frame index modulo 2**CODE_BITS
            assert [read_index(f) for f in framewise(str(path), n)] == [
                i % (1 << CODE_BITS) for i in uniform_indices(total, n)]
            assert vllm_opencv(data, n).shape[0] == n
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
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    # a run over some clips keeps the other clips' rows (and RSS) from the previous run
    rows = [r for r in previous.get("rows", []) if r["clip"] not in {r["clip"] for r in rows}] + rows
    rows.sort(key=lambda r: (list(CLIPS).index(r["clip"]), r["frames"]))
    rss = previous.get("peak_rss_10min_96_frames")
    if "10min" in args.clips.split(",") or rss is None:
        rss = measure_rss(str(cache / "clip_10min_720p.mp4"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "peak_rss_10min_96_frames": rss, "runs": args.runs,
                               "machine": f"{os.cpu_count()} CPUs"}, indent=2))
    print("\n| clip | frames | Framewise | Framewise @336px | vLLM OpenCV | ffmpeg CLI | vLLM / Framewise | "
          "Framewise / ffmpeg |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clip']} | {r['frames']} | {r['framewise_s']:.3f} s | {r['framewise_336px_s']:.3f} s | "
              f"{r['vllm_opencv_s']:.3f} s | {r['ffmpeg_s']:.3f} s | {r['vllm_opencv_s'] / r['framewise_s']:.1f}x | "
              f"{r['framewise_s'] / r['ffmpeg_s']:.2f}x |")


def measure_rss(big: str) -> dict:
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
    return rss


if __name__ == "__main__":
    main()
