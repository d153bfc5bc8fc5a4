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
import ipaddress
import os
import re
import socket
import tempfile
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver

from framewise.server.errors import APIError


@dataclass
class Fetched:
    path: str
    sha256: str
    size: int
    seconds: float
    content_type: str | None


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


def _nets(*cidrs: str) -> tuple:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# Not globally routable unicast, although Python's ``is_global`` may say otherwise for some
# (e.g. 2002::/16, fec0::/10, 64:ff9b::/96 and 192.0.0.9 are "global" to Python 3.11).
REFUSED_V4 = _nets(
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",  # 240/4 includes the broadcast 255.255.255.255
)
GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
REFUSED_V6 = _nets(
    "2001::/23",  # IETF protocol assignments: Teredo 2001::/32, benchmarking, ORCHID(v2), AMT, ...
    "2001:db8::/32", "3fff::/20",  # documentation
    "2002::/16",  # 6to4: tunnels to the IPv4 address in bits 16-48
    # outside 2000::/3, refused anyway; listed for the record:
    "::/96", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "fc00::/7", "fe80::/10",
    "fec0::/10", "ff00::/8", "5f00::/16",
)


_V4_PART = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")


def numeric_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address ``host`` names under ``inet_aton(3)`` rules, or None when it is not such a number.

    One to four dot-separated numbers, each decimal, hexadecimal (``0x``) or octal (a leading ``0``); the
    last fills the bytes left (``127.1`` is 127.0.0.1, ``2130706433`` and ``0x7f000001`` are too). As
    glibc's ``inet_aton``, anything after ASCII whitespace is ignored; a trailing dot (``127.0.0.1.``,
    which URL parsers read as the address) is accepted too. Computed here, so the SSRF policy does not
    depend on what a library version leaves to ``getaddrinfo``."""
    host = re.split(r"[ \t\n\v\f\r]", host, maxsplit=1)[0]
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    if not 1 <= len(parts) <= 4 or not all(_V4_PART.fullmatch(p) for p in parts):
        return None
    values = [int(p, 16) if p[1:2] in ("x", "X") else int(p, 8) if p.startswith("0") else int(p) for p in parts]
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    value = last
    for i, v in enumerate(head):
        value |= v << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _isatap_v4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an ISATAP interface identifier (``::0:5efe:a.b.c.d``, ``::200:5efe:...``) embeds."""
    value = int(addr)
    if (value >> 32) & 0xFDFFFFFF == 0x00005EFE:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return None


def is_public_address(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable unicast, and no IPv4 embedded in it that would itself be refused."""
    if isinstance(addr, ipaddress.IPv4Address):
        return addr.is_global and not any(addr in net for net in REFUSED_V4)
    if addr not in GLOBAL_UNICAST_V6 or any(addr in net for net in REFUSED_V6) or not addr.is_global:
        return False
    embedded = _isatap_v4(addr)
    return embedded is None or is_public_address(embedded)


class AddressPolicy:
    def __init__(self, allowed: list[str]):
        self.hosts: set[str] = set()
        self.host_ports: set[tuple[str, int]] = set()
        self.networks: list[ipaddress._BaseNetwork] = []
        for item in allowed:
            item = item.strip().lower()
            if not item:
                continue
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
                continue
            except ValueError:
                pass
            host, sep, port = item.rpartition(":")
            if sep and port.isdigit() and not item.endswith("]"):
                self.host_ports.add((host.strip("[]"), int(port)))
            else:
                self.hosts.add(item.strip("[]"))

    def host_allowed(self, host: str, port: int) -> bool:
        host = host.lower().strip("[]")
        return host in self.hosts or (host, port) in self.host_ports

    def address_allowed(self, ip: str, host: str, port: int) -> bool:
        """The allow-list (host, ``host:port``, CIDR; an IPv4-mapped address counts as its IPv4
        address there), else :func:`is_public_address`."""
        try:
            addr = ipaddress.ip_address(ip.split("%")[0])
        except ValueError:
            return False
        if self.host_allowed(host, port) or self.host_allowed(str(addr), port):
            return True
        listed = [addr]
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            listed.append(addr.ipv4_mapped)
            if self.host_allowed(str(addr.ipv4_mapped), port):
                return True
        if any(a in net for a in listed for net in self.networks if a.version == net.version):
            return True
        return is_public_address(addr)


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
            raise RefusedAddress(f"{host} resolves only to addresses that are not allowed")
        return out

    async def close(self) -> None:
        return None


def _refused(url: str, why: str) -> APIError:
    return APIError(400, "url_not_allowed", f"refusing to fetch {url}: {why}", "messages")


class MediaFetcher:
    MAX_VALIDATORS = 4096  # URLs whose validators are kept (LRU)

    def __init__(self, allowed_hosts: list[str], *, timeout_s: float, max_redirects: int, spool_dir: str):
        self._validators: OrderedDict[str, Validators] = OrderedDict()
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
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:  # e.g. a port that is not a number, an unclosed IPv6 bracket
            raise APIError(400, "invalid_url", f"cannot parse the media URL {url!r}: {e}", "messages") from None
        if parts.scheme not in ("http", "https"):
            raise _refused(url, f"scheme {parts.scheme!r} is not allowed")
        if not parts.hostname:
            raise _refused(url, "no host")
        v4 = numeric_ipv4(parts.hostname)
        if v4 is not None:  # any spelling of an IPv4 address (dotted quad or not) is checked as that address
            if not self.policy.address_allowed(str(v4), str(v4), port):
                raise _refused(url, f"{parts.hostname} is the address {v4}, which is not allowed")
            return
        try:
            ipaddress.ip_address(parts.hostname)
        except ValueError:
            return  # a name: checked by the resolver on connect
        if not self.policy.address_allowed(parts.hostname, parts.hostname, port):
            raise _refused(url, "the address is not allowed")

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
                    timeout_s: float | None = None, early: Early | None = None) -> Fetched | Deferred | None:
        """Download ``url`` to a spool file within ``timeout_s`` (default: the fetcher's). With ``unless``, a
        conditional GET: ``None`` when the server answers 304 (the bytes ``unless`` describes are still
        current). With ``early``: :class:`Deferred` when it stopped the download (module doc)."""
        assert self._session is not None
        timeout_s = timeout_s or self.timeout_s
        start = time.perf_counter()
        deadline = start + timeout_s
        first_url = url
        conditional = unless.headers() if unless is not None else {}
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
                        if resp.status != 200:
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
