"""HTTP edges (issue 22, item 6; server/http_edges.py): trailing-slash redirects, the request head's size,
header count and ``Host``, slow and idle connections, stalled bodies, and ``video_url`` fields that are
refused with their name.

A real uvicorn server (the options ``framewise serve`` passes, :func:`framewise.server.http_edges.uvicorn_options`)
runs the real application in a subprocess with an engine that never starts (or, for
tests/test_admission_body.py, the scripted stand-in engine of tests/test_pipeline.py). Clients are raw
sockets where the framing matters. Timings: the server's timeouts are a few seconds and every wait is
polled with a deadline many times longer.
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

from framewise.server.video.sampling import FrameSampling, plan_timestamps
from tests.conftest import ROOT
from tests.gateway_support import free_port, stop_process_group

MB = 1 << 20

SERVER = """
import json, sys, uvicorn
from framewise.server.app import create_app
from framewise.server.http_edges import uvicorn_options
from framewise.server.settings import Settings

class NoEngine:  # never started: what is tested here is refused or served before a route needs one
    ready, defaults = True, None
    async def start(self): pass
    def shutdown(self): pass
    async def abort(self, request_id): pass

settings = Settings(**json.loads(sys.argv[2]))
if len(sys.argv) > 3:
    from tests.test_pipeline import ScriptedEngine
    engine = ScriptedEngine(sys.argv[3])
else:
    engine = NoEngine()
uvicorn.run(create_app(settings, engine=engine), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            **uvicorn_options(settings))
"""


class EdgeServer:
    """``framewise serve``'s uvicorn setup in a subprocess; ``model``: the scripted engine on that checkpoint."""

    def __init__(self, workdir: Path, model: Path | None = None, **settings):
        self.port, self.workdir = free_port(), workdir
        self.base = f"http://127.0.0.1:{self.port}"
        settings = {"files_dir": str(workdir / "files"), "decode_workers": 1, **settings}
        if model is not None:
            settings.setdefault("model", str(model))
        self.log_path = workdir / "server.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the server
        argv = [sys.executable, "-c", SERVER, str(self.port), json.dumps(settings)]
        self.proc = subprocess.Popen(argv + ([str(model)] if model is not None else []), cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "TMPDIR": str(workdir)})
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("server did not start")

    def reset_peak_rss(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def rss(self, field: str = "VmHWM") -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":"))) * 1024

    def metric(self, name: str) -> float:
        total = 0.0
        for line in httpx.get(f"{self.base}/metrics", timeout=30).text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def close(self) -> None:
        stop_process_group(self.proc)
        self.log.close()


HEADER_KB, MAX_HEADERS, TIMEOUT_S = 16, 50, 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = EdgeServer(tmp_path_factory.mktemp("edges"), served_model_name="m", max_header_kb=HEADER_KB,
                   max_headers=MAX_HEADERS, header_timeout_s=TIMEOUT_S, body_idle_timeout_s=TIMEOUT_S)
    yield s
    s.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=60)


def read_response(sock: socket.socket, timeout: float = 60) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one response; the body read to its Content-Length."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"connection closed without a response: {buf!r}"
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        data = sock.recv(65536)
        if not data:
            break
        body += data
    return int(lines[0].split()[1]), headers, body


def send_until_answered(sock: socket.socket, chunks) -> int:
    """Send ``chunks`` until the server answers (or closes); the bytes sent."""
    sent = 0
    try:
        for data in chunks:
            view = memoryview(data)
            while view:
                readable, writable, _ = select.select([sock], [sock], [], 60)
                if readable:
                    return sent
                assert writable, "the server neither reads nor answers"
                n = sock.send(view)
                view, sent = view[n:], sent + n
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def closed_within(sock: socket.socket, deadline_s: float) -> tuple[float, bytes]:
    """Seconds until the server closed the connection, and what it wrote before."""
    start, got = time.monotonic(), b""
    sock.settimeout(deadline_s)
    try:
        while data := sock.recv(65536):
            got += data
    except ConnectionResetError:
        pass
    return time.monotonic() - start, got


def error_of(body: bytes) -> dict:
    return json.loads(body)["error"]


# ---- redirects --------------------------------------------------------------------------------------


