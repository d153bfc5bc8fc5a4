"""Which instants of a clip to show the model (DESIGN 2).

Uniform sampling takes the midpoint of each of T equal segments of the clip
(``[start, end]``); if the clip has fewer frames than T, every frame. ``fps``
sampling takes the midpoints of ``1/fps``-second segments. The decoder then
returns, for each instant, the frame on screen at that instant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class SamplingError(ValueError):
    """Sampling parameters that cannot be satisfied for this clip."""


@dataclass(frozen=True)
class FrameSampling:
    num_frames: int | None = None
    fps: float | None = None
    start: float | None = None
    end: float | None = None

    def cache_key(self) -> tuple:
        return (self.num_frames, self.fps, self.start, self.end)


def uniform_indices(total_frames: int, num_frames: int) -> list[int]:
    """Frame indices: midpoint of each of ``num_frames`` equal segments; all if fewer."""
    if total_frames <= 0:
        raise SamplingError("the clip has no frames")
    if num_frames <= 0:
        raise SamplingError("num_frames must be positive")
    if total_frames <= num_frames:
        return list(range(total_frames))
    seg = total_frames / num_frames
    return [min(total_frames - 1, int(seg * i + seg / 2)) for i in range(num_frames)]


def plan_timestamps(
    duration: float,
    frame_rate: float,
    params: FrameSampling,
    *,
    default_frames: int,
    max_frames: int,
) -> list[float]:
    """Seconds (from the start of the stream) of the instants to sample."""
    start = params.start or 0.0
    end = duration if params.end is None else min(params.end, duration)
    if start < 0 or (params.end is not None and params.end <= start):
        raise SamplingError(f"invalid clip range start={params.start} end={params.end}")
    if start >= duration:
        raise SamplingError(f"start={start}s is past the end of the video ({duration:.3f}s)")
    span = end - start
    if params.fps is not None:
        if params.fps <= 0:
            raise SamplingError("fps must be positive")
        count = max(1, math.floor(span * params.fps + 1e-9))
        cap = min(params.num_frames or max_frames, max_frames)
        if count > cap:  # too long for this rate: spread the allowed frames over the clip
            return plan_timestamps(duration, frame_rate, FrameSampling(cap, None, start, end),
                                   default_frames=cap, max_frames=max_frames)
        if span * params.fps < 1:  # one segment longer than the clip: the midpoint of the part inside it
            return [start + span / 2]  # (start + 0.5/fps lay past the end; a tiny fps overflowed the seek)
        step = 1.0 / params.fps
        return [start + (k + 0.5) * step for k in range(count)]
    wanted = params.num_frames or default_frames
    if wanted > max_frames:
        raise SamplingError(f"num_frames={wanted} exceeds this model's limit of {max_frames}")
    available = max(1, round(span * frame_rate)) if frame_rate > 0 else wanted
    if available <= wanted:  # every frame of the clip
        first = math.ceil(start * frame_rate - 1e-9) if frame_rate > 0 else 0
        return [(first + k + 0.5) / frame_rate for k in range(available)]
    seg = span / wanted
    return [start + (i + 0.5) * seg for i in range(wanted)]
