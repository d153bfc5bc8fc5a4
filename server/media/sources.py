"""Resolve a media URL (http(s), data:, file-<id>, file://) to a local file with its hash, or, for an
http(s) URL fetched before whose frames are still cached, to its hash alone after a conditional GET, or, for a
large http(s) video whose origin serves byte ranges, to a :class:`~server.media.readers.RangedURL` the decoder
reads in ranges. A ``file://`` path is named by its path, size, inode and modification time: hashing it would
read all of it, and a decode of a long video reads only what it needs."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from framewise.server.errors import APIError
from framewise.server.media.fetch import Deferred, Early, MediaFetcher, Ranged
from framewise.server.media.files import FileStore
from framewise.server.media.readers import RangedURL
from framewise.server.tenants import DEFAULT


@dataclass
class LocalMedia:
    path: str | None  # None: revalidated (HTTP 304) or read in ranges (``ranged``), not downloaded
    sha256: str
    size: int
    fetch_seconds: float
    temporary: bool  # delete after use
    ranged: RangedURL | None = None  # the decoder reads these bytes from the origin, in ranges
    in_ranges: bool = False  # read in ranges (``ranged``), or revalidated bytes that were

    def __post_init__(self):
        self.in_ranges = self.in_ranges or self.ranged is not None

    @property
    def source(self) -> str | RangedURL | None:
        """What the decoder reads: the file, the ranged URL, or None (revalidated: only the hash is known)."""
        return self.path if self.path is not None else self.ranged

    @property
    def downloaded_bytes(self) -> int:
        return 0 if self.path is None else self.size

    def release(self) -> None:
        if self.temporary and self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


_B64_SLICE = 4 << 20  # a multiple of 4 characters


async def _in_thread(fn, *args) -> LocalMedia:
    """``fn(*args)`` in a thread; a caller cancelled meanwhile (a sibling part failed, the client left) does not
    stop the thread, so what it returns is released when it does."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or f.result().release())
        raise


class MediaResolver:
    def __init__(self, fetcher: MediaFetcher, files: FileStore, spool_dir: str, allowed_local_path: str | None,
                 *, ranged_from: int | None = None):
        self.fetcher, self.files, self.spool_dir = fetcher, files, spool_dir
        self.ranged_from = ranged_from  # bytes from which a range-serving origin's video is read in ranges
        self.allowed_local = Path(allowed_local_path).resolve() if allowed_local_path else None

    async def revalidate(self, url: str, max_bytes: int, still_needed: Callable[[str], bool]) -> LocalMedia | None:
        """For an http(s) URL fetched before with strong validators, whose content hash
        ``still_needed`` accepts (its frames are cached): a conditional GET. 304: the hash alone
        (``path`` None). 200: the new bytes, downloaded as :meth:`resolve` does. ``None``: nothing
        to revalidate (call :meth:`resolve`)."""
        if not url.startswith(("http://", "https://")):
            return None
        known = self.fetcher.validators(url)
        if known is None or known.size > max_bytes or not still_needed(known.sha256):
            return None
        start = time.perf_counter()
        got = await self.fetcher.fetch(url, max_bytes, unless=known, ranged_from=self.ranged_from)
        if got is None:
            return LocalMedia(None, known.sha256, known.size, time.perf_counter() - start, False,
                              in_ranges=known.ranged)
        return self._fetched(got)

    def _fetched(self, got) -> LocalMedia:
        if isinstance(got, Ranged):
            ranged = RangedURL(got.url, got.size, got.etag, got.last_modified, self.fetcher.allowed_hosts,
                               self.fetcher.timeout_s, got.head)
            return LocalMedia(None, got.sha256, got.size, got.seconds, False, ranged)
        return LocalMedia(got.path, got.sha256, got.size, got.seconds, True)

    async def resolve(self, url: str, max_bytes: int, *, timeout_s: float | None = None,
                      early: Early | None = None, owner: str | None = DEFAULT,
                      ranged: bool = False) -> LocalMedia | Deferred:
        """The media as a local file. An http(s) download is bounded by ``timeout_s`` (default: the fetcher's)
        and may be stopped by ``early`` (:class:`~server.media.fetch.Deferred`: server/media/fetch.py). A
        ``file-<id>`` is one of ``owner``'s files (None: anyone's, an admin's request); another tenant's is 404.
        ``ranged``: a video the decoder may read in ranges from its origin (``ranged_from``; never an image)."""
        start = time.perf_counter()
        if url.startswith("data:"):
            return await _in_thread(self._from_data_url, url, max_bytes, start)
        if url.startswith("file-"):
            obj, path = self.files.get(url, owner)
            if obj.bytes > max_bytes:
                raise APIError(413, "media_too_large", f"{url} is {obj.bytes} bytes; the limit is {max_bytes}",
                               "messages")
            return LocalMedia(str(path), obj.sha256, obj.bytes, time.perf_counter() - start, False)
        if url.startswith("file://"):
            return await _in_thread(self._from_local_path, url, max_bytes, start)
        if url.startswith(("http://", "https://")):
            got = await self.fetcher.fetch(url, max_bytes, timeout_s=timeout_s, early=early,
                                           ranged_from=self.ranged_from if ranged else None)
            if isinstance(got, Deferred):
                return got
            return self._fetched(got)
        raise APIError(400, "invalid_url", "media URLs must be http(s)://, data:, file-<id> from /v1/files, "
                       "or an allowed file:// path", "messages")

    def _from_data_url(self, url: str, max_bytes: int, start: float) -> LocalMedia:
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise APIError(400, "invalid_url", "data URLs must be base64 encoded (data:<mime>;base64,...)",
                           "messages")
        if len(payload) * 3 // 4 > max_bytes:
            raise APIError(413, "media_too_large", f"the data URL exceeds the limit of {max_bytes} bytes", "messages")
        # decoded a slice at a time (4 MiB of text, a whole number of base64 quanta) straight into the spool
        # file: the decoded video is never held in memory next to the request's text
        fd, path = tempfile.mkstemp(dir=self.spool_dir, prefix="data-")
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as f:
                for i in range(0, len(payload), _B64_SLICE):
                    raw = base64.b64decode(payload[i:i + _B64_SLICE], validate=True)
                    digest.update(raw)
                    size += len(raw)
                    f.write(raw)
        except (binascii.Error, ValueError):
            os.unlink(path)
            raise APIError(400, "invalid_url", "the data URL is not valid base64", "messages") from None
        except BaseException:
            os.unlink(path)
            raise
        return LocalMedia(path, digest.hexdigest(), size, time.perf_counter() - start, True)

    def _from_local_path(self, url: str, max_bytes: int, start: float) -> LocalMedia:
        if self.allowed_local is None:
            raise APIError(400, "url_not_allowed", "file:// URLs are disabled (see --allowed-local-media-path)",
                           "messages")
        path = Path(url[len("file://"):]).resolve()
        if not path.is_relative_to(self.allowed_local) or not path.is_file():
            raise APIError(400, "url_not_allowed", f"{url} is not a file under the allowed media path", "messages")
        st = path.stat()
        size = st.st_size
        sha = hashlib.sha256(f"file\n{path}\n{st.st_ino}\n{size}\n{st.st_mtime_ns}".encode()).hexdigest()
        if size > max_bytes:
            raise APIError(413, "media_too_large", f"{url} is {size} bytes; the limit is {max_bytes}", "messages")
        return LocalMedia(str(path), sha, size, time.perf_counter() - start, False)
