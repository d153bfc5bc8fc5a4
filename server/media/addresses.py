"""Which addresses media may be fetched from (the SSRF policy), without the HTTP client: the gateway's fetcher
(``server/media/fetch.py``) and the decode workers' ranged reads (``server/media/readers.py``) both check here.

- Only globally routable unicast addresses, and none with a refused IPv4 address embedded
  (:func:`is_public_address`); every spelling of an IPv4 address that ``inet_aton`` accepts is that address
  (:func:`numeric_ipv4`).
- ``allowed`` (hosts, ``host:port`` or CIDRs) is the only way to reach a refused address (:class:`AddressPolicy`).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit


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


def refused(url: str, why: str) -> tuple[str, str]:
    """``(code, message)`` of a URL the policy refuses."""
    return "url_not_allowed", f"refusing to fetch {url}: {why}"


def only_refused_addresses(host: str) -> str:
    return f"{host} resolves only to addresses that are not allowed"


def url_refusal(policy: AddressPolicy, url: str) -> tuple[str, str] | None:
    """Why ``url`` is refused before any connection, as ``(code, message)``: not http(s), no host, or a refused
    address named literally (any spelling of an IPv4 address included); None when it may be tried (a host name
    is checked by the resolver when connecting)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:  # e.g. a port that is not a number, an unclosed IPv6 bracket
        return "invalid_url", f"cannot parse the media URL {url!r}: {e}"
    if parts.scheme not in ("http", "https"):
        return refused(url, f"scheme {parts.scheme!r} is not allowed")
    if not parts.hostname:
        return refused(url, "no host")
    v4 = numeric_ipv4(parts.hostname)
    if v4 is not None:  # any spelling of an IPv4 address (dotted quad or not) is checked as that address
        if not policy.address_allowed(str(v4), str(v4), port):
            return refused(url, f"{parts.hostname} is the address {v4}, which is not allowed")
        return None
    try:
        ipaddress.ip_address(parts.hostname)
    except ValueError:
        return None  # a name: checked by the resolver on connect
    if not policy.address_allowed(parts.hostname, parts.hostname, port):
        return refused(url, "the address is not allowed")
    return None
