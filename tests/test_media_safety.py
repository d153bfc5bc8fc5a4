"""Media safety without an engine: the SSRF address policy (no connection is ever attempted to a
refused address), FFmpeg's container/protocol allow-list (playlists never followed), Pillow's
format allow-list, the bearer-token check, and videos whose container states no duration."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import os
import socket
import struct
import subprocess
import threading
import zlib
from pathlib import Path
from types import SimpleNamespace

import av
import httpx
import numpy as np
import pytest
from fastapi import Depends, FastAPI
from PIL import Image

from framewise.server import deps
from framewise.server.errors import APIError, install_error_handlers
from framewise.server.media.fetch import AddressPolicy, MediaFetcher
from framewise.server.video.decode import DecodeLimits, MediaError, probe, sample_video
from framewise.server.video.sampling import FrameSampling, uniform_indices
from framewise.server.video.service import load_image
from framewise.server.video.synth import read_index, write_clip
from tests.gateway_support import RecordingServer

# ---- SSRF: every refused range, no connect attempt ------------------------------------------------

REFUSED = {
    "6to4-loopback": "2002:7f00:1::",
    "6to4-private": "2002:c0a8:101::1",
    "6to4-public": "2002:808:808::1",  # any 6to4: the host's relay would tunnel it
    "site-local": "fec0::1",
    "teredo": "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    "nat64": "64:ff9b::7f00:1",
    "nat64-local": "64:ff9b:1::a00:1",
    "v4-mapped": "::ffff:127.0.0.1",
    "v4-mapped-public": "::ffff:8.8.8.8",
    "v4-compatible": "::127.0.0.1",
    "v4-translated": "::ffff:0:a00:1",
    "orchid": "2001:10::1",
    "orchid-v2": "2001:20::1",
    "benchmark-v6": "2001:2::1",
    "doc-v6": "2001:db8::1",
    "doc-v6-3fff": "3fff::1",
    "isatap-private": "2600:1f00::5efe:a00:1",
    "isatap-loopback-ul": "2600:1f00::200:5efe:7f00:1",
    "srv6-sid": "5f00::1",
    "discard-v6": "100::1",
    "unique-local": "fd00:ec2::254",
    "link-local-v6": "fe80::1",
    "multicast-v6": "ff02::1",
    "loopback-v6": "::1",
    "unspecified-v6": "::",
    "doc-v4-1": "192.0.2.1",
    "doc-v4-2": "198.51.100.7",
    "doc-v4-3": "203.0.113.9",
    "cgnat": "100.64.0.1",
    "benchmark-v4": "198.18.0.1",
    "ietf-v4": "192.0.0.9",
    "ietf-v4-nat64-discovery": "192.0.0.170",
    "6to4-relay": "192.88.99.1",
    "reserved-240": "240.0.0.1",
    "broadcast": "255.255.255.255",
    "this-network": "0.0.0.0",
    "loopback": "127.0.0.1",
    "private-10": "10.0.0.1",
    "private-172": "172.16.0.1",
    "private-192": "192.168.0.1",
    "link-local-metadata": "169.254.169.254",
    "multicast": "224.0.0.1",
}
PUBLIC = {"v4": "93.184.216.34", "v6": "2606:2800:220:1:248:1893:25c8:1946", "isatap-public": "2600:1f00::5efe:808:808"}


def _url_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


class ConnectSpy:
    """Stands in for the event loop's DNS and connect calls (aiohttp connects through
    ``loop.sock_connect``): records every attempt, lets only ``passthrough`` ports through."""

    def __init__(self, loop, dns: dict[str, str], passthrough: set[int] = frozenset()):
        self.attempts: list[tuple] = []
        self.loop, self.dns, self.passthrough = loop, dns, passthrough
        self._connect, self._getaddrinfo = loop.sock_connect, loop.getaddrinfo
        loop.sock_connect, loop.getaddrinfo = self.sock_connect, self.getaddrinfo

    async def sock_connect(self, sock, address):
        self.attempts.append(address)
        if address[1] in self.passthrough:
            return await self._connect(sock, address)
        raise ConnectionRefusedError(f"test: no traffic to {address}")

    async def getaddrinfo(self, host, port, *args, **kwargs):
        if host not in self.dns:
            return await self._getaddrinfo(host, port, *args, **kwargs)
        ip = ipaddress.ip_address(self.dns[host])
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        addr = (str(ip), port, 0, 0) if ip.version == 6 else (str(ip), port)
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", addr)]

    def close(self) -> None:
        self.loop.sock_connect, self.loop.getaddrinfo = self._connect, self._getaddrinfo


def fetch(urls: list[str], tmp_path, *, dns: dict[str, str] | None = None, allowed: tuple[str, ...] = (),
          passthrough: set[int] = frozenset()) -> tuple[list, list]:
    """Fetch each URL with a real MediaFetcher under a ConnectSpy: (outcomes, connect attempts)."""

    async def main():
        spy = ConnectSpy(asyncio.get_running_loop(), dns or {}, passthrough)
        fetcher = MediaFetcher(list(allowed), timeout_s=10, max_redirects=3, spool_dir=str(tmp_path / "spool"))
        await fetcher.start()
        out = []
        try:
            for url in urls:
                try:
                    got = await fetcher.fetch(url, 1 << 20)
                    out.append(("ok", got.size))
                    os.unlink(got.path)
                except APIError as e:
                    out.append((e.status, e.code))
        finally:
            await fetcher.close()
            spy.close()
        return out, spy.attempts

    return asyncio.run(main())


@pytest.mark.parametrize("ip", REFUSED.values(), ids=REFUSED.keys())
def test_refused_ranges_are_never_connected(ip, tmp_path):
    """As an IP literal and as a name resolving to it: 400 url_not_allowed, no connect attempt."""
    assert not AddressPolicy([]).address_allowed(ip, "media.example", 80)
    outcomes, attempts = fetch([f"http://{_url_host(ip)}/v.mp4", "http://media.example/v.mp4"], tmp_path,
                               dns={"media.example": ip})
    assert outcomes == [(400, "url_not_allowed")] * 2
    assert attempts == []


@pytest.mark.parametrize("ip", PUBLIC.values(), ids=PUBLIC.keys())
def test_public_addresses_are_connected(ip, tmp_path):
    """The control for the spy above: an allowed address IS connected to (the spy refuses the
    connection, so the fetch fails) -- so an empty attempt list means nothing was tried."""
    outcomes, attempts = fetch([f"http://{_url_host(ip)}/v.mp4", "http://media.example/v.mp4"], tmp_path,
                               dns={"media.example": ip})
    assert outcomes == [(400, "fetch_failed")] * 2
    assert [a[0] for a in attempts] == [ip, ip]


def test_the_allow_list_is_the_only_way_in(tmp_path):
    outcomes, attempts = fetch(["http://[2002:7f00:1::]/v.mp4", "http://100.64.0.1:8080/v.mp4",
                                "http://100.64.0.1:8081/v.mp4"], tmp_path,
                               allowed=("2002:7f00::/32", "100.64.0.1:8080"))
    assert outcomes == [(400, "fetch_failed"), (400, "fetch_failed"), (400, "url_not_allowed")]
    assert [a[:2] for a in attempts] == [("2002:7f00:1::", 80), ("100.64.0.1", 8080)]


def test_redirects_into_a_refused_range_are_not_followed(tmp_path):
    srv = RecordingServer({"v.mp4": b"\0" * 10})
    try:
        urls = [f"{srv.url}/to?u=http://[2002:7f00:1::]:{srv.port}/v.mp4",
                f"{srv.url}/to?u=http://internal.example:{srv.port}/v.mp4", f"{srv.url}/v.mp4"]
        outcomes, attempts = fetch(urls, tmp_path, dns={"internal.example": "fec0::1"},
                                   allowed=(f"127.0.0.1:{srv.port}",), passthrough={srv.port})
    finally:
        srv.close()
    assert outcomes == [(400, "url_not_allowed"), (400, "url_not_allowed"), ("ok", 10)]
    assert {a[0] for a in attempts} == {"127.0.0.1"}  # only the allow-listed server was ever connected
    assert srv.hits[-1] == "/v.mp4" and len(srv.hits) == 3


@pytest.mark.parametrize("url", ["http://2130706433/v.mp4", "http://0x7f000001/v.mp4", "http://127.1/v.mp4",
                                 "http://[::ffff:7f00:1]/v.mp4", "http://[fe80::1%25lo]/v.mp4"])
def test_obfuscated_loopback_literals_are_refused(url, tmp_path):
    """Numeric forms the URL parser does not see as IP literals: refused by the resolver, or by aiohttp
    itself ("not a canonical IPv4 address"); never connected."""
    outcomes, attempts = fetch([url], tmp_path)
    assert outcomes[0] in ((400, "url_not_allowed"), (400, "fetch_failed")) and attempts == []


@pytest.mark.parametrize("url", ["http://[2002:7f00:1::/v.mp4", "http://media.example:port/v.mp4",
                                 "http://%5B::1%5D:80/v.mp4", "http://[::1]:99999/v.mp4"])
def test_malformed_urls_are_client_errors(url, tmp_path):
    outcomes, attempts = fetch([url], tmp_path)
    assert outcomes[0][0] == 400 and outcomes[0][1] in ("invalid_url", "url_not_allowed") and attempts == []


# ---- FFmpeg: only allow-listed containers, no URL or path inside a file is followed ----------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety-clips")
    base = write_clip(str(d / "base.mp4"), frames=48, fps=24)
    ff = ["ffmpeg", "-loglevel", "error", "-y", "-i", base]
    subprocess.run([*ff, "-c", "copy", "-f", "mpegts", str(d / "seg.ts")], check=True)
    subprocess.run([*ff, "-c", "copy", str(d / "clip.mov")], check=True)
    # no duration in the container: a live Matroska (no Cues, no Duration), a MediaRecorder-like WebM
    subprocess.run([*ff, "-c", "copy", "-live", "1", "-f", "matroska", str(d / "live.mkv")], check=True)
    subprocess.run([*ff, "-c:v", "libvpx", "-deadline", "realtime", "-b:v", "1M", "-live", "1", "-f", "webm",
                    str(d / "live.webm")], check=True)
    write_clip(str(d / "raw.h264"), frames=48, fps=24)  # an elementary stream: no container timestamps
    long = write_clip(str(d / "long.mp4"), frames=300, fps=30, gop=30)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", long, "-c", "copy", "-live", "1", "-f", "matroska",
                    str(d / "long_live.mkv")], check=True)
    return {p.name: str(p) for p in d.iterdir()}


def playlists(server_url: str, local_segment: str) -> dict[str, str]:
    """Files whose demuxers would open what they name."""
    return {
        "hls.m3u8": f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{server_url}/seg0.ts\n#EXT-X-ENDLIST\n",
        "hls_master.m3u8": f"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1000\n{server_url}/variant.m3u8\n",
        "hls_key.m3u8": f'#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-KEY:METHOD=AES-128,URI="{server_url}/key"\n'
                        f"#EXTINF:2.0,\n{server_url}/seg0.ts\n#EXT-X-ENDLIST\n",
        "hls_named_mp4.mp4": f"#EXTM3U\n#EXTINF:2.0,\n{server_url}/seg0.ts\n#EXT-X-ENDLIST\n",
        "dash.mpd": f'<?xml version="1.0"?>\n<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static" '
                    f'profiles="urn:mpeg:dash:profile:isoff-on-demand:2011" mediaPresentationDuration="PT2S">'
                    f'<Period><AdaptationSet mimeType="video/mp4"><Representation id="1" bandwidth="1000">'
                    f"<BaseURL>{server_url}/dash.mp4</BaseURL></Representation></AdaptationSet></Period></MPD>\n",
        "list.ffconcat": f"ffconcat version 1.0\nfile '{server_url}/c.mp4'\n",
        "subfile.ffconcat": f"ffconcat version 1.0\nfile 'subfile,,start,0,end,0,,:{local_segment}'\n",
        # local files named inside: FFmpeg's own defaults DO follow these (see the control below)
        "local.m3u8": f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{local_segment}\n#EXT-X-ENDLIST\n",
        "sibling.ffconcat": f"ffconcat version 1.0\nfile '{os.path.basename(local_segment)}'\n",
    }


class WatchedFile:
    """A named pipe standing in for a local file: records whether anything opened it to read."""

    def __init__(self, path: str, payload: bytes):
        self.path, self.opened, self.closing = path, threading.Event(), False
        os.mkfifo(path)

        def serve():
            while not self.closing:
                with open(path, "wb") as f:  # blocks until a reader opens the pipe
                    if self.closing:
                        return
                    self.opened.set()
                    with contextlib.suppress(BrokenPipeError):
                        f.write(payload)

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.closing = True
        with contextlib.suppress(OSError):  # unblocks the writer waiting for a reader
            os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))
        self.thread.join(5)


def test_playlists_and_manifests_are_refused_and_never_followed(clips, tmp_path):
    """Neither URLs nor local paths named inside a file are opened (a recording server and a
    watched named pipe), whatever the file's name; FFmpeg alone would follow the local ones."""
    srv = RecordingServer()
    segment = WatchedFile(str(tmp_path / "secret.ts"), Path(clips["seg.ts"]).read_bytes())
    try:
        for name, text in playlists(srv.url, segment.path).items():
            path = tmp_path / name
            path.write_text(text)
            for target in (path, tmp_path / f"{name}.bin"):  # its own name, and as a spooled download
                if target != path:
                    target.write_bytes(path.read_bytes())
                with pytest.raises(MediaError) as e:
                    sample_video(str(target), FrameSampling(2), default_frames=2, max_frames=8)
                assert (e.value.code, e.value.status) == ("invalid_video", 400), name
                with pytest.raises(MediaError):
                    probe(str(target))
        assert srv.hits == [] and not segment.opened.is_set()
    finally:
        segment.close()
        srv.close()
    # the control: FFmpeg's defaults open the local playlists and read what they name
    (tmp_path / "plain.ts").write_bytes(Path(clips["seg.ts"]).read_bytes())
    for name, fmt in (("local.m3u8", "hls"), ("sibling.ffconcat", "concat")):
        (tmp_path / name).write_text(playlists(srv.url, str(tmp_path / "plain.ts"))[name])
        with av.open(str(tmp_path / name)) as c:
            assert c.format.name == fmt and len(list(c.decode(video=0))) == 48


