"""Fetch media over HTTP(S) without becoming an SSRF proxy.

- Every host is resolved by a resolver that refuses loopback, private,
  link-local, multicast, reserved and unspecified addresses; the connection uses
  the checked address (no second lookup to rebind). IP-literal URLs are checked
  the same way.
- Redirects are followed by hand, each hop re-checked, at most ``max_redirects``.
- ``allowed_hosts`` (hosts, ``host:port`` or CIDRs) is the only way to reach a
  refused address, e.g. a test server on 127.0.0.1.
- The body streams to disk with a byte cap and a total timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver

from server.errors import APIError


@dataclass
class Fetched:
    path: str
    sha256: str
    size: int
    seconds: float
    content_type: str | None


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
        addr = ipaddress.ip_address(ip.split("%")[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        if self.host_allowed(host, port) or self.host_allowed(str(addr), port):
            return True
        if any(addr in net for net in self.networks):
            return True
        return addr.is_global and not (addr.is_multicast or addr.is_reserved or addr.is_unspecified)


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
    def __init__(self, allowed_hosts: list[str], *, timeout_s: float, max_redirects: int, spool_dir: str):
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
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise _refused(url, f"scheme {parts.scheme!r} is not allowed")
        if not parts.hostname:
            raise _refused(url, "no host")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            ipaddress.ip_address(parts.hostname)
        except ValueError:
            return  # a name: checked by the resolver on connect
        if not self.policy.address_allowed(parts.hostname, parts.hostname, port):
            raise _refused(url, "the address is not allowed")

    async def fetch(self, url: str, max_bytes: int) -> Fetched:
        assert self._session is not None
        start = time.perf_counter()
        deadline = start + self.timeout_s
        try:
            async with asyncio.timeout(self.timeout_s):
                for _ in range(self.max_redirects + 1):
                    self._check_url(url)
                    try:
                        resp = await self._session.get(url, allow_redirects=False)
                    except RefusedAddress as e:
                        raise _refused(url, str(e)) from None
                    except aiohttp.ClientConnectorError as e:
                        if isinstance(e.os_error, RefusedAddress):
                            raise _refused(url, str(e.os_error)) from None
                        raise APIError(400, "fetch_failed", f"cannot connect to {url}: {e.os_error}",
                                       "messages") from None
                    async with resp:
                        if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                            url = urljoin(url, resp.headers["Location"])
                            continue
                        if resp.status != 200:
                            raise APIError(400, "fetch_failed", f"{url} answered HTTP {resp.status}", "messages")
                        if resp.content_length is not None and resp.content_length > max_bytes:
                            raise APIError(413, "media_too_large", f"{url} is {resp.content_length} bytes; the "
                                           f"limit is {max_bytes}", "messages")
                        return await self._spool(resp, url, max_bytes, start)
                raise _refused(url, f"more than {self.max_redirects} redirects")
        except TimeoutError:
            raise APIError(504, "fetch_timeout", f"fetching the media took longer than {self.timeout_s:.0f}s",
                           "messages") from None
        except aiohttp.ClientError as e:
            left = deadline - time.perf_counter()
            raise APIError(400 if left > 0 else 504, "fetch_failed", f"fetching {url} failed: {e}",
                           "messages") from None

    async def _spool(self, resp, url: str, max_bytes: int, start: float) -> Fetched:
        digest = hashlib.sha256()
        size = 0
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
        except BaseException:
            os.unlink(path)
            raise
        return Fetched(path, digest.hexdigest(), size, time.perf_counter() - start,
                       resp.headers.get("Content-Type"))
