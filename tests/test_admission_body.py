"""Admission before buffering (issue 22, item 7; server/admission.py).

A chat request is admitted (a chat slot, its body bytes reserved against ``max_body_in_flight_mb``) or
refused before any of its body is read. Part 1: a real uvicorn server (tests/test_http_edges.py's
``EdgeServer``: ``framewise serve``'s options, the scripted stand-in engine of tests/test_pipeline.py)
with a 40 MiB budget, clients on raw sockets sending near-limit base64 ``data:`` URL bodies. Whether a
request was admitted is read from the server (``framewise_request_body_bytes_in_flight``) and whether
it was refused from its socket, so nothing here depends on timing; every wait has a long deadline.
Part 2: the budget, tickets and the middleware in-process.
"""

from __future__ import annotations

import asyncio
import base64
import json
import select
import struct
import threading
import time
from types import SimpleNamespace

import pytest

from framewise.server.admission import UPLOAD_IN_MEMORY, Admission, AdmissionMiddleware, BodyBudget, Ticket
from framewise.server.metrics import Metrics
from framewise.server.settings import Settings
from framewise.server.video.synth import write_clip
from tests.test_http_edges import EdgeServer, connect, read_response, send_until_answered

MB = 1 << 20
BUDGET_MB = 40
VIDEO_MB = 20  # the JSON body limit is 4/3 of it plus 1 MiB: 27.7 MiB
SLOTS = 3
N = 8  # concurrent near-limit bodies: two fit in the budget at a time


@pytest.fixture(scope="module")
def server(tc_llava_dir, tmp_path_factory):
    s = EdgeServer(tmp_path_factory.mktemp("admission"), model=tc_llava_dir, served_model_name="m",
                   max_video_mb=VIDEO_MB, max_image_mb=VIDEO_MB, max_body_in_flight_mb=BUDGET_MB,
                   max_concurrent_requests=SLOTS, body_idle_timeout_s=300)
    yield s
    s.close()


