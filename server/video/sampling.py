"""Which instants of a clip to show the model (DESIGN 2).

Uniform sampling takes the midpoint of each of T equal segments of the clip
(``[start, end]``); if the clip has fewer frames than T, every frame. ``fps``
sampling takes the midpoints of ``1/fps``-second segments. The decoder then
returns, for each instant, the frame on screen at that instant.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np


class SamplingError(ValueError):
    """Sampling parameters that cannot be satisfied for this clip."""


# How an ``fps`` request becomes frames: ``midpoints`` (DESIGN 2: the midpoint of each 1/fps segment) or
# ``qwen2vl_eval`` (STAVE's evaluation path: :func:`qwen2vl_eval_indices`). A model's config.json names its own
# (``frame_sampling``); num_frames requests always take uniform midpoints.
FPS_RULES = ("midpoints", "qwen2vl_eval")
# How the decoder reaches each planned instant (``video_url.seek``): ``exact`` (the frame on screen then) or
# ``keyframe`` (the nearest keyframe inside the instant's own segment, else exact: :func:`keyframe_targets`).
SEEK_MODES = ("exact", "keyframe")


@dataclass(frozen=True)
class FrameSampling:
    num_frames: int | None = None
    fps: float | None = None
    start: float | None = None
    end: float | None = None
    fps_rule: str = "midpoints"
    seek: str = "exact"

    def cache_key(self) -> tuple:
        return (self.num_frames, self.fps, self.start, self.end, self.fps_rule, self.seek)


def _round_even(x: float) -> int:
    return round(x / 2) * 2  # Python's round (half to even), as qwen-vl-utils' round_by_factor


def qwen2vl_eval_indices(total_frames: int, video_fps: float, fps: float, cap: int) -> list[int]:
    """Frame indices as STAVE's authors evaluate Qwen2-VL models (qwen-vl-utils 0.0.8's ``smart_nframes`` and
    index rule, then their lmms-eval class's 32-frame cap; notes/spec-stave-red-villm.md A.4):

    n = total / video_fps * fps, clamped to [4, the largest even number <= min(768, total)], rounded to an
    even number; indices = round(linspace(0, total - 1, n)); more than ``cap``: positions
    int(linspace(0, n - 1, cap)) of those, duplicates dropped. Clips of fewer than 2 frames (where
    qwen-vl-utils raises) give their frames as they are."""
    if total_frames < 2:
        return list(range(max(total_frames, 0)))
    n = total_frames / video_fps * fps
    n = min(max(n, 4), (min(768, total_frames) // 2) * 2)
    n = max(2, min(_round_even(n), total_frames))
    picked = _torch_linspace_round(total_frames - 1, n)
    if len(picked) > cap:  # the lmms-eval class: np.linspace(0, n - 1, cap).astype(int), deduplicated
        positions = np.linspace(0, len(picked) - 1, cap).astype(int).tolist()
        picked = [picked[p] for p in dict.fromkeys(positions)]
    return picked


def _torch_linspace_round(last: int, n: int) -> list[int]:
    """``torch.linspace(0, last, n).round()`` without importing torch in the decode workers: float32, each half
    computed from its own end as ATen's CPU kernel does, rounded half to even (tests compare with torch)."""
    if n == 1:
        return [0]
    step = np.float32(last) / np.float32(n - 1)
    values = [np.float32(i) * step if i < n // 2 else np.float32(last) - np.float32(n - 1 - i) * step
              for i in range(n)]
    return np.rint(np.array(values, dtype=np.float32)).astype(int).tolist()


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
        cap = min(params.num_frames or max_frames, max_frames)
        if params.fps_rule == "qwen2vl_eval" and frame_rate > 0:
            first = math.ceil(start * frame_rate - 1e-9)
            total = max(1, round(span * frame_rate))
            return [(first + i + 0.5) / frame_rate
                    for i in qwen2vl_eval_indices(total, frame_rate, params.fps, cap)]
        count = max(1, math.floor(span * params.fps + 1e-9))
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


def keyframe_targets(targets: list[float], keyframes: list[float], start: float,
                     end: float) -> tuple[list[float], list[str]]:
    """``seek: keyframe``: each planned instant moved to the keyframe nearest it inside its own segment -- the
    instants closer to it than to its neighbours, within ``[start, end)``; for uniform and fps sampling exactly
    the equal segments whose midpoints the targets are -- or kept where its segment holds no keyframe. The
    frame count and order never change (segments do not overlap). Returns the instants and, for each, the
    mode used (``keyframe`` or ``exact``). ``keyframes``: sorted seconds from the stream start."""
    out, used = [], []
    for i, t in enumerate(targets):
        lo = start if i == 0 else (targets[i - 1] + t) / 2
        hi = end if i == len(targets) - 1 else (t + targets[i + 1]) / 2
        inside = keyframes[bisect.bisect_left(keyframes, lo - 1e-9):bisect.bisect_left(keyframes, hi - 1e-9)]
        if inside:
            out.append(min(inside, key=lambda k: (abs(k - t), k)))
            used.append("keyframe")
        else:
            out.append(t)
            used.append("exact")
    return out, used
