"""Probe a video and decode only the sampled frames, with PyAV.

- Seeks to the keyframe before a target only when that keyframe lies beyond what
  has already been decoded (read off the container's index), otherwise decodes
  forward: sparse sampling of long clips touches a few GOPs, dense sampling
  decodes sequentially once. Runs that start at different keyframes are decoded
  in parallel by independent decoders.
- Scales in swscale to the model's input size (shortest edge), converts to RGB,
  applies the stream's display rotation; memory is bounded by the sampled frames.
- Only the container formats in :data:`CONTAINER_FORMATS` are demuxed, and FFmpeg reads only
  the byte source it is handed (``format_whitelist``/``protocol_whitelist``): a playlist or manifest
  (HLS, DASH, concat, ...) is refused before FFmpeg reads its header, so URLs or paths
  named inside a file are never opened, whatever the file is called.
- The bytes come through ``server/media/readers.py``: a local file or an origin read in byte ranges,
  every byte counted (``extra["bytes_read"]``); with an index, the packets at the runs' keyframes are
  fetched from an origin in parallel before decoding.
- A container that states no duration (live Matroska/WebM, raw H.264) is measured from
  its packets' timestamps (or their count, when they carry none).
- Every media problem becomes a :class:`MediaError` with a stable code.
"""

from __future__ import annotations

import bisect
import errno
import math
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from fractions import Fraction

import av
import numpy as np

from framewise.server.media.readers import Opener, RangedURL
from framewise.server.video.errors import MediaError
from framewise.server.video.sampling import FrameSampling, SamplingError, keyframe_targets, plan_timestamps


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
    timed: bool = True  # False: the packets carry no timestamps (raw streams); frame k is at k / frame_rate


@dataclass
class SampledVideo:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    timestamps: list[float]  # presentation time (s) of each returned frame
    info: VideoInfo
    decoded_frames: int = 0
    seeks: int = 0
    extra: dict = field(default_factory=dict)


# Demuxers FFmpeg may use (names as in ``ffmpeg -demuxers``). None of them opens another
# URL or file named in its input (mov's external data references stay off: enable_drefs=0).
CONTAINER_FORMATS = ("mov", "mp4", "matroska", "webm", "avi", "mpegts", "h264", "hevc")
ACCEPTED = "MP4/MOV, Matroska/WebM, AVI, MPEG-TS or raw H.264/HEVC"
OPEN_OPTIONS = {"format_whitelist": ",".join(CONTAINER_FORMATS), "protocol_whitelist": "file,pipe",
                "enable_drefs": "0"}


def _open(source: str | Opener):
    """Open a local file (or a counted byte source) with the allow-listed demuxers only (FFmpeg probes the
    first bytes, then refuses any other format before it reads the header)."""
    try:
        file = source.open() if isinstance(source, Opener) else source
        container = av.open(file, mode="r", container_options=dict(OPEN_OPTIONS), metadata_errors="ignore")
    except (av.error.InvalidDataError, av.error.EOFError) as e:
        raise MediaError("invalid_video", f"not a readable video file ({e.strerror or e})") from e
    except av.FFmpegError as e:
        if e.errno == errno.EINVAL:  # the probed format is not on the allow-list
            raise MediaError("invalid_video", f"not a video container Framewise accepts ({ACCEPTED})") from e
        raise MediaError("invalid_video", f"cannot open video: {e}") from e
    if not set(container.format.name.split(",")) & set(CONTAINER_FORMATS):  # never reached: FFmpeg refuses first
        container.close()
        raise MediaError("invalid_video", f"{container.format.name} is not a video container Framewise accepts")
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


