"""Probe a video and decode only the sampled frames, with PyAV.

- Seeks to the keyframe before a target only when that keyframe lies beyond what
  has already been decoded (read off the container's index), otherwise decodes
  forward: sparse sampling of long clips touches a few GOPs, dense sampling
  decodes sequentially once.
- Scales in swscale to the model's input size (shortest edge), converts to RGB,
  applies the stream's display rotation; memory is bounded by the sampled frames.
- Every media problem becomes a :class:`MediaError` with a stable code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import av
import numpy as np

from server.video.sampling import SamplingError, SamplingParams, plan_timestamps


class MediaError(Exception):
    """A video the gateway refuses; ``code`` is stable, ``status`` the HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status

    def __reduce__(self):  # crosses process boundaries (decode workers)
        return (MediaError, (self.code, self.message, self.status))


@dataclass(frozen=True)
class DecodeLimits:
    max_duration_s: float = 4 * 3600.0
    max_pixels: int = 4096 * 4096
    threads: int = 2


@dataclass
class VideoInfo:
    duration: float
    frame_rate: float
    width: int
    height: int
    codec: str
    has_audio: bool


@dataclass
class SampledVideo:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    timestamps: list[float]  # presentation time (s) of each returned frame
    info: VideoInfo
    decoded_frames: int = 0
    seeks: int = 0
    extra: dict = field(default_factory=dict)


