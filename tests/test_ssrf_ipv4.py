"""The SSRF check reads every IPv4 spelling itself (issue 21, item 7): a host that ``inet_aton`` takes for an
IPv4 address (``2130706433``, ``0x7f000001``, ``017700000001``, ``127.1``, ...) is checked as that address,
whatever the HTTP client does with it. aiohttp before 3.14 took an all-digit host for an IP literal and
connected to it without asking the resolver (so the resolver's check never ran); the tests through
MediaFetcher switch aiohttp's own later check off to stand for those versions."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import tomllib

import aiohttp
import aiohttp.connector
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from framewise.server.errors import APIError
from framewise.server.media.fetch import MediaFetcher, numeric_ipv4
from tests.conftest import ROOT

LOOPBACK_SPELLINGS = ["2130706433", "0x7f000001", "0X7F000001", "017700000001", "127.1", "127.0.1", "0x7f.1",
                      "0x7f.0.0.1", "0177.0.0.1", "0177.1", "127.000.000.001", "0x7f.0x0.0x0.0x1", "127.0.0.1."]
OTHER_REFUSED = {"0": "0.0.0.0", "167772161": "10.0.0.1", "0xa9fea9fe": "169.254.169.254",
                 "0300.0250.1": "192.168.0.1", "4294967295": "255.255.255.255", "0xc0.0xa8.0x0.0x1": "192.168.0.1"}
NOT_NUMBERS = ["example.com", "0x", "0x.1", "08", "09.1", "1.2.3.4.5", "4294967296", "256.1", "1.16777216",
               "1.2.3.0400", "+1", "-1", "1e3", "0x7g", "", ".", "1..2", " 127.1", "127.0.0.1/", "::1"]


def test_numeric_ipv4_reads_what_inet_aton_reads():
    """The same answer as the C library's inet_aton for every string it reads (and for every one it
    refuses), except a trailing dot, which URL parsers read as the address and which is accepted too."""
    for host in LOOPBACK_SPELLINGS:
        assert numeric_ipv4(host) == ipaddress.IPv4Address("127.0.0.1"), host
    for host, ip in OTHER_REFUSED.items():
        assert numeric_ipv4(host) == ipaddress.IPv4Address(ip), host
    for host in NOT_NUMBERS:
        assert numeric_ipv4(host) is None, host
    for host in LOOPBACK_SPELLINGS + list(OTHER_REFUSED) + NOT_NUMBERS + ["8.8.8.8", "134744072", "1.2.3.0377",
                                                                          "127.1 trailing", "127.1\tx"]:
        try:
            libc = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            libc = None
        if not host.endswith("."):
            assert numeric_ipv4(host) == libc, host


def _fetcher(tmp_path, allowed=()) -> MediaFetcher:
    return MediaFetcher(list(allowed), timeout_s=10, max_redirects=3, spool_dir=str(tmp_path / "spool"))


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS + list(OTHER_REFUSED))
def test_the_url_check_refuses_every_spelling_of_a_refused_address(host, tmp_path):
    """The policy check itself, before any client code runs."""
    with pytest.raises(APIError) as e:
        _fetcher(tmp_path)._check_url(f"http://{host}:8080/v.mp4")
    assert (e.value.status, e.value.code) == (400, "url_not_allowed")


def test_a_spelling_of_an_allowed_address_is_checked_as_that_address(tmp_path):
    fetcher = _fetcher(tmp_path, allowed=("127.0.0.1:8080",))
    fetcher._check_url("http://2130706433:8080/v.mp4")  # the allow-list entry, spelled otherwise
    fetcher._check_url("http://134744072/v.mp4")  # 8.8.8.8: public
    with pytest.raises(APIError):
        fetcher._check_url("http://2130706433:8081/v.mp4")


class ConnectSpy:
    """Records every connect (aiohttp connects through ``loop.sock_connect``) and refuses it."""

    def __init__(self, loop):
        self.attempts: list = []
        self.loop, self._connect = loop, loop.sock_connect
        loop.sock_connect = self.sock_connect

    async def sock_connect(self, sock, address):
        self.attempts.append(address)
        raise ConnectionRefusedError(f"test: no traffic to {address}")

    def close(self) -> None:
        self.loop.sock_connect = self._connect


@pytest.fixture
def aiohttp_before_3_14(monkeypatch):
    """aiohttp as it was before 3.14: a host of digits and dots is an IP literal, used as given."""
    if hasattr(aiohttp.connector, "is_canonical_ipv4_address"):
        monkeypatch.setattr(aiohttp.connector, "is_canonical_ipv4_address", lambda host: True)


@pytest.mark.parametrize("host", ["2130706433", "017700000001", "127.1", "0x7f000001", "0x7f.1", "167772161"])
def test_fetching_any_spelling_of_loopback_is_refused_without_a_connect(host, tmp_path, aiohttp_before_3_14):
    async def main():
        spy = ConnectSpy(asyncio.get_running_loop())
        fetcher = _fetcher(tmp_path)
        await fetcher.start()
        try:
            with pytest.raises(APIError) as e:
                await fetcher.fetch(f"http://{host}:9/v.mp4", 1 << 20)
        finally:
            await fetcher.close()
            spy.close()
        return e.value, spy.attempts

    error, attempts = asyncio.run(main())
    assert (error.status, error.code) == (400, "url_not_allowed") and attempts == []


def test_the_stand_in_for_old_aiohttp_does_connect_to_numeric_hosts(tmp_path, aiohttp_before_3_14):
    """The control for the fixture above: with the allow-list letting the address through, aiohttp (its own
    check off) connects to the all-digit host -- the path on which only our check stands."""

    async def main():
        spy = ConnectSpy(asyncio.get_running_loop())
        fetcher = _fetcher(tmp_path, allowed=("127.0.0.0/8",))
        await fetcher.start()
        try:
            with pytest.raises(APIError) as e:
                await fetcher.fetch("http://2130706433:9/v.mp4", 1 << 20)
        finally:
            await fetcher.close()
            spy.close()
        return e.value, spy.attempts

    error, attempts = asyncio.run(main())
    assert error.code == "fetch_failed" and len(attempts) == 1  # a connect to the raw host, which the
    assert socket.inet_aton(attempts[0][0]) == bytes([127, 0, 0, 1]) and attempts[0][1] == 9  # kernel reads so


def test_aiohttp_floor_is_the_version_with_its_own_check():
    """Defense in depth: the declared floor is at least aiohttp 3.14 (its canonical-IPv4 check) and the
    installed aiohttp meets it."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [req] = [Requirement(d) for d in deps if Requirement(d).name == "aiohttp"]
    floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert floors and min(floors) >= Version("3.14")
    assert req.specifier.contains(aiohttp.__version__)