def _measure(container, stream, info: VideoInfo, limits: DecodeLimits) -> VideoInfo:
    """The duration of a stream whose container states none, read off its packets (no decoding):
    from the first timestamp to the end of the last packet, or, when packets carry no
    timestamps (raw H.264), their count over the rate their durations give. A constant-rate
    stream lasts frames / rate: timestamps rounded to the container's clock (ms in Matroska)
    would shorten it by up to a frame. Stops with ``video_too_long`` past the limit."""
    tb = float(stream.time_base or 0)
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else None
    first, end, count, durations = math.inf, -math.inf, 0, Counter()
    rate = info.frame_rate
    try:
        for packet in container.demux(stream):
            if not packet.size:
                continue
            count += 1
            if packet.duration:
                durations[packet.duration] += 1
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is not None and tb:
                first = min(first, ts * tb)
                end = max(end, (ts + packet.duration) * tb if packet.duration else ts * tb + 1 / (rate or 25.0))
            so_far = end - first if math.isfinite(end) else count / (rate or 25.0)
            if so_far > limits.max_duration_s:
                raise MediaError("video_too_long", f"the video lasts more than {limits.max_duration_s:.0f}s, the "
                                 "limit", status=413)
    except av.FFmpegError:
        pass  # a damaged tail: measure what could be read
    if not count:
        raise MediaError("invalid_video", "the video stream has no frames")
    duration = end - (start if start is not None else first) if math.isfinite(end) else 0.0
    if duration <= 0:  # no timestamps at all (or none that make sense)
        if durations and tb:
            rate = 1 / (durations.most_common(1)[0][0] * tb)
        rate = rate or float(stream.guessed_rate or 25.0)
        return replace(info, duration=count / rate, frame_rate=rate, timed=False)
    if rate and abs(count / rate - duration) < 1 / rate:
        duration = count / rate
    return replace(info, duration=duration)


def _read_info(path: str | Opener, container, stream, limits: DecodeLimits):
    """``(container, stream, info)``, limits checked; a container without a duration is measured,
    then opened again at its start (raw streams cannot seek back). Closes the container on error."""
    try:
        info = _info(container, stream)
        if info.duration <= 0:
            info = _measure(container, stream, info, limits)
            container.close()
            container, stream = _open(path)
        _check_limits(info, limits)
    except BaseException:
        container.close()
        raise
    return container, stream, info


def probe(path: str, limits: DecodeLimits = DecodeLimits()) -> VideoInfo:
    container, stream, info = _read_info(path, *_open(path), limits)
    container.close()
    return info


def header_duration(path: str) -> float | None:
    """The duration a container states in its header, read from a file that may hold only its first bytes (a
    download in progress); None when those bytes do not say (an MP4 whose index comes last, a stream)."""
    try:
        container, stream = _open(path)
    except MediaError:
        return None
    try:
        # only what the header states: no packet is read (a partial file would end early) and no estimate
        # from the bit rate (FFmpeg's estimate on a truncated file is the truncated length)
        if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
            return float(stream.duration * stream.time_base)
        if stream.metadata.get("DURATION"):
            return _parse_clock(stream.metadata["DURATION"])
        if container.format.name.split(",")[0] in ("mov", "matroska") and container.duration:
            return container.duration / av.time_base
        return None
    except Exception:  # noqa: BLE001 - a damaged header says nothing
        return None
    finally:
        container.close()


