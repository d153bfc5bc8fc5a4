"""Request bodies are bounded while they stream in (server/http_limits.py).

A real uvicorn server runs the real application (middleware, routers, file store) with an engine
that is never started: the limits act before any route needs one. The client is a raw socket, so
the test controls the framing (an honest ``Content-Length``, or chunked with none) and watches for
the server's answer while it is still sending. What the server wrote meanwhile is read from
``/proc/PID/io`` (bytes written; Starlette spools a multipart part to disk past 1 MiB) and its peak
memory from ``VmHWM`` (reset through ``/proc/PID/clear_refs`` before each request).
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT
from tests.gateway_support import free_port, stop_process_group

MB = 1 << 20
UPLOAD_MB = 1  # --max-upload-mb: the multipart body limit is this plus 64 KiB
VIDEO_MB = 1  # --max-video-mb (and image): the JSON limit is 4/3 of it plus 1 MiB
JSON_LIMIT = int(VIDEO_MB * MB * 4 / 3) + MB
UPLOAD_LIMIT = UPLOAD_MB * MB + 64 * 1024

SERVER = f"""
import sys, uvicorn
from framewise.server.app import create_app
from framewise.server.settings import Settings

class NoEngine:  # never started: every request here is refused or served before a route needs it
    ready, defaults = True, None
    async def start(self): pass
    def shutdown(self): pass
    async def abort(self, request_id): pass

s = Settings(files_dir=sys.argv[2], max_upload_mb={UPLOAD_MB}, max_video_mb={VIDEO_MB}, max_image_mb={VIDEO_MB}, decode_workers=1,
             api_keys=["sk-limits"])