@pytest.mark.parametrize("name", ["base.mp4", "clip.mov", "seg.ts", "live.mkv", "live.webm", "raw.h264"])
def test_accepted_containers_still_decode(clips, name):
    v = sample_video(clips[name], FrameSampling(4), default_frames=4, max_frames=8)
    assert [read_index(f) for f in v.frames] == uniform_indices(48, 4)


# ---- images: Pillow's format allow-list, decompression bombs ----------------------------------------


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (3 * 8 + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_images_only_in_accepted_formats(tmp_path):
    img = Image.new("RGB", (32, 24), (10, 200, 30))
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP"):
        img.save(tmp_path / f"ok.{fmt}", fmt)
        assert load_image(str(tmp_path / f"ok.{fmt}"), 4096 * 4096).shape == (24, 32, 3)
    for fmt in ("TIFF", "PPM", "ICO", "EPS"):  # readable by Pillow, not accepted (EPS runs Ghostscript)
        if fmt == "EPS":
            (tmp_path / "x.EPS").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 24\n")
        else:
            img.save(tmp_path / f"x.{fmt}", fmt)
        with pytest.raises(MediaError) as e:
            load_image(str(tmp_path / f"x.{fmt}"), 4096 * 4096)
        assert (e.value.code, e.value.status) == ("invalid_image", 400), fmt
    with Image.open(tmp_path / "x.TIFF") as control:  # Pillow alone would have read it
        assert control.format == "TIFF"


def test_decompression_bomb_and_damaged_images_are_client_errors(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(30000, 30000))  # 900 Mpx: Pillow itself refuses to open it
    with pytest.raises(MediaError) as e:
        load_image(str(bomb), 4096 * 4096)
    assert (e.value.code, e.value.status) == ("resolution_too_large", 413)
    Image.new("RGB", (64, 48), (1, 2, 3)).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])  # cut inside the pixel data
    with pytest.raises(MediaError) as e:
        load_image(str(tmp_path / "cut.png"), 4096 * 4096)
    assert (e.value.code, e.value.status) == ("invalid_image", 400)


