"""Which frames to take from a clip (DESIGN 2)."""

from __future__ import annotations


def uniform_indices(total_frames: int, num_frames: int) -> list[int]:
    """Midpoint of each of ``num_frames`` equal segments; every frame if the clip is shorter."""
    if total_frames <= 0:
        raise ValueError("the clip has no frames")
    if num_frames <= 0:
        raise ValueError("num_frames must be positive")
    if total_frames <= num_frames:
        return list(range(total_frames))
    seg = total_frames / num_frames
    return [min(total_frames - 1, int(seg * i + seg / 2)) for i in range(num_frames)]
