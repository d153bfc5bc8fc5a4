"""Decode sampled frames of a video file with PyAV."""

from __future__ import annotations

import av
import numpy as np

from server.video.sampling import uniform_indices


def count_frames(path: str) -> int:
    with av.open(path) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for _ in container.decode(stream))


def sample_frames(path: str, num_frames: int, size: int | None = None) -> np.ndarray:
    """Uniformly sampled RGB frames ``(T, H, W, 3) uint8``, optionally scaled to ``size``x``size``."""
    wanted = uniform_indices(count_frames(path), num_frames)
    keep = set(wanted)
    frames: list[np.ndarray] = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in keep:
                if size:
                    frame = frame.reformat(width=size, height=size)
                frames.append(frame.to_ndarray(format="rgb24"))
            if i >= wanted[-1]:
                break
    return np.stack(frames)
