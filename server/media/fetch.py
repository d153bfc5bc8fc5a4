"""Fetch media over HTTP(S) without becoming an SSRF proxy.

- Only globally routable unicast addresses are reached (:func:`is_public_address`):
  every host is resolved by a resolver that drops every other address, and the
  connection uses the checked address (no second lookup to rebind). IP-literal
  URLs are checked the same way, and so is every host that the C library's
  ``inet_aton`` reads as an IPv4 address (``2130706433``, ``0x7f000001``,
  ``017700000001``, ``127.1``: :func:`numeric_ipv4`), whatever the HTTP client
  makes of it (aiohttp before 3.14 connected to such a host without resolving
  it, so the resolver never saw it). IPv6 ranges that embed or tunnel to an IPv4
  address (6to4, Teredo, NAT64, IPv4-mapped/-compatible, ISATAP with a
  non-public IPv4) are refused, and so are site-local, ORCHID, documentation,
  benchmarking and shared (CGNAT) ranges.
- Redirects are followed by hand, each hop re-checked, at most ``max_redirects``.
- ``allowed_hosts`` (hosts, ``host:port`` or CIDRs) is the only way to reach a
  refused address, e.g. a test server on 127.0.0.1.
- The body streams to disk with a byte cap and a total timeout.
- A URL fetched before is revalidated, not downloaded again, when its response carried a
  strong validator (a strong ``ETag``, or a ``Last-Modified`` at least one second before its
  ``Date``, RFC 9110 8.8) and no ``Cache-Control: no-store``: the conditional GET's ``304`` means
  the same bytes, so the content hash (and the frames cached under it) still hold.
- ``early`` lets the caller stop a download it does not need whole (a video that will run as a job: the
  worker fetches it): asked once with the response's ``Content-Length`` before any byte is read, then at
  :data:`PROBE_AT` with the bytes so far (the container header of a video whose index comes first), until it
  answers. Failures worth another try (timeouts, connection errors, origin 5xx/408/429) are marked
  ``transient`` (a job retries them, server/chat/media.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import socket
import tempfile
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin

import aiohttp
from aiohttp.abc import AbstractResolver

from framewise.server.errors import APIError
from framewise.server.media.addresses import (  # noqa: F401 - re-exported: the policy's home before it moved
    GLOBAL_UNICAST_V6,
    REFUSED_V4,
    REFUSED_V6,
    AddressPolicy,
    is_public_address,
    numeric_ipv4,
    only_refused_addresses,
    refused,
    url_refusal,
)


@dataclass
class Fetched:
    path: str
    sha256: str
    size: int
    seconds: float
    content_type: str | None


@dataclass
class Ranged:
    """A URL not downloaded: its origin serves byte ranges of it, with a strong validator, and it is large
    enough to be read in ranges by the decoder (``server/media/readers.py``). ``url`` is the final URL (after
    checked redirects); ``sha256`` names the bytes (URL + validator + size), not their content."""

    url: str
    size: int
    etag: str | None
    last_modified: str | None
    sha256: str
    seconds: float
    head: bytes = field(default=b"", repr=False)  # the first bytes, got with the answer that showed ranges work


@dataclass
class Deferred:
    """A download stopped by ``early``: its reason (what ``early`` said), nothing kept."""

    reason: str
    content_length: int | None
    seconds: float


# early(content_length, path of the bytes so far or None before the body, bytes so far) -> a reason to stop
# (str), False (download the rest, ask no more) or None (ask again at the next checkpoint)
Early = Callable[[int | None, str | None, int], Awaitable[str | bool | None]]
PROBE_AT = (1 << 20, 4 << 20, 16 << 20)
FIRST_RANGE = 64 << 10  # the first bytes read of a video then read in ranges (the decoder's first block)
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


def transient(e: APIError) -> APIError:
    """Marks a fetch failure another try may get past."""
    e.transient = True
    return e


@dataclass(frozen=True)
class Validators:
    """What a URL's last full response said about its bytes: enough for a conditional GET."""

    sha256: str
    size: int
    etag: str | None
    last_modified: str | None
    ranged: bool = False  # the bytes were read in ranges (``sha256`` names them, it is not their hash)

    def headers(self) -> dict[str, str]:
        if self.etag:
            return {"If-None-Match": self.etag}
        return {"If-Modified-Since": self.last_modified or ""}


def strong_validators(headers, sha256: str, size: int) -> Validators | None:
    """The response's strong validators (RFC 9110 8.8.1-8.8.3), or None: a weak ``ETag`` and a
    ``Last-Modified`` less than a second before ``Date`` could stand for different bytes."""
    if "no-store" in headers.get("Cache-Control", "").lower():
        return None
    etag = headers.get("ETag")
    if etag and (etag.startswith("W/") or not etag.startswith('"')):
        etag = None
    last_modified = headers.get("Last-Modified")
    if last_modified:
        try:
            lm, date = parsedate_to_datetime(last_modified), parsedate_to_datetime(headers.get("Date", ""))
            if (date - lm).total_seconds() < 1:
                last_modified = None
        except (TypeError, ValueError):
            last_modified = None
    if not etag and not last_modified:
        return None
    return Validators(sha256, size, etag, last_modified)