@pytest.fixture(scope="module")
def big_body(tmp_path_factory) -> bytes:
    """A chat request of ~18.7 MiB: a real 1 s clip padded with a 14 MiB top-level ``free`` box (which
    demuxers skip) as a base64 data: URL. Two fit in the 40 MiB budget, three do not."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_clip(str(path), frames=12, fps=12)
    clip = path.read_bytes()
    pad = 14 * MB - len(clip)
    video = clip + struct.pack(">I4s", pad, b"free") + b"\0" * (pad - 8)
    url = "data:video/mp4;base64," + base64.b64encode(video).decode()
    body = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}]}]}
    return json.dumps(body).encode()


def head(length: int, path: str = "/v1/chat/completions") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def wait_for(predicate, what: str, deadline_s: float = 120):
    deadline = time.time() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def sort_out(server: EdgeServer, socks: list, unit: int) -> tuple[list, list]:
    """Heads sent on ``socks``: (refused, admitted) once each is either answered (refused before its body)
    or holding ``unit`` reserved body bytes on the server."""

    def settled():
        readable = select.select(socks, [], [], 0)[0]
        reserved = server.metric("framewise_request_body_bytes_in_flight")
        if len(readable) + round(reserved / unit) == len(socks) and reserved % unit == 0:
            return readable, [s for s in socks if s not in readable]
        return None

    return wait_for(settled, "every request admitted or refused")


def send_and_read(sock, body: bytes, out: list) -> None:
    try:
        sock.sendall(body)
        out.append(read_response(sock, timeout=300))
    except Exception as e:  # reported by the caller
        out.append(e)
    finally:
        sock.close()


def one_round(server: EdgeServer, body: bytes, n: int) -> tuple[int, list]:
    """``n`` requests of ``body`` at once: (how many were admitted and answered 200, the refusals as
    (status, code, Retry-After, Connection))."""
    unit = len(body)
    received_before = server.metric("framewise_request_body_bytes_total")
    socks = [connect(server.port) for _ in range(n)]
    for sock in socks:
        sock.sendall(head(unit))
    refused, admitted = sort_out(server, socks, unit)
    # refused: answered with only their heads sent, the server having read no body bytes at all yet
    assert server.metric("framewise_request_body_bytes_total") == received_before
    refusals = []
    for sock in refused:
        status, headers, raw = read_response(sock)
        sock.close()
        refusals.append((status, json.loads(raw)["error"]["code"], headers.get("retry-after"),
                         headers.get("connection")))
    # admitted: their bodies are read and answered
    results: list = []
    threads = [threading.Thread(target=send_and_read, args=(s, body, results)) for s in admitted]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    for result in results:
        assert not isinstance(result, Exception), result
        status, _, raw = result
        assert status == 200, raw[:300]
        assert json.loads(raw)["choices"][0]["message"]["content"]
    assert len(results) == len(admitted)
    assert server.metric("framewise_request_body_bytes_total") - received_before == len(admitted) * unit
    return len(admitted), refusals


def test_near_limit_bodies_beyond_the_budget_are_refused_before_reading(server, big_body):
    unit = len(big_body)
    assert 2 * unit <= BUDGET_MB * MB < 3 * unit
    server.reset_peak_rss()
    base = server.rss()
    # what one such request costs the gateway at its peak: the body, its JSON text, the data URL's payload
    assert one_round(server, big_body, 1) == (1, [])
    single = server.rss() - base
    admitted, refusals = one_round(server, big_body, N)
    peak = server.rss() - base
    assert admitted == 2 and len(refusals) == N - 2, (admitted, refusals)
    assert set(refusals) == {(503, "overloaded", "1", "close")}, refusals
    assert wait_for(lambda: server.metric("framewise_request_body_bytes_in_flight") == 0, "release") is True
    print(f"\n{N} concurrent {unit / MB:.1f} MiB bodies, budget {BUDGET_MB} MiB: {admitted} admitted and answered "
          f"200, {len(refusals)} refused (503 + Retry-After) before reading; gateway peak RSS growth "
          f"{peak / MB:.0f} MiB (one request alone: {single / MB:.0f} MiB; {N} admitted at once would be "
          f"~{N * single / MB:.0f} MiB)")
    # two at a time: about twice one request, far from N times
    assert peak <= 2.5 * single + 32 * MB, f"peak RSS grew by {peak / MB:.0f} MiB, one request {single / MB:.0f}"
    # a refused client that comes back after Retry-After is admitted
    time.sleep(1)
    assert one_round(server, big_body, 1) == (1, [])


def _small_chat() -> bytes:
    return json.dumps({"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}).encode()


def test_chat_slots_are_taken_before_the_body(server):
    body = _small_chat()
    socks = [connect(server.port) for _ in range(SLOTS + 2)]
    for sock in socks:
        sock.sendall(head(len(body)))

    def settled():
        readable = select.select(socks, [], [], 0)[0]
        return readable if len(readable) == 2 and server.metric("framewise_requests_in_flight") == SLOTS else None

    refused = wait_for(settled, f"{SLOTS} slots taken, 2 refused")
    for sock in refused:
        status, headers, raw = read_response(sock)
        sock.close()
        assert (status, json.loads(raw)["error"]["code"], headers["retry-after"]) == (429, "overloaded", "1")
    results: list = []
    for sock in (s for s in socks if s not in refused):
        send_and_read(sock, body, results)
    assert [r[0] for r in results] == [200] * SLOTS, results
    assert wait_for(lambda: server.metric("framewise_requests_in_flight") == 0, "slots released") is True


def test_a_chunked_body_is_cut_off_when_the_budget_runs_out(server):
    holder = connect(server.port)
    held = 25 * MB
    holder.sendall(head(held))  # admitted, its body never sent
    wait_for(lambda: server.metric("framewise_request_body_bytes_in_flight") == held, "the reservation")
    received_before = server.metric("framewise_request_body_bytes_total")
    sock = connect(server.port)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"A" * (256 * 1024)
    chunk = b"%x\r\n%b\r\n" % (len(piece), piece)
    sent = send_until_answered(sock, [chunk] * 80)  # 20 MiB, of which 15 fit
    status, headers, raw = read_response(sock)
    sock.close()
    assert (status, json.loads(raw)["error"]["code"], headers["retry-after"]) == (503, "overloaded", "1")
    handed = server.metric("framewise_request_body_bytes_total") - received_before
    assert handed <= BUDGET_MB * MB - held, f"{handed} bytes reached the application"
    print(f"\nchunked body: the client sent {sent / MB:.1f} MiB, the application was handed {handed / MB:.1f} MiB "
          f"({(BUDGET_MB * MB - held) / MB:.0f} MiB of budget left), then 503")
    holder.close()  # a client that leaves gives its reservation back
    assert wait_for(lambda: server.metric("framewise_request_body_bytes_in_flight") == 0, "release") is True
    assert wait_for(lambda: server.metric("framewise_requests_in_flight") == 0, "slot release") is True


# ---- part 2: in-process -------------------------------------------------------------------------------


def test_budget_admits_a_body_larger_than_itself_only_alone():
    budget = BodyBudget(100)
    assert budget.try_reserve(150)  # alone: admitted, so a maximal body is never refused for ever
    assert not budget.try_reserve(1)
    budget.release(150)
    a = Ticket(budget, None, None, None)
    assert a.reserve(60) and a.reserve(90) and budget.reserved == 90  # grows as a chunked body streams
    b = Ticket(budget, None, None, None)
    assert not b.reserve(20) and b.reserved == 0 and budget.reserved == 90
    assert b.reserve(10)
    a.release()
    b.release()
    a.release()  # idempotent
    assert budget.reserved == 0


def test_uploads_count_what_they_hold_in_memory():
    budget = BodyBudget(4 * MB)
    upload = Ticket(budget, None, UPLOAD_IN_MEMORY, None)
    assert upload.reserve(500 * MB) and budget.reserved == UPLOAD_IN_MEMORY


def _services(ready: bool = True, slots: int = 4):
    return SimpleNamespace(engine=SimpleNamespace(ready=ready), inflight=0, metrics=Metrics(),
                           settings=Settings(max_concurrent_requests=slots))


async def _call(middleware, method: str, path: str, body_chunks: list[bytes], length: int | None):
    headers = [(b"host", b"x")] + ([(b"content-length", str(length).encode())] if length is not None else [])
    scope = {"type": "http", "method": method, "path": path, "headers": headers, "state": {}}
    queue = [{"type": "http.request", "body": c, "more_body": i < len(body_chunks) - 1}
             for i, c in enumerate(body_chunks)]
    sent: list[dict] = []

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await middleware(scope, receive, send)
    return scope, sent


def test_refusals_carry_retry_after_and_an_openai_error():
    seen = {}

    async def app(scope, receive, send):
        seen["slot"] = scope["state"].get("chat_slot")
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def run():
        services = _services(ready=False)
        mw = AdmissionMiddleware(app, Admission(services, 1000))
        _, sent = await _call(mw, "POST", "/v1/chat/completions", [b"{}"], 2)
        assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
        assert json.loads(sent[1]["body"])["error"]["code"] == "engine_not_ready"
        assert "slot" not in seen  # the application never ran

        services = _services(slots=1)
        mw = AdmissionMiddleware(app, Admission(services, 1000))
        other = Ticket(mw.admission.budget, None, None, None)
        assert other.reserve(300)  # another request's body in flight
        _, sent = await _call(mw, "POST", "/v1/jobs", [b"x" * 800], 800)  # declared: refused before reading
        assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
        assert (b"connection", b"close") in sent[0]["headers"]
        _, sent = await _call(mw, "POST", "/v1/jobs", [b"x" * 600, b"x" * 600], None)  # chunked: cut off
        assert sent[0]["status"] == 503 and json.loads(sent[1]["body"])["error"]["code"] == "overloaded"
        assert services.metrics.body_bytes_received._value.get() == 600  # the refused chunk never went in
        _, sent = await _call(mw, "POST", "/v1/chat/completions", [b"x" * 10, b"x" * 10], None)
        assert sent[0]["status"] == 200 and seen["slot"] is not None and not seen["slot"].open  # released
        other.release()
        assert services.inflight == 0 and mw.admission.budget.reserved == 0

    asyncio.run(run())