uvicorn.run(create_app(s, engine=NoEngine()), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


class Server:
    def __init__(self, workdir: Path):
        self.port, self.files = free_port(), workdir / "files"
        self.spool = workdir / "tmp"  # TMPDIR: where Starlette spools multipart parts
        self.spool.mkdir()
        self.log = open(workdir / "server.log", "w")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(self.port), str(self.files)], cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "TMPDIR": str(self.spool)})
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, (workdir / "server.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("server did not start")

    def written(self) -> int:
        """Bytes this process has written through write() so far (disk files and log lines)."""
        io = Path(f"/proc/{self.proc.pid}/io").read_text()
        return int(next(line.split()[1] for line in io.splitlines() if line.startswith("wchar:")))

    def reset_peak_rss(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def peak_rss(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024

    def close(self) -> None:
        stop_process_group(self.proc)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("limits"))
    yield s
    s.close()


class Answered(Exception):
    pass


def _read_response(sock: socket.socket) -> tuple[int, dict]:
    sock.settimeout(30)
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"connection closed without a response: {buf!r}"
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        data = sock.recv(65536)
        if not data:
            break
        body += data
    return status, json.loads(body)


def raw_post(port: int, path: str, content_type: str, body_chunks, *, length: int | None,
             key: str = "sk-limits") -> tuple[int, dict, int]:
    """POST with ``Content-Length: length``, or chunked when ``length`` is None; stops sending as soon as the
    server answers. Returns (status, JSON body, body bytes the socket accepted)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                 f"Content-Type: {content_type}\r\n{framing}\r\n\r\n".encode())
    sent = 0
    try:
        for data in body_chunks:
            if length is None:
                data = b"%x\r\n%b\r\n" % (len(data), data)
            view = memoryview(data)
            while view:
                readable, writable, _ = select.select([sock], [sock], [], 30)
                if readable:
                    raise Answered
                assert writable, "the server neither reads the body nor answers"
                n = sock.send(view)
                view, sent = view[n:], sent + n
        if length is None:
            sock.sendall(b"0\r\n\r\n")
    except (Answered, BrokenPipeError, ConnectionResetError):
        pass
    try:
        status, body = _read_response(sock)
    finally:
        sock.close()
    return status, body, sent


def multipart_chunks(total: int, boundary: str = "fwbound"):
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.mp4\"\r\n"
           "Content-Type: video/mp4\r\n\r\n").encode()
    for _ in range(total // (64 * 1024)):
        yield b"\1" * (64 * 1024)
    yield f"\r\n--{boundary}--\r\n".encode()


def json_chunks(total: int):
    """A chat request whose one video part is a ``data:`` URL of ``total`` base64 characters."""
    yield (b'{"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "video_url", '
           b'"video_url": {"url": "data:video/mp4;base64,')
    for _ in range(total // (64 * 1024)):
        yield b"A" * (64 * 1024)
    yield b'"}}]}]}'


CASES = {  # route -> (path, content type, body, limit, code)
    "upload": ("/v1/files", "multipart/form-data; boundary=fwbound", multipart_chunks, UPLOAD_LIMIT, "file_too_large"),
    "chat": ("/v1/chat/completions", "application/json", json_chunks, JSON_LIMIT, "request_too_large"),
}


def _still_serving(server: Server) -> None:
    base, auth = f"http://127.0.0.1:{server.port}", {"Authorization": "Bearer sk-limits"}
    r = httpx.post(f"{base}/v1/files", headers=auth, files={"file": ("ok.mp4", b"\0" * 1000)}, timeout=30)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{base}/v1/files/{r.json()['id']}", headers=auth).json()["bytes"] == 1000
    assert httpx.get(f"{base}/v1/models", headers=auth).status_code == 200


@pytest.mark.parametrize("route", CASES)
def test_declared_length_over_the_limit_is_refused_before_reading(server, route):
    path, ctype, _, limit, code = CASES[route]
    before = server.written()
    # headers only: the 413 must come without a single body byte sent (else this waits 30 s and fails)
    status, body, sent = raw_post(server.port, path, ctype, [], length=10 * limit)
    assert (status, body["error"]["code"], sent) == (413, code, 0)
    assert server.written() - before < 64 * 1024  # a log line, no body
    _still_serving(server)


@pytest.mark.parametrize("route", CASES)
def test_chunked_body_ten_times_the_limit_is_cut_off_at_the_limit(server, route):
    path, ctype, chunks, limit, code = CASES[route]
    stored_before = set(server.files.iterdir())
    server.reset_peak_rss()
    rss_before, written_before = server.peak_rss(), server.written()
    status, body, sent = raw_post(server.port, path, ctype, chunks(10 * limit), length=None)
    assert (status, body["error"]["code"]) == (413, code), body
    written, rss_growth = server.written() - written_before, server.peak_rss() - rss_before
    # at most the limit reached the application: on disk (the multipart spool) and in memory (the JSON body)
    assert written <= limit, f"{written} bytes written for a {limit}-byte limit"
    assert rss_growth <= 2 * limit + 8 * MB, f"peak RSS grew by {rss_growth} bytes"
    assert not [p for p in server.spool.iterdir() if p.is_file()]  # no spooled part left behind
    assert set(server.files.iterdir()) == stored_before  # nothing stored, no temporary file left
    _still_serving(server)


def test_upload_exactly_at_the_file_limit_is_accepted(server):
    base, auth = f"http://127.0.0.1:{server.port}", {"Authorization": "Bearer sk-limits"}
    data = os.urandom(UPLOAD_MB * MB)
    r = httpx.post(f"{base}/v1/files", headers=auth, files={"file": ("edge.mp4", data)}, timeout=60)
    assert r.status_code == 200 and r.json()["bytes"] == len(data), r.text
    r = httpx.post(f"{base}/v1/files", headers=auth, files={"file": ("over.mp4", data + b"x")}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"


def test_other_routes_have_a_small_body_limit(server):
    # 1 MiB (--max-body-kb) where no body is expected: refused before routing (else: 405)
    status, body, _ = raw_post(server.port, "/v1/models", "application/json", [], length=2 * MB)
    assert (status, body["error"]["code"]) == (413, "request_too_large")


@pytest.mark.parametrize("route", CASES)
def test_a_body_without_a_valid_key_is_refused_before_reading(server, route):
    """FastAPI reads a body before the route's auth dependency runs: the middleware checks the key first."""
    path, ctype, _, limit, _ = CASES[route]
    # a body within the limit is announced but never sent: the 401 must come without it
    status, body, sent = raw_post(server.port, path, ctype, [], length=limit // 2, key="sk-wrong")
    assert (status, body["error"]["code"], sent) == (401, "invalid_api_key", 0)
