"""Byte sources the decoder reads through: a local file, or an http(s) URL read with ranged GETs.

FFmpeg reads through a block cache shared by the decoders of one video (:class:`BlockReader`: 16 KiB blocks,
read ahead up to 4 MiB from an origin, 256 KiB from a local file, while reads run on in order), and every block taken from the file or the origin is
counted (:class:`Reads`: ``bytes`` and ``requests``), so a decode reports exactly what it took. A seek-heavy
decode of a long video (``seek: keyframe``) reads the container index and the chosen packets, not the file.

:class:`RangedURL` is what the gateway's guarded fetcher found out about a URL whose origin serves byte ranges
(``206`` to ``Range: bytes=0-``) with a strong validator: the final URL (redirects were followed and checked
there), its size and validator. The decode worker then reads blocks of it with ranged GETs under the same
policy: the host resolved and every address checked (:class:`~server.media.addresses.AddressPolicy`, the same
allow-list), the connection made to the checked address, no redirect followed, every answer a ``206`` for
exactly the asked range of exactly that size, sent with ``If-Match`` (or ``If-Unmodified-Since``) so bytes
that changed since are refused (``412``), never mixed into the decode. Bytes fetched are capped (twice the
file: a decode that keeps re-reading evicted blocks stops), each request has the fetch timeout, and the
whole decode the decode timeout.
"""

from __future__ import annotations

import io
import os
import socket
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from framewise.server.media.addresses import AddressPolicy, only_refused_addresses, url_refusal
from framewise.server.video.errors import MediaError

BLOCK = 16 << 10  # bytes fetched at least per read (FFmpeg asks 32 KiB at a time: small blocks waste less after a seek)
MAX_AHEAD = 256  # blocks fetched at once when reads run on sequentially (4 MiB)
CACHE_BYTES = 64 << 20  # blocks kept per decode (shared by its decoders)
PARALLEL = 8  # ranged GETs in flight at once when prefetching


class Reads:
    """What one decode read: bytes and read calls (local) or ranged GETs (http)."""

    def __init__(self):
        self.bytes = 0
        self.requests = 0
        self.lock = threading.Lock()

    def add(self, n: int, requests: int = 1) -> None:
        with self.lock:
            self.bytes += n
            self.requests += requests


@dataclass(frozen=True)
class RangedURL:
    """A URL read in ranges (module doc); picklable, crosses into the decode worker."""

    url: str
    size: int
    etag: str | None
    last_modified: str | None
    allowed_hosts: tuple[str, ...] = ()
    timeout_s: float = 30.0
    head: bytes = field(default=b"", repr=False)  # the first bytes, got by the gateway's first GET (counted as read)


def _connect(url: str, policy: AddressPolicy, timeout_s: float):
    """A connection pool to the first allowed address of ``url``'s host (no second lookup)."""
    import urllib3  # here: a decode worker that reads only local files never loads it
    refusal = url_refusal(policy, url)
    if refusal is not None:
        raise MediaError(*refusal)
    parts = urlsplit(url)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise MediaError("fetch_failed", f"cannot resolve {parts.hostname}: {e.strerror}") from None
    ips = [info[4][0] for info in infos if policy.address_allowed(info[4][0], parts.hostname, port)]
    if not ips:
        raise MediaError("url_not_allowed", only_refused_addresses(parts.hostname))
    timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
    if https:
        return urllib3.HTTPSConnectionPool(ips[0], port, timeout=timeout, retries=False, maxsize=PARALLEL,
                                           block=False, server_hostname=parts.hostname, assert_hostname=parts.hostname)
    return urllib3.HTTPConnectionPool(ips[0], port, timeout=timeout, retries=False, maxsize=PARALLEL, block=False)