def _content_range(content_range: str | None) -> tuple[int, int, int] | None:
    """``(first, last, size)`` of ``Content-Range: bytes <first>-<last>/<size>``, None unless well-formed."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+)\s*", content_range or "")
    if m is None:
        return None
    first, last, size = (int(g) for g in m.groups())
    return (first, last, size) if first <= last < size else None


class RefusedAddress(OSError):
    pass


class GuardedResolver(AbstractResolver):
    """Resolves, then drops every address the policy refuses."""

    def __init__(self, policy: AddressPolicy):
        self.policy = policy

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, family=family)
        except socket.gaierror as e:
            raise OSError(f"cannot resolve {host}: {e.strerror}") from e
        out = []
        for fam, _, proto, _, sockaddr in infos:
            ip = sockaddr[0]
            if self.policy.address_allowed(ip, host, port):
                out.append({"hostname": host, "host": ip, "port": port, "family": fam, "proto": proto,
                            "flags": socket.AI_NUMERICHOST})
        if not out:
            raise RefusedAddress(only_refused_addresses(host))
        return out

    async def close(self) -> None:
        return None


def _refused(url: str, why: str) -> APIError:
    return APIError(400, *refused(url, why), "messages")


def check_url(policy: AddressPolicy, url: str) -> None:
    """Refuses (400) what :func:`~server.media.addresses.url_refusal` refuses."""
    refusal = url_refusal(policy, url)
    if refusal is not None:
        raise APIError(400, *refusal, "messages")


class MediaFetcher:
    MAX_VALIDATORS = 4096  # URLs whose validators are kept (LRU)

    def __init__(self, allowed_hosts: list[str], *, timeout_s: float, max_redirects: int, spool_dir: str):
        self._validators: OrderedDict[str, Validators] = OrderedDict()
        self.allowed_hosts = tuple(allowed_hosts)
        self.policy = AddressPolicy(allowed_hosts)
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.spool_dir = spool_dir
        os.makedirs(spool_dir, exist_ok=True)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.policy), use_dns_cache=False, limit=64)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              headers={"User-Agent": "framewise-media-fetcher"})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _check_url(self, url: str) -> None:
        check_url(self.policy, url)

    def validators(self, url: str) -> Validators | None:
        """What the last full fetch of ``url`` can be revalidated with, if anything."""
        return self._validators.get(url)

    def _remember(self, url: str, validators: Validators | None) -> None:
        self._validators.pop(url, None)
        if validators is not None:
            self._validators[url] = validators
            while len(self._validators) > self.MAX_VALIDATORS:
                self._validators.popitem(last=False)

    async def fetch(self, url: str, max_bytes: int, *, unless: Validators | None = None,
                    timeout_s: float | None = None, early: Early | None = None,
                    ranged_from: int | None = None) -> Fetched | Deferred | Ranged | None:
        """Download ``url`` to a spool file within ``timeout_s`` (default: the fetcher's). With ``unless``, a
        conditional GET: ``None`` when the server answers 304 (the bytes ``unless`` describes are still
        current). With ``early``: :class:`Deferred` when it stopped the download (module doc). With
        ``ranged_from``: the GET asks ``Range: bytes=0-``; when the origin answers 206 with a strong validator for
        a file of at least ``ranged_from`` bytes, only its first :data:`FIRST_RANGE` bytes are read and the file is
        not downloaded (:class:`Ranged`: the decoder reads what it needs). Anything else is downloaded from the same
        answer, in one request, as a 200 is (a 206 for ``0-`` is the whole file)."""
        assert self._session is not None
        timeout_s = timeout_s or self.timeout_s
        start = time.perf_counter()
        deadline = start + timeout_s
        first_url = url
        conditional = unless.headers() if unless is not None else {}
        if ranged_from is not None:
            conditional["Range"] = "bytes=0-"
        try:
            async with asyncio.timeout(timeout_s):
                for _ in range(self.max_redirects + 1):
                    self._check_url(url)
                    try:
                        resp = await self._session.get(url, allow_redirects=False, headers=conditional)
                    except RefusedAddress as e:
                        raise _refused(url, str(e)) from None
                    except aiohttp.ClientConnectorError as e:
                        if isinstance(e.os_error, RefusedAddress):
                            raise _refused(url, str(e.os_error)) from None
                        raise transient(APIError(400, "fetch_failed", f"cannot connect to {url}: {e.os_error}",
                                                 "messages")) from None
                    async with resp:
                        if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                            url = urljoin(url, resp.headers["Location"])
                            continue
                        if resp.status == 304 and unless is not None:
                            if first_url in self._validators:
                                self._validators.move_to_end(first_url)
                            return None
                        if resp.status == 416 and "Range" in conditional:  # an empty file: ask again, whole
                            conditional.pop("Range")
                            ranged_from = None
                            continue
                        if resp.status == 206 and ranged_from is not None:
                            ranged = await self._ranged(resp, first_url, url, max_bytes, ranged_from, start)
                            if ranged is not None:
                                return ranged
                            _, last, total = _content_range(resp.headers["Content-Range"])  # checked: well-formed
                            if last + 1 < total:  # part of it only (an origin capping ranges): ask again, whole
                                conditional.pop("Range")
                                ranged_from = None
                                continue
                        elif resp.status != 200:
                            e = APIError(400, "fetch_failed", f"{url} answered HTTP {resp.status}", "messages")
                            raise transient(e) if resp.status in TRANSIENT_STATUS else e
                        if resp.content_length is not None and resp.content_length > max_bytes:
                            raise APIError(413, "media_too_large", f"{url} is {resp.content_length} bytes; the "
                                           f"limit is {max_bytes}", "messages")
                        if early is not None and isinstance(reason := await early(resp.content_length, None, 0),
                                                            str):
                            return Deferred(reason, resp.content_length, time.perf_counter() - start)
                        got = await self._spool(resp, url, max_bytes, start, early)
                        if isinstance(got, Fetched):
                            self._remember(first_url, strong_validators(resp.headers, got.sha256, got.size))
                        return got
                raise _refused(url, f"more than {self.max_redirects} redirects")
        except TimeoutError:
            raise transient(APIError(504, "fetch_timeout", f"fetching the media took longer than {timeout_s:.0f}s",
                                     "messages")) from None
        except aiohttp.ClientError as e:
            left = deadline - time.perf_counter()
            raise transient(APIError(400 if left > 0 else 504, "fetch_failed", f"fetching {url} failed: {e}",
                                     "messages")) from None

    async def _ranged(self, resp, first_url: str, url: str, max_bytes: int, ranged_from: int,
                      start: float) -> Ranged | None:
        """The 206 answer to ``Range: bytes=0-``: a :class:`Ranged` URL (its first bytes kept, the rest of the
        answer dropped: the connection is closed), or None (download it: too small, or no strong validator)."""
        got = _content_range(resp.headers.get("Content-Range"))
        if got is None or got[0] != 0:
            raise APIError(400, "fetch_failed", f"{url} answered 206 with Content-Range "
                           f"{resp.headers.get('Content-Range')!r} to a request for all its bytes", "messages")
        total = got[2]
        if total > max_bytes:
            raise APIError(413, "media_too_large", f"{url} is {total} bytes; the limit is {max_bytes}", "messages")
        pinned = strong_validators(resp.headers, "", total)
        if total < ranged_from or pinned is None:
            return None
        try:
            head = await resp.content.readexactly(min(FIRST_RANGE, got[1] + 1))
        except asyncio.IncompleteReadError as e:
            raise APIError(400, "fetch_failed", f"{url} sent {len(e.partial)} bytes, then stopped",
                           "messages") from None
        resp.close()  # what the origin sent on meanwhile is dropped (at most what the network held in flight)
        identity = f"ranged\n{url}\n{pinned.etag}\n{pinned.last_modified}\n{total}"
        sha = hashlib.sha256(identity.encode()).hexdigest()
        self._remember(first_url, replace(pinned, sha256=sha, ranged=True))
        return Ranged(url, total, pinned.etag, pinned.last_modified, sha, time.perf_counter() - start, head)

    async def _spool(self, resp, url: str, max_bytes: int, start: float, early: Early | None = None
                     ) -> Fetched | Deferred:
        digest = hashlib.sha256()
        size = 0
        length = resp.content_length
        # checkpoints at which `early` looks at the bytes so far: none the whole body will soon pass anyway
        checks = [n for n in PROBE_AT if length is None or length >= 2 * n] if early is not None else []
        fd, path = tempfile.mkstemp(dir=self.spool_dir, prefix="fetch-")
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in resp.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > max_bytes:
                        raise APIError(413, "media_too_large", f"{url} exceeds the limit of {max_bytes} bytes",
                                       "messages")
                    digest.update(chunk)
                    f.write(chunk)
                    if checks and size >= checks[0]:
                        while checks and size >= checks[0]:
                            checks.pop(0)
                        f.flush()
                        verdict = await early(length, path, size)
                        if isinstance(verdict, str):
                            os.unlink(path)
                            return Deferred(verdict, length, time.perf_counter() - start)
                        if verdict is False:
                            checks = []
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        return Fetched(path, digest.hexdigest(), size, time.perf_counter() - start,
                       resp.headers.get("Content-Type"))