def _scaled_size(width: int, height: int, shortest_edge: int | None) -> tuple[int, int]:
    if not shortest_edge or min(width, height) <= shortest_edge:
        return width, height
    s = shortest_edge / min(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def sample_video(
    path: str | RangedURL,
    params: FrameSampling,
    *,
    default_frames: int,
    max_frames: int,
    shortest_edge: int | None = None,
    limits: DecodeLimits = DecodeLimits(),
    queue_above_s: float | None = None,
) -> SampledVideo | VideoInfo:
    """Decode the frames on screen at the planned instants (see ``sampling``).

    Targets are grouped into runs that each start at a keyframe (a seek) and decode
    forward; with ``limits.threads`` > 1, several runs and as many CPUs to run on, independent
    single-threaded decoders work through the runs in parallel (GOP-level parallelism scales better
    than FFmpeg's frame threading, which must hand every frame from thread to thread).
    A video lasting longer than ``queue_above_s`` is not decoded: its :class:`VideoInfo`
    comes back instead (the gateway runs it as a job). ``path`` is a local file or a URL read in ranges
    (``server/media/readers.py``); every byte read is counted (``extra["bytes_read"]``).
    """
    opener = Opener(path)
    try:
        return _sample(opener, params, default_frames=default_frames, max_frames=max_frames,
                       shortest_edge=shortest_edge, limits=limits, queue_above_s=queue_above_s)
    finally:
        opener.close()


def _sample(opener: Opener, params: FrameSampling, *, default_frames: int, max_frames: int, shortest_edge: int | None,
            limits: DecodeLimits, queue_above_s: float | None) -> SampledVideo | VideoInfo:
    container, stream, info = _read_info(opener, *_open(opener), limits)
    try:
        if queue_above_s is not None and info.duration > queue_above_s:
            container.close()
            return info
        t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None and info.timed else 0.0
        try:
            targets = plan_timestamps(info.duration, info.frame_rate or 25.0, params, default_frames=default_frames,
                                      max_frames=max_frames)
        except SamplingError as e:
            raise MediaError("invalid_sampling", str(e)) from e
        tb = float(stream.time_base)
        indexed = sorted((float(e.timestamp) * tb - t0, e.pos, e.size) for e in stream.index_entries
                         if e.is_keyframe) if stream.index_entries is not None and info.timed else []
        keyframes = [t for t, _, _ in indexed]
    except BaseException:
        container.close()
        raise
    planned, seek_used = targets, ["exact"] * len(targets)
    if params.seek == "keyframe" and keyframes:  # no index (MPEG-TS, raw streams): every target exact
        end = info.duration if params.end is None else min(params.end, info.duration)
        # the index holds decode times: where B-frames delay presentation (MP4) the first keyframe's lies before
        # the stream's start by that delay; a keyframe is on screen that much later than its index entry
        delay = max(0.0, -keyframes[0])
        targets, seek_used = keyframe_targets(planned, [k + delay for k in keyframes], params.start or 0.0, end)
        # aim 1 ms past each keyframe (still on screen): a float that lands a tick before it would make the
        # seek take the keyframe before it and decode that whole GOP
        nudge = min(1e-3, 0.25 / (info.frame_rate or 25.0))
        targets = [t + nudge if used == "keyframe" else t for t, used in zip(targets, seek_used, strict=True)]
    width, height = _scaled_size(info.width, info.height, shortest_edge)
    runs = _plan_runs(targets, keyframes)
    if indexed:  # each run starts at a keyframe at a known position: read from an origin in parallel beforehand
        firsts = [bisect.bisect_right(keyframes, targets[run[0]] + 1e-6) - 1 for run in runs]
        try:
            opener.prefetch([(indexed[i][1], indexed[i][1] + indexed[i][2] + PREFETCH_AFTER_KEY) for i in firsts
                           if i >= 0 and indexed[i][1] >= 0])
        except BaseException:  # the origin failed (or changed) already: nothing decoded
            container.close()
            raise
    # no more threads than CPUs this process may run on: on one CPU (a pinned server) a second decoder or codec
    # thread only takes turns with the first (measured: 20% more CPU for the same frames, bench/decode_gop.py)
    threads = max(1, min(limits.threads, _usable_cpus()))
    decoders = max(1, min(threads, len(runs)))
    codec_threads = max(1, threads // decoders)
    # frames are written straight into one array (allocated at the first frame, whose
    # rotation fixes the shape): no per-frame arrays to stack afterwards
    out: list[np.ndarray] = []
    stamps: list[float | None] = [None] * len(targets)
    work = iter(runs)
    lock = threading.Lock()
    errors: list[Exception] = []
    opened = [(container, stream)]  # the first decoder reuses the container the probe read

    def decode_runs() -> tuple[int, int]:
        with lock:
            source = opened.pop() if opened else None
        cursor = _Cursor(*(source or _open(opener)), keyframes, t0, info.frame_rate, codec_threads, info.timed)
        try:
            while True:
                with lock:
                    run = next(work, None)
                if run is None:
                    break
                for i in run:
                    frame = cursor.frame_at(targets[i])
                    if frame is None:
                        break  # past the end of a stream that is shorter than its header says
                    img = _to_rgb(frame, width, height)
                    with lock:
                        if not out:
                            out.append(np.empty((len(targets), *img.shape), np.uint8))
                    out[0][i] = img
                    stamps[i] = round((frame.time or 0.0) - cursor.t0, 6)
        except av.FFmpegError as e:  # keep what was decoded; fail below if that is nothing
            errors.append(e)
        finally:
            cursor.close()
        return cursor.decoded, cursor.seeks

    if decoders == 1:
        counts = [decode_runs()]
    else:
        with ThreadPoolExecutor(decoders, thread_name_prefix="framewise-decode") as pool:
            counts = [f.result() for f in [pool.submit(decode_runs) for _ in range(decoders)]]
    got = [i for i, s in enumerate(stamps) if s is not None]
    if not got and errors:
        raise MediaError("invalid_video", f"the video could not be decoded ({errors[0]})") from errors[0]
    if not got:
        raise MediaError("invalid_video", "no frame could be decoded from the video")
    frames = out[0] if len(got) == len(targets) else out[0][got]
    return SampledVideo(frames, [stamps[i] for i in got], info,
                        decoded_frames=sum(d for d, _ in counts), seeks=sum(s for _, s in counts),
                        extra={"decoders": decoders, "targets": [round(planned[i], 6) for i in got],
                               "seek_used": [seek_used[i] for i in got], "bytes_read": opener.reads.bytes,
                               "read_requests": opener.reads.requests})


NO_INDEX_SEEK_GAP_S = 3.0
PREFETCH_AFTER_KEY = 32 << 10  # read with a keyframe's packet: the start of the packets its decoder takes next
# Non-reference frames are skipped until this close to a target: more than B-frame
# reordering plus frame-threading delay, so every frame that can be on screen at the
# target is decoded.
SKIP_MARGIN_FRAMES = 16
SKIP_MARGIN_S = 0.5


def _plan_runs(targets: list[float], keyframes: list[float]) -> list[list[int]]:
    """Split target indices where decoding would seek anyway: a keyframe lies after the
    previous target and at or before this one. Without an index, everything is one run."""
    runs: list[list[int]] = []
    for i, t in enumerate(targets):
        key_before = _key_before(keyframes, t + 1e-6)
        if not runs or (key_before is not None and key_before > targets[i - 1] + 1e-6):
            runs.append([i])
        else:
            runs[-1].append(i)
    return runs


class _Cursor:
    """One decoder walking forward through a video, seeking when a keyframe lets it skip ahead."""

    def __init__(self, container, stream, keyframes: list[float], t0: float, frame_rate: float, threads: int,
                 timed: bool = True):
        self.container, self.stream = container, stream
        self.stream.thread_type = "AUTO"
        self.stream.codec_context.thread_count = threads
        self.tb, self.t0, self.keyframes = float(self.stream.time_base), t0, keyframes
        self.skip_margin = max(SKIP_MARGIN_S, SKIP_MARGIN_FRAMES / (frame_rate or 25.0))
        # untimed frames are numbered as they come out: every frame is decoded, nothing is sought
        self.frame_tb = None if timed else Fraction(1 / (frame_rate or 25.0)).limit_denominator(1 << 20)
        if not timed:
            self.skip_margin = math.inf
        self.decoded = self.seeks = 0
        self._it = None
        self._pending = None  # decoded frame past the previous target, not consumed yet
        self._last = None  # last frame at or before the current target
        self._last_time = -math.inf

    def close(self) -> None:
        self.container.close()

    def _next(self):
        try:
            f = next(self._it)
        except StopIteration:
            return None
        if self.frame_tb is not None:
            f.pts, f.time_base = self.decoded, self.frame_tb
        self.decoded += 1
        return f

    def frame_at(self, t: float):
        """The frame on screen at ``t`` (seconds from the stream start), or None past the end."""
        ctx = self.stream.codec_context
        decoded_until = max(self._last_time, _time(self._pending, self.t0))
        if self.frame_tb is None and _should_seek(t, self.keyframes, decoded_until=decoded_until):
            self.container.seek(int((t + self.t0) / self.tb), stream=self.stream, backward=True)
            self.seeks += 1
            self._it, self._pending, self._last, self._last_time = None, None, None, -math.inf
        if self._it is None:
            self._it = iter(self.container.decode(self.stream))
        while True:
            f = self._pending if self._pending is not None else self._next()
            self._pending = None
            if f is None:
                break
            ft = _time(f, self.t0)
            if ft > t + 1e-6:
                self._pending = f
                break
            self._last, self._last_time = f, ft
            # far from the target, frames nothing else references need not be decoded;
            # close to it (beyond any reordering/threading delay) decode everything
            ctx.skip_frame = "NONREF" if ft < t - self.skip_margin else "DEFAULT"
        ctx.skip_frame = "DEFAULT"
        return self._last if self._last is not None else self._pending


def _time(frame, t0: float) -> float:
    if frame is None:
        return -math.inf
    return (frame.time if frame.time is not None else 0.0) - t0


def _key_before(keyframes: list[float], t: float) -> float | None:
    """The last keyframe at or before ``t`` (``keyframes`` sorted)."""
    i = bisect.bisect_right(keyframes, t)
    return keyframes[i - 1] if i else None


def _should_seek(t: float, keyframes: list[float], decoded_until: float) -> bool:
    """Seek when a keyframe lies between what is decoded and the target: decoding from
    it skips everything before it. Without an index, seek across long gaps only."""
    if keyframes:
        key_before = _key_before(keyframes, t)
        return key_before is not None and key_before > decoded_until + 1e-6
    return t - max(decoded_until, 0.0) > NO_INDEX_SEEK_GAP_S


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _to_rgb(frame, width: int, height: int) -> np.ndarray:
    rot = int(getattr(frame, "rotation", 0) or 0) % 360
    img = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA").to_ndarray()
    return np.rot90(img, k=rot // 90) if rot else img