class BlockReader:
    """Blocks of one source, fetched on demand and kept (LRU) for every file opened on it: the decoders of one
    video share what they read (the container index above all). Subclasses fetch ``[start, end)``."""

    max_ahead = MAX_AHEAD  # blocks a read-ahead may take at once

    def __init__(self, size: int, reads: Reads):
        self.size, self.reads = size, reads
        self.blocks: OrderedDict[int, bytes] = OrderedDict()
        self.cached = 0
        self.lock = threading.Lock()

    def open(self) -> BlockFile:
        return BlockFile(self)

    def close(self) -> None:
        pass

    def _get(self, start: int, end: int) -> bytes:
        raise NotImplementedError

    def block(self, index: int, ahead: int) -> tuple[bytes, bool]:
        """Block ``index`` and whether it had to be fetched (then with up to ``ahead - 1`` blocks after it)."""
        with self.lock:
            data = self.blocks.get(index)
            if data is not None:
                self.blocks.move_to_end(index)
                return data, False
        last = (self.size - 1) // BLOCK
        stop = min(last + 1, index + ahead)
        with self.lock:  # do not fetch again what is cached further on
            for j in range(index + 1, stop):
                if j in self.blocks:
                    stop = j
                    break
        data = self._get(index * BLOCK, min(self.size, stop * BLOCK))
        with self.lock:
            for j in range(index, stop):
                chunk = data[(j - index) * BLOCK:(j - index + 1) * BLOCK]
                if j not in self.blocks:
                    self.blocks[j] = chunk
                    self.cached += len(chunk)
            while self.cached > CACHE_BYTES and len(self.blocks) > 1:
                _, old = self.blocks.popitem(last=False)
                self.cached -= len(old)
        return data[:BLOCK], True


class LocalReader(BlockReader):
    """A local file, read with ``pread`` (read-ahead up to 256 KiB: a read costs no round trip here, and the
    count stays close to what the decoder needs)."""

    max_ahead = 16

    def __init__(self, path: str, reads: Reads):
        self.fd = os.open(path, os.O_RDONLY)
        super().__init__(os.fstat(self.fd).st_size, reads)

    def close(self) -> None:
        os.close(self.fd)

    def _get(self, start: int, end: int) -> bytes:
        data = os.pread(self.fd, end - start, start)
        self.reads.add(len(data))
        return data