def test_trailing_slash_is_served_without_a_host_derived_redirect(server):
    """Starlette's redirect built ``Location: http://evil.example/v1/models`` from the Host header."""
    evil = {"Host": "evil.example"}
    r = httpx.get(f"{server.base}/health/", headers=evil, timeout=30)  # was: 307 to http://evil.example/health
    assert r.status_code == 200 and "location" not in r.headers, (r.status_code, r.headers)
    r = httpx.get(f"{server.base}/v1/models/", headers=evil, timeout=30)
    assert r.status_code == 200 and "location" not in r.headers, (r.status_code, r.headers)
    assert r.json()["data"][0]["id"] == "m"
    # a POST with a trailing slash reaches the route itself (its validation answers), never a 307
    r = httpx.post(f"{server.base}/v1/jobs/", headers=evil, json={"model": "m"}, timeout=30)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_parameter") and "location" not in r.headers
    r = httpx.get(f"{server.base}/no/such/path/", headers=evil, timeout=30)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found") and "location" not in r.headers
    assert httpx.get(f"{server.base}/v1/jobs", timeout=30).status_code == 200  # the route itself, unchanged


# ---- the request head ---------------------------------------------------------------------------------


def test_an_8_mb_header_is_refused_at_the_limit(server):
    server.reset_peak_rss()
    before = server.rss()
    sock = connect(server.port)
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
    sent = send_until_answered(sock, [head, *([b"a" * 65536] * 128), b"\r\n\r\n"])  # 8 MiB of header value
    status, headers, body = read_response(sock)
    sock.close()
    assert (status, error_of(body)["code"]) == (431, "request_header_fields_too_large")
    assert headers["connection"] == "close"
    growth = server.rss() - before
    print(f"8 MiB header: client sent {sent} bytes before the 431; server peak RSS growth {growth / MB:.1f} MiB")
    assert growth < 4 * MB, f"peak RSS grew by {growth} bytes"
    assert httpx.get(f"{server.base}/health", timeout=30).status_code == 200


def test_a_head_just_under_the_limit_is_served(server):
    r = httpx.get(f"{server.base}/health", headers={"X-Pad": "a" * (HEADER_KB * 1024 - 512)}, timeout=30)
    assert r.status_code == 200


def test_header_count_is_bounded(server):
    ok = {f"X-H{i}": "1" for i in range(MAX_HEADERS - 10)}
    assert httpx.get(f"{server.base}/health", headers=ok, timeout=30).status_code == 200
    many = {f"X-H{i}": "1" for i in range(MAX_HEADERS + 1)}
    r = httpx.get(f"{server.base}/health", headers=many, timeout=30)
    assert (r.status_code, r.json()["error"]["code"]) == (431, "request_header_fields_too_large")
    assert str(MAX_HEADERS) in r.json()["error"]["message"]


@pytest.mark.parametrize("hosts", [0, 2, 3])
def test_http11_needs_exactly_one_host(server, hosts):
    sock = connect(server.port)
    host_lines = "".join(f"Host: h{i}.example\r\n" for i in range(hosts))
    sock.sendall(f"GET /health HTTP/1.1\r\n{host_lines}Content-Length: 0\r\n\r\n".encode())
    status, headers, body = read_response(sock)
    sock.close()
    assert (status, error_of(body)["code"]) == (400, "invalid_host_header"), body
    assert headers["connection"] == "close"


def test_host_rules_of_http10_and_a_normal_request(server):
    for request in (b"GET /health HTTP/1.0\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
        sock = connect(server.port)
        sock.sendall(request)
        status, _, _ = read_response(sock)
        sock.close()
        assert status == 200, request


# ---- slow and idle connections ------------------------------------------------------------------------


def test_a_head_sent_byte_by_byte_is_cut_off(server):
    """Slowloris: uvicorn alone keeps such a connection for ever (its keep-alive timer is cancelled by the
    first byte). Here the head must be complete within header_timeout_s of its first byte: 408, closed."""
    sock = connect(server.port)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    start, got = time.monotonic(), b""
    try:
        while time.monotonic() - start < 60:
            sock.sendall(b"X")  # a header name that never ends, one byte at a time
            readable, _, _ = select.select([sock], [], [], 0.5)
            if readable:
                data = sock.recv(65536)
                got += data
                if not data or b"\r\n\r\n" in got:
                    break
    except (BrokenPipeError, ConnectionResetError):
        pass
    elapsed = time.monotonic() - start
    extra, rest = closed_within(sock, 30)
    sock.close()
    got += rest
    assert got.startswith(b"HTTP/1.1 408"), got
    assert b"request_timeout" in got
    assert TIMEOUT_S - 1 <= elapsed < 45, elapsed  # not before the timeout; long before the test's deadline


def test_a_connection_that_never_sends_is_closed(server):
    sock = connect(server.port)
    elapsed, got = closed_within(sock, 60)
    sock.close()
    assert got == b"" and elapsed < 45, (elapsed, got)


def test_keep_alive_connections_still_carry_several_requests(server):
    with httpx.Client(base_url=server.base, timeout=30) as client:
        for _ in range(3):
            assert client.get("/health").status_code == 200
            time.sleep(0.5)  # shorter than both the keep-alive and the head timeouts


def test_a_stalled_body_is_answered_408(server):
    sock = connect(server.port)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\": ")  # and nothing more
    start = time.monotonic()
    status, headers, body = read_response(sock, timeout=60)
    sock.close()
    assert (status, error_of(body)["code"]) == (408, "request_timeout")
    assert headers["connection"] == "close" and time.monotonic() - start < 45
    deadline = time.time() + 60  # the stalled request's slot and bytes are given back
    while server.metric("framewise_requests_in_flight") or server.metric("framewise_request_body_bytes_in_flight"):
        assert time.time() < deadline, "admission not released"
        time.sleep(0.5)