# ---- bearer token: any bytes give 401, never 500; keys compared over bytes ---------------------------


def _auth_app(keys: list[str]) -> FastAPI:
    app = FastAPI()
    app.state.services = SimpleNamespace(settings=SimpleNamespace(api_keys=keys))
    install_error_handlers(app)

    @app.get("/private", dependencies=[Depends(deps.require_api_key)])
    async def private():
        return {"ok": True}

    return app


def test_bearer_token_bytes_never_give_500():
    app = _auth_app(["sk-ascii", "clé-ünï"])

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://gw") as c:
            async def status(value: bytes | None) -> int:
                return (await c.get("/private", headers={"Authorization": value} if value is not None else {}
                                    )).status_code

            return {
                "ascii": await status(b"Bearer sk-ascii"),
                "utf8-key": await status("Bearer clé-ünï".encode()),
                "scheme-case": await status(b"bEaReR sk-ascii"),
                "utf8-wrong": await status("Bearer ключ".encode()),
                "latin1-wrong": await status("Bearer clé-ünï".encode("latin-1")),
                "high-bytes": await status(b"Bearer \xff\xfe\x80"),
                "wrong": await status(b"Bearer sk-other"),
                "basic": await status(b"Basic sk-ascii"),
                "missing": await status(None),
            }

    got = asyncio.run(main())
    assert got == {"ascii": 200, "utf8-key": 200, "scheme-case": 200, "utf8-wrong": 401, "latin1-wrong": 401,
                   "high-bytes": 401, "wrong": 401, "basic": 401, "missing": 401}