def _open(path: str):
    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.error.InvalidDataError, av.error.EOFError) as e:
        raise MediaError("invalid_video", f"not a readable video file ({e.strerror or e})") from e
    except av.FFmpegError as e:
        raise MediaError("invalid_video", f"cannot open video: {e}") from e
    if not container.streams.video:
        container.close()
        raise MediaError("invalid_video", "the file has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None or stream.codec_context.name is None:
        container.close()
        raise MediaError("unsupported_codec", "the video codec is not supported")
    if stream.format is None and stream.codec_context.width == 0:
        container.close()
        raise MediaError("invalid_video", "the video stream has no frames")
    # a still-image codec in a video container (e.g. a PNG sent as a video)
    if container.format.name in ("png_pipe", "image2", "jpeg_pipe", "webp_pipe", "gif"):
        container.close()
        raise MediaError("invalid_video", f"{container.format.name} is an image, not a video")
    return container, stream


def _info(container, stream) -> VideoInfo:
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    if not duration and stream.metadata.get("DURATION"):  # Matroska keeps it as a tag
        duration = _parse_clock(stream.metadata["DURATION"])
    if not duration and container.duration:
        duration = container.duration / av.time_base
    rate = float(stream.average_rate or stream.guessed_rate or stream.base_rate or 0)
    if not duration and stream.frames and rate:
        duration = stream.frames / rate
    return VideoInfo(
        duration=float(duration or 0.0),
        frame_rate=rate,
        width=int(stream.codec_context.width),
        height=int(stream.codec_context.height),
        codec=stream.codec_context.name,
        has_audio=bool(container.streams.audio),
    )


def _parse_clock(text: str) -> float | None:
    try:
        h, m, sec = text.split(":")
        return int(h) * 3600 + int(m) * 60 + float(sec)
    except ValueError:
        return None


def _check_limits(info: VideoInfo, limits: DecodeLimits) -> None:
    if info.duration > limits.max_duration_s:
        raise MediaError("video_too_long", f"video lasts {info.duration:.0f}s; the limit is "
                         f"{limits.max_duration_s:.0f}s", status=413)
    if info.width * info.height > limits.max_pixels:
        raise MediaError("resolution_too_large", f"{info.width}x{info.height} exceeds the limit of "
                         f"{limits.max_pixels} pixels per frame", status=413)


def probe(path: str, limits: DecodeLimits = DecodeLimits()) -> VideoInfo:
    container, stream = _open(path)
    with container:
        info = _info(container, stream)
    _check_limits(info, limits)
    return info


def _scaled_size(width: int, height: int, shortest_edge: int | None) -> tuple[int, int]:
    if not shortest_edge or min(width, height) <= shortest_edge:
        return width, height
    s = shortest_edge / min(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def sample_video(
    path: str,
    params: SamplingParams,
    *,
    default_frames: int,
    max_frames: int,
    shortest_edge: int | None = None,
    limits: DecodeLimits = DecodeLimits(),
) -> SampledVideo:
    """Decode the frames on screen at the planned instants (see ``sampling``)."""
    container, stream = _open(path)
    with container:
        info = _info(container, stream)
        _check_limits(info, limits)
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = limits.threads
        tb = float(stream.time_base)
        t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        duration = info.duration if info.duration > 0 else float("inf")
        try:
            targets = plan_timestamps(duration if math.isfinite(duration) else 1e9, info.frame_rate or 25.0,
                                      params, default_frames=default_frames, max_frames=max_frames)
        except SamplingError as e:
            raise MediaError("invalid_sampling", str(e)) from e
        keyframes = sorted(float(e.timestamp) * tb - t0 for e in stream.index_entries if e.is_keyframe) \
            if stream.index_entries is not None else []
        width, height = _scaled_size(info.width, info.height, shortest_edge)
        ctx = stream.codec_context
        skip_margin = max(SKIP_MARGIN_S, SKIP_MARGIN_FRAMES / (info.frame_rate or 25.0))

        frames, stamps = [], []
        decoded = seeks = 0
        it = None
        pending = None  # decoded frame past the previous target, not consumed yet
        last = None  # last frame at or before the current target
        last_time = -math.inf

        def next_frame():
            nonlocal decoded
            try:
                f = next(it)
            except StopIteration:
                return None
            decoded += 1
            return f

        try:
            for t in targets:
                if _should_seek(t, keyframes, decoded_until=max(last_time, _time(pending, t0))):
                    container.seek(int((t + t0) / tb), stream=stream, backward=True)
                    seeks += 1
                    it, pending, last = None, None, None
                if it is None:
                    it = iter(container.decode(stream))
                while True:
                    f = pending if pending is not None else next_frame()
                    pending = None
                    if f is None:
                        break
                    ft = _time(f, t0)
                    if ft > t + 1e-6:
                        pending = f
                        break
                    last, last_time = f, ft
                    # far from the target, frames nothing else references need not be decoded;
                    # close to it (beyond any reordering/threading delay) decode everything
                    ctx.skip_frame = "NONREF" if ft < t - skip_margin else "DEFAULT"
                ctx.skip_frame = "DEFAULT"
                chosen = last if last is not None else pending
                if chosen is None:
                    break  # past the end of a stream that is shorter than its header says
                frames.append(_to_rgb(chosen, width, height))
                stamps.append(round((chosen.time or 0.0) - t0, 6))
        except av.FFmpegError as e:
            if not frames:
                raise MediaError("invalid_video", f"the video could not be decoded ({e})") from e
        if not frames:
            raise MediaError("invalid_video", "no frame could be decoded from the video")
        return SampledVideo(np.stack(frames), stamps, info, decoded, seeks)


NO_INDEX_SEEK_GAP_S = 3.0
# Non-reference frames are skipped until this close to a target: more than B-frame
# reordering plus frame-threading delay, so every frame that can be on screen at the
# target is decoded.
SKIP_MARGIN_FRAMES = 16
SKIP_MARGIN_S = 0.5


def _time(frame, t0: float) -> float:
    if frame is None:
        return -math.inf
    return (frame.time if frame.time is not None else 0.0) - t0


def _should_seek(t: float, keyframes: list[float], decoded_until: float) -> bool:
    """Seek when a keyframe lies between what is decoded and the target: decoding from
    it skips everything before it. Without an index, seek across long gaps only."""
    if keyframes:
        key_before = max((k for k in keyframes if k <= t), default=None)
        return key_before is not None and key_before > decoded_until + 1e-6
    return t - max(decoded_until, 0.0) > NO_INDEX_SEEK_GAP_S


def _to_rgb(frame, width: int, height: int) -> np.ndarray:
    rot = int(getattr(frame, "rotation", 0) or 0) % 360
    img = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA").to_ndarray()
    if rot:
        img = np.ascontiguousarray(np.rot90(img, k=rot // 90))
    return img