# ---- video_url fields -----------------------------------------------------------------------------------

BAD_VIDEO_FIELDS = {  # video_url fields -> (the field named, a word of the rule)
    "fps NaN": ({"fps": float("nan")}, "fps", "finite"),
    "fps Infinity": ({"fps": float("inf")}, "fps", "finite"),
    "fps -Infinity": ({"fps": float("-inf")}, "fps", "finite"),
    "fps string": ({"fps": "fast"}, "fps", "number"),
    "fps zero": ({"fps": 0}, "fps", "greater than 0"),
    "fps negative": ({"fps": -2}, "fps", "greater than 0"),
    "fps 1e308": ({"fps": 1e308}, "fps", "less than or equal to 1000"),
    "start negative": ({"start": -1}, "start", "greater than or equal to 0"),
    "start NaN": ({"start": float("nan")}, "start", "finite"),
    "start Infinity": ({"start": float("inf")}, "start", "finite"),
    "start string": ({"start": "soon"}, "start", "number"),
    "end negative": ({"end": -3}, "end", "greater than 0"),
    "end Infinity": ({"end": float("inf")}, "end", "finite"),
    "start > end": ({"start": 5, "end": 2}, "end", "greater than start"),
    "start == end": ({"start": 2, "end": 2}, "end", "greater than start"),
    "num_frames zero": ({"num_frames": 0}, "num_frames", "greater than or equal to 1"),
    "num_frames fraction": ({"num_frames": 2.5}, "num_frames", "integer"),
    "url missing": ({"url": None}, "url", "required"),
}


def _video_request(fields: dict) -> bytes:
    video = {"url": "https://example.com/v.mp4", **fields}
    if video["url"] is None:
        del video["url"]
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what happens?"}, {"type": "video_url", "video_url": video}]}]}
    return json.dumps(body).encode()  # NaN, Infinity, -Infinity as JavaScript writes them (JSON parsers read them)


@pytest.mark.parametrize("case", BAD_VIDEO_FIELDS)
def test_bad_video_url_fields_are_named(server, case):
    fields, field, rule = BAD_VIDEO_FIELDS[case]
    r = httpx.post(f"{server.base}/v1/chat/completions", content=_video_request(fields),
                   headers={"Content-Type": "application/json"}, timeout=30)
    err = r.json()["error"]
    print(f"{case:22} {json.dumps(fields):28} -> {r.status_code} {err['param']}: {err['message'].split(': ', 1)[1]}")
    assert (r.status_code, err["code"], err["type"]) == (422, "invalid_parameter", "invalid_request_error")
    assert err["param"] == f"messages[0].content[1].video_url.{field}", err
    assert err["message"].startswith(err["param"] + ": ") and rule in err["message"], err


def test_content_errors_name_the_part_not_the_string_branch(server):
    bad_part = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    r = httpx.post(f"{server.base}/v1/chat/completions", json=bad_part, timeout=30)
    assert r.json()["error"]["param"] == "messages[0].content[0].image_url.url", r.json()
    not_text = {"model": "m", "messages": [{"role": "user", "content": 5}]}
    r = httpx.post(f"{server.base}/v1/chat/completions", json=not_text, timeout=30)
    assert r.json()["error"]["param"] == "messages[0].content", r.json()
    assert "valid string" in r.json()["error"]["message"]


def test_a_rate_below_one_frame_per_clip_samples_its_middle():
    """fps=1e-300 once planned one instant 5e299 s in (an OverflowError in the decoder's seek, a 400
    decode_failed): a 1/fps segment longer than the clip gives the clip's midpoint."""
    for fps in (1e-300, 0.01):
        assert plan_timestamps(10.0, 24, FrameSampling(fps=fps, start=2), default_frames=8, max_frames=32) == [6.0]
    assert len(plan_timestamps(10.0, 24, FrameSampling(fps=0.1), default_frames=8, max_frames=32)) == 1