def test_every_key_is_compared_over_bytes(monkeypatch):
    seen, real = [], hmac.compare_digest

    def spy(a, b):
        seen.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)
    assert deps.key_matches(b"k1", ["k1", "k2", "k3"]) and not deps.key_matches("ü".encode(), ["k1"])
    assert seen == [(bytes, bytes)] * 4  # no early exit on the first match, never str


# ---- containers without a duration: measured from their packets ------------------------------------


@pytest.mark.parametrize("name", ["live.mkv", "live.webm", "raw.h264"])
def test_no_duration_in_the_container_is_measured(clips, name):
    with av.open(clips[name]) as c:  # the premise: nothing in the container says how long it is
        s = c.streams.video[0]
        assert not c.duration and not s.duration and not s.frames and "DURATION" not in s.metadata
    assert probe(clips[name]).duration == pytest.approx(2.0, abs=1e-3)
    for params, want in ((FrameSampling(8), uniform_indices(48, 8)), (FrameSampling(fps=2), [6, 18, 30, 42]),
                         (FrameSampling(4, start=0.5, end=1.5), [15, 21, 27, 33])):
        v = sample_video(clips[name], params, default_frames=8, max_frames=64)
        got = [read_index(f) for f in v.frames]
        assert got == want, params
        assert v.timestamps == pytest.approx([i / 24 for i in got], abs=2e-3)
        assert v.info.duration == pytest.approx(2.0, abs=1e-3)


