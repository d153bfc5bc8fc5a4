"""Sampled frames for a request: decode pool + a cache keyed by (content hash, sampling).

Images are decoded in the decode pool too (a crashing or hanging image codec costs a worker,
not the gateway), by Pillow restricted to :data:`IMAGE_FORMATS`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from framewise.server.media.readers import RangedURL
from framewise.server.video.decode import (
    DecodeLimits,
    MediaError,
    SampledVideo,
    VideoInfo,
    header_duration,
    sample_video,
)
from framewise.server.video.pool import DecodePool
from framewise.server.video.sampling import FrameSampling
from framewise.server.video.shared_cache import SharedFrameStore


class FrameCache:
    """LRU of sampled videos bounded by the bytes of their frames."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[tuple, SampledVideo] = OrderedDict()

    def get(self, key: tuple) -> SampledVideo | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple, value: SampledVideo) -> None:
        size = value.frames.nbytes
        if size > self.max_bytes:
            return
        if key in self._items:
            self.bytes -= self._items.pop(key).frames.nbytes
        self._items[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.frames.nbytes


@dataclass
class VideoResult:
    video: SampledVideo
    decode_seconds: float
    cache_hit: bool
    cache: str = "miss"  # "memory" (this replica's), "shared" (another replica decoded it) or "miss"


class FramesEvicted(Exception):
    """The cached frames a revalidated (not downloaded) video relied on were evicted meanwhile."""


class VideoService:
    def __init__(self, pool: DecodePool, cache: FrameCache, limits: DecodeLimits, decode_timeout_s: float,
                 shared: SharedFrameStore | None = None):
        self.pool, self.cache, self.limits, self.timeout = pool, cache, limits, decode_timeout_s
        self.shared = shared  # behind the in-memory cache: frames other replicas decoded
        self._writes: set[asyncio.Future] = set()

    def cached(self, sha256: str, params: FrameSampling, *, default_frames: int, max_frames: int,
               shortest_edge: int | None) -> bool:
        key = (sha256, params.cache_key(), default_frames, max_frames, shortest_edge)
        return self.cache.get(key) is not None or (self.shared is not None and self.shared.has(key))

    async def sample(self, path: str | RangedURL | None, sha256: str, params: FrameSampling, *, default_frames: int,
                     max_frames: int, shortest_edge: int | None,
                     queue_above_s: float | None = None) -> VideoResult | None:
        """The sampled frames, from the cache or the decode pool. ``None``: the video lasts longer
        than ``queue_above_s`` (read off its header in the same decode call) and was not decoded. ``path``: a
        local file, or a URL the decoder reads in ranges.
        ``path`` None (a revalidated URL, no bytes at hand) and no cached frames: :class:`FramesEvicted`."""
        key = (sha256, params.cache_key(), default_frames, max_frames, shortest_edge)
        hit, where = self.cache.get(key), "memory"
        if hit is None and self.shared is not None:
            hit, where = await asyncio.to_thread(self.shared.get, key), "shared"
            if hit is not None:
                self.cache.put(key, hit)
        if hit is not None:
            if queue_above_s is not None and hit.info.duration > queue_above_s:
                return None
            return VideoResult(hit, 0.0, True, where)
        if path is None:
            raise FramesEvicted(sha256)
        start = time.perf_counter()
        video = await self.pool.run(sample_video, path, params, default_frames=default_frames, max_frames=max_frames,
                                    shortest_edge=shortest_edge, limits=self.limits, queue_above_s=queue_above_s,
                                    timeout=self.timeout)
        if isinstance(video, VideoInfo):
            return None
        self.cache.put(key, video)
        if self.shared is not None:  # written beside the answer, not before it
            write = asyncio.get_running_loop().run_in_executor(None, self.shared.put, key, video)
            self._writes.add(write)
            write.add_done_callback(self._writes.discard)
        return VideoResult(video, time.perf_counter() - start, False)

    async def header_duration(self, path: str) -> float | None:
        """What the container header in ``path`` (maybe a partial download) says the video lasts; parsed in the
        decode pool like all media. None when unknown (or the probe failed: the full decode will say)."""
        try:
            return await self.pool.run(header_duration, path, timeout=min(self.timeout, 10.0))
        except MediaError:
            return None

    async def load_image(self, path: str) -> np.ndarray:
        return await self.pool.run(load_image, path, self.limits.max_pixels, timeout=self.timeout)


# Pillow openers an image part may use (JPEG includes multi-picture MPO); never e.g. EPS (Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


def load_image(path: str, max_pixels: int) -> np.ndarray:
    """The first frame as RGB; anything unreadable is ``invalid_image``, never an unexpected error."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            if im.width * im.height > max_pixels:
                raise MediaError("resolution_too_large", f"{im.width}x{im.height} exceeds the limit of "
                                 f"{max_pixels} pixels", status=413)
            return np.asarray(im.convert("RGB"))
    except MediaError:
        raise
    except Image.DecompressionBombError as e:
        raise MediaError("resolution_too_large", f"the image exceeds the limit of {max_pixels} pixels",
                         status=413) from e
    except UnidentifiedImageError as e:
        raise MediaError("invalid_image", f"not an image in an accepted format ({', '.join(IMAGE_FORMATS)})") from e
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds on damaged data
        raise MediaError("invalid_image", f"not a readable image ({type(e).__name__}: {e})") from e
