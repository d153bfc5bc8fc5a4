"""Synthetic test clips written with PyAV.

Each frame carries its own index as a 12-bit binary code in a row of black/white
blocks along the top (robust to lossy codecs and scaling), over a moving square.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

CODE_BITS = 12


def frame_pattern(index: int, total: int, width: int, height: int) -> np.ndarray:
    img = np.zeros((height, width, 3), dtype=np.uint8)
    img[..., 2] = 60
    block = width // CODE_BITS
    band = max(4, height // 6)
    for b in range(CODE_BITS):
        if (index >> b) & 1:
            img[:band, b * block : (b + 1) * block] = 255
    side = max(4, min(width, height) // 4)
    x = int((width - side) * index / max(1, total - 1))
    y = band + (height - band - side) // 2
    img[y : y + side, x : x + side] = (255, 128, 0)
    return img


def read_index(frame: np.ndarray) -> int:
    """The index written by :func:`frame_pattern` (works on scaled frames too)."""
    h, w = frame.shape[:2]
    band = max(2, h // 6)
    block = w / CODE_BITS
    value = 0
    for b in range(CODE_BITS):
        x0, x1 = int(b * block + block * 0.25), int(b * block + block * 0.75)
        if frame[: band // 2 + 1, x0:x1].mean() > 128:
            value |= 1 << b
    return value


def write_clip(
    path: str,
    *,
    frames: int = 48,
    fps: float = 24,
    width: int = 192,
    height: int = 120,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    audio: bool = False,
    frame_times: list[float] | None = None,
    gop: int | None = None,
    noise: int = 0,
) -> str:
    """Write a clip; ``frame_times`` (seconds) gives a variable frame rate; ``noise`` > 0: a square of fresh
    noise that many pixels wide in the bottom-right corner of every frame (real bit rates: every frame costs
    bytes, as in camera footage, so a container index is small beside the packets)."""
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if gop:
            stream.codec_context.gop_size = gop
        if frame_times is not None:  # no B-frames: reordering would shorten the muxed VFR duration
            stream.time_base = Fraction(1, 1000)
            stream.codec_context.time_base = Fraction(1, 1000)
            stream.codec_context.max_b_frames = 0
        astream = container.add_stream("aac", rate=16000) if audio else None
        for i in range(frames):
            img = frame_pattern(i, frames, width, height)
            if noise:
                img[-noise:, -noise:] = np.random.default_rng(i).integers(0, 256, (noise, noise, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if frame_times is not None:
                frame.pts = int(round(frame_times[i] * 1000))
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if astream is not None:
            samples = int(16000 * frames / fps)
            t = np.arange(samples) / 16000
            pcm = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            for start in range(0, samples, 1024):
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, start : start + 1024]), format="fltp",
                                                layout="mono")
                af.sample_rate = 16000
                af.pts = start
                for packet in astream.encode(af):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)
    return path


def textured_pattern(i: int, total: int, texture: np.ndarray) -> np.ndarray:
    """The index-coded frame blended over a panning coarse-noise texture (~5 Mbit/s in x264): the benchmarks'
    and load tests' textured 720p clips (bench/sample_frames.py, loadtests/clips.py)."""
    img = frame_pattern(i, total, 1280, 720)
    tex = np.roll(texture, (i * 2, i * 3), (0, 1))[:720, :1280]
    out = (tex.astype(np.uint16) * 3 // 4 + img // 4).astype(np.uint8)
    out[: 720 // 6] = img[: 720 // 6]  # the index band stays readable
    return out