def test_no_duration_long_clip_sparse_sampling_and_limits(clips):
    v = sample_video(clips["long_live.mkv"], FrameSampling(5), default_frames=5, max_frames=8)
    assert [read_index(f) for f in v.frames] == uniform_indices(300, 5) and v.info.duration == pytest.approx(10.0)
    with pytest.raises(MediaError) as e:  # measured, then the duration limit applies
        sample_video(clips["long_live.mkv"], FrameSampling(5), default_frames=5, max_frames=8,
                     limits=DecodeLimits(max_duration_s=4.0))
    assert (e.value.code, e.value.status) == ("video_too_long", 413)
    info = sample_video(clips["long_live.mkv"], FrameSampling(5), default_frames=5, max_frames=8, queue_above_s=6.0)
    assert not hasattr(info, "frames") and info.duration == pytest.approx(10.0)  # routed as a long video


def test_measuring_keeps_the_frame_data_intact(clips):
    """The measured clip gives the very same pixels as the same stream in MP4 (reopened at its start)."""
    a = sample_video(clips["live.mkv"], FrameSampling(8), default_frames=8, max_frames=8)
    b = sample_video(clips["base.mp4"], FrameSampling(8), default_frames=8, max_frames=8)
    assert a.timestamps == b.timestamps and np.array_equal(a.frames, b.frames)
