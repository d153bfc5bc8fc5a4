"""Synthetic test clips written with PyAV: a moving square whose colour encodes the frame index."""

from __future__ import annotations

import av
import numpy as np


def frame_pattern(index: int, total: int, width: int, height: int) -> np.ndarray:
    img = np.zeros((height, width, 3), dtype=np.uint8)
    img[..., 2] = 40
    side = max(4, min(width, height) // 4)
    x = int((width - side) * index / max(1, total - 1))
    y = (height - side) // 2
    img[y : y + side, x : x + side] = (255, (index * 37) % 256, 0)
    return img


def write_clip(path: str, *, frames: int = 48, fps: int = 24, width: int = 160, height: int = 120,
               codec: str = "libx264") -> str:
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_pattern(i, frames, width, height), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