class RangedReader(BlockReader):
    """A :class:`RangedURL`, read with ranged GETs (module doc)."""

    def __init__(self, source: RangedURL, reads: Reads):
        super().__init__(source.size, reads)
        self.source = source
        parts = urlsplit(source.url)
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.host = parts.netloc.rpartition("@")[2]
        self.pool = _connect(source.url, AddressPolicy(list(source.allowed_hosts)), source.timeout_s)
        self.budget = 2 * source.size + BLOCK
        for j in range(len(source.head) // BLOCK):  # what the gateway's first GET got: whole blocks only
            self.blocks[j] = source.head[j * BLOCK:(j + 1) * BLOCK]
            self.cached += BLOCK
        if source.head:
            reads.add(len(source.head))

    def close(self) -> None:
        self.pool.close()

    def prefetch(self, spans: list[tuple[int, int]]) -> None:
        """Fetch the blocks of byte spans ``[start, end)`` not cached yet, :data:`PARALLEL` GETs at a time: the
        packets a decode will read after its seeks (keyframes at known index positions) cost one round trip,
        not one per seek."""
        wanted = sorted({b for start, end in spans for b in range(max(0, start) // BLOCK,
                                                                   (min(end, self.size) - 1) // BLOCK + 1)})
        with self.lock:
            wanted = [b for b in wanted if b not in self.blocks]
        groups: list[list[int]] = []
        for b in wanted:  # contiguous blocks: one GET
            if groups and b == groups[-1][-1] + 1 and len(groups[-1]) < self.max_ahead:
                groups[-1].append(b)
            else:
                groups.append([b])
        if len(groups) < 2:
            return  # nothing to overlap: read on demand
        with ThreadPoolExecutor(min(PARALLEL, len(groups)), thread_name_prefix="framewise-range") as pool:
            for f in [pool.submit(self.block, g[0], len(g)) for g in groups]:
                f.result()

    def _get(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``, refused unless the origin sends exactly them, of the pinned version."""
        import urllib3

        src = self.source
        if self.reads.bytes + (end - start) > self.budget:
            raise MediaError("fetch_failed", f"reading {src.url} took more than twice its size; stopped")
        headers = {"Host": self.host, "Range": f"bytes={start}-{end - 1}", "User-Agent": "framewise-media-fetcher",
                   "Accept-Encoding": "identity"}
        if src.etag:
            headers["If-Match"] = src.etag
        elif src.last_modified:
            headers["If-Unmodified-Since"] = src.last_modified
        try:
            resp = self.pool.request("GET", self.target, headers=headers, redirect=False, preload_content=False)
        except urllib3.exceptions.HTTPError as e:
            raise MediaError("fetch_failed", f"a ranged read of {src.url} failed: {e}") from None
        try:
            if resp.status == 412:
                raise MediaError("fetch_failed", f"{src.url} changed while it was being read (412 to If-Match)")
            if resp.status != 206:
                raise MediaError("fetch_failed", f"{src.url} answered HTTP {resp.status} to a ranged read")
            expected = f"bytes {start}-{end - 1}/{src.size}"
            if resp.headers.get("Content-Range", "").replace(" ", "") != expected.replace(" ", ""):
                raise MediaError("fetch_failed", f"{src.url} sent the range {resp.headers.get('Content-Range')!r} "
                                 f"for {expected!r}")
            for name, pinned in (("ETag", src.etag), ("Last-Modified", src.last_modified)):
                if pinned and resp.headers.get(name, pinned) != pinned:
                    raise MediaError("fetch_failed", f"{src.url} changed while it was being read ({name})")
            data = resp.read(end - start + 1, decode_content=False)
        except urllib3.exceptions.HTTPError as e:
            raise MediaError("fetch_failed", f"a ranged read of {src.url} failed: {e}") from None
        finally:
            resp.release_conn()
        if len(data) != end - start:
            raise MediaError("fetch_failed", f"{src.url} sent {len(data)} bytes for a range of {end - start}")
        self.reads.add(len(data))
        return data


class BlockFile(io.RawIOBase):
    """A seekable file over a :class:`BlockReader`; reads that run on sequentially fetch more blocks at once."""

    def __init__(self, reader: BlockReader):
        super().__init__()
        self.reader, self.pos, self.ahead, self.next_block = reader, 0, 1, -1

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        size = self.reader.size
        self.pos = max(0, offset if whence == os.SEEK_SET else self.pos + offset if whence == os.SEEK_CUR
                       else size + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        size = self.reader.size
        if n is None or n < 0:
            n = size - self.pos
        pieces = []
        while n > 0 and self.pos < size:
            index, within = divmod(self.pos, BLOCK)
            # read-ahead starts at one block after a jump and doubles with each fetch while reads run on in order:
            # what is fetched beyond what is read stays below what was read since the jump
            if index not in (self.next_block, self.next_block - 1):
                self.ahead = 1
            data, fetched = self.reader.block(index, self.ahead)
            if fetched:
                self.ahead = min(self.reader.max_ahead, self.ahead * 2)
            self.next_block = index + 1
            piece = data[within:within + n]
            pieces.append(piece)
            self.pos += len(piece)
            n -= len(piece)
        # one block (FFmpeg's reads mostly are): its slice as it is, no second copy
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class Opener:
    """Opens file objects on one source for one decode, all counted in :attr:`reads`."""

    def __init__(self, source: str | RangedURL):
        self.source, self.reads = source, Reads()
        try:
            self.reader = RangedReader(source, self.reads) if isinstance(source, RangedURL) \
                else LocalReader(source, self.reads)
        except FileNotFoundError as e:
            raise MediaError("invalid_video", f"the video file is gone ({e.filename})") from None
        self._files: list[io.RawIOBase] = []

    def open(self) -> io.RawIOBase:
        f = self.reader.open()
        self._files.append(f)
        return f

    def prefetch(self, spans: list[tuple[int, int]]) -> None:
        """Byte spans the decode is about to read: fetched in parallel from an origin (a local file: nothing)."""
        if isinstance(self.reader, RangedReader):
            self.reader.prefetch(spans)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self.reader.close()
