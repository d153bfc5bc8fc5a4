"""Per-tenant quotas and limits (issue 22, item 3): each limit hit answers 429 with ``Retry-After`` and the
OpenAI error type (``rate_limit_exceeded`` / ``insufficient_quota``), touches no other tenant, and recovers.

In-process (the stand-in engine, its own job worker) on the in-process stores and on Redis (a private
``redis-server``): requests per window (a 5 s window here), concurrent POST requests, queued+running jobs,
stored upload bytes, upload retention. Then two gateway processes (``framewise serve``'s server on the stand-in
engine, tests/live_support.py) on one Redis: the requests-per-window limit is one limit across both.
Waits are on the server's own state or ``Retry-After``, never on a guessed sub-second timing.
"""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from framewise.server.app import create_app
from framewise.server.settings import Settings
from framewise.server.video.synth import write_clip
from tests.live_support import MODEL, LiveGateway, StandInEngine, data_url, video_message, wait_for
from tests.redis_support import RedisServer

ALICE, BOB = "sk-alice-quota", "sk-bob-quota"
HI = [{"role": "user", "content": "hi"}]
WINDOW_S = 5


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(params=["memory", "redis"])
def backend(request):
    return request.param


@pytest.fixture
def make_gateway(backend, tc_llava_dir, tmp_path):
    """``make_gateway(**settings)`` -> (client, services, redis client or None)."""
    with contextlib.ExitStack() as stack:
        server = None
        if backend == "redis":
            (tmp_path / "redis").mkdir()
            server = RedisServer(tmp_path / "redis")
            stack.callback(server.close)

        def make(**settings):
            extra = {"redis_url": server.url, "consume": True} if server else {}
            s = Settings(model=str(tc_llava_dir), served_model_name=MODEL, decode_workers=1,
                         api_keys=[f"alice:{ALICE}", f"bob:{BOB}"], files_dir=str(tmp_path / "files"),
                         job_heartbeat_s=0.2, **extra, **settings)
            app = create_app(s, engine=StandInEngine(tc_llava_dir))
            client = stack.enter_context(TestClient(app))
            r = redis.Redis.from_url(server.url, decode_responses=True) if server else None
            return client, app.state.services, r

        yield make


def refused(r: httpx.Response, code: str, kind: str, max_retry_after: int) -> int:
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert (error["code"], error["type"]) == (code, kind), error
    retry = int(r.headers["Retry-After"])
    assert 1 <= retry <= max_retry_after, retry
    return retry


def refusals(services, limit: str) -> float:
    return services.metrics.registry.get_sample_value("framewise_tenant_limit_refusals_total",
                                                      {"tenant": "alice", "limit": limit}) or 0


def job(client, key: str, idem: str | None = None) -> httpx.Response:
    headers = {**auth(key), **({"Idempotency-Key": idem} if idem else {})}
    return client.post("/v1/jobs", headers=headers, json={"model": MODEL, "messages": HI, "max_tokens": 2})


def test_requests_per_window(make_gateway, backend):
    client, services, r = make_gateway(tenant_rpm=3, rate_limit_window_s=WINDOW_S)
    for _ in range(3):
        assert client.get("/v1/models", headers=auth(ALICE)).status_code == 200
    retry = refused(client.get("/v1/models", headers=auth(ALICE)), "rate_limit_exceeded", "rate_limit_exceeded",
                    WINDOW_S)
    # a request with a body is refused before it is read; another tenant has its own window
    refused(job(client, ALICE), "rate_limit_exceeded", "rate_limit_exceeded", WINDOW_S)
    assert client.get("/v1/models", headers=auth(BOB)).status_code == 200
    assert refusals(services, "rpm") == 2
    if r is not None:
        assert r.keys("fw:rl*"), "the window lives in Redis"
    time.sleep(retry + 0.2)  # what Retry-After said: the window has room again
    assert client.get("/v1/models", headers=auth(ALICE)).status_code == 200


def test_concurrent_requests(make_gateway, backend):
    client, services, r = make_gateway(tenant_concurrent=1)
    engine = services.engine
    engine.steps, engine.step_s = 40, 0.05  # a completion streams for ~2 s
    streamed = {}

    def stream():
        streamed["r"] = client.post("/v1/chat/completions", headers=auth(ALICE), json={
            "model": MODEL, "messages": HI, "max_tokens": 40, "stream": True})

    t = threading.Thread(target=stream)
    t.start()
    try:
        wait_for(lambda: services.inflight == 1, 30, "the stream to be in flight")
        retry = refused(job(client, ALICE), "concurrency_limit_exceeded", "rate_limit_exceeded", 5)
        if r is not None:
            assert r.zcard("fw:inflight:alice") == 1, "the slot is held in Redis"
        assert client.get("/v1/models", headers=auth(ALICE)).status_code == 200  # no body: no slot taken
        assert job(client, BOB).status_code == 202  # bob has his own slots
        assert refusals(services, "concurrent") == 1
    finally:
        t.join(60)
    assert streamed["r"].status_code == 200 and "[DONE]" in streamed["r"].text
    engine.steps, engine.step_s = 3, 0.0
    time.sleep(retry)
    # the slot came back with the end of the stream
    wait_for(lambda: job(client, ALICE).status_code == 202, 10, "the slot to be free again")
    if r is not None:
        wait_for(lambda: r.zcard("fw:inflight:alice") == 0, 10, "the Redis slot to be released")


def test_jobs_queued_and_running(make_gateway, backend, tmp_path):
    client, services, _ = make_gateway(tenant_jobs=1, queue_above_s=0.2)
    clip = tmp_path / "clip.mp4"
    write_clip(str(clip), frames=12, fps=24)  # 0.5 s: a completion about it runs as a job
    services.engine.steps, services.engine.step_s = 40, 0.05  # a job runs ~2 s
    first = job(client, ALICE, idem="one")
    assert first.status_code == 202, first.text
    refused(job(client, ALICE), "job_quota_exceeded", "insufficient_quota", 60)
    long = client.post("/v1/chat/completions", headers=auth(ALICE), json={
        "model": MODEL, "max_tokens": 2, "messages": video_message(data_url(clip.read_bytes()), num_frames=2)})
    refused(long, "job_quota_exceeded", "insufficient_quota", 60)  # a completion that would be a job, too
    again = job(client, ALICE, idem="one")  # the same job again is not a new one: no quota needed
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert job(client, BOB).status_code == 202
    assert refusals(services, "jobs") == 2
    jid = first.json()["id"]
    wait_for(lambda: client.get(f"/v1/jobs/{jid}", headers=auth(ALICE)).json()["status"] == "succeeded", 60,
             "the first job to finish")
    assert job(client, ALICE).status_code == 202  # recovered: a job finished
    services.engine.steps, services.engine.step_s = 3, 0.0


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
def test_stored_upload_bytes(make_gateway):
    client, services, _ = make_gateway(tenant_storage_mb=1000 / (1 << 20))  # 1000 bytes

    def upload(key: str, data: bytes) -> httpx.Response:
        return client.post("/v1/files", headers=auth(key), files={"file": ("f.bin", data)}, data={"purpose": "x"})

    one = upload(ALICE, b"1" * 600)
    assert one.status_code == 200, one.text
    refused(upload(ALICE, b"2" * 600), "storage_quota_exceeded", "insufficient_quota", 3600)
    same = upload(ALICE, b"1" * 600)  # the same bytes again replace her record: no more storage
    assert same.status_code == 200 and same.json()["id"] == one.json()["id"]
    assert upload(BOB, b"2" * 600).status_code == 200  # bob's quota is his own
    assert services.files.usage("alice") == 600 and refusals(services, "storage") == 1
    assert client.delete(f"/v1/files/{one.json()['id']}", headers=auth(ALICE)).status_code == 200
    assert upload(ALICE, b"2" * 600).status_code == 200  # recovered: she deleted a file


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
def test_upload_retention(make_gateway):
    client, services, _ = make_gateway(tenant_retention_h=2 / 3600)  # kept 2 s
    up = client.post("/v1/files", headers=auth(ALICE), files={"file": ("f.bin", b"x" * 100)})
    assert up.status_code == 200
    obj = up.json()
    assert obj["expires_at"] == obj["created_at"] + 2
    assert client.get(f"/v1/files/{obj['id']}", headers=auth(ALICE)).json()["expires_at"] == obj["expires_at"]
    wait_for(lambda: time.time() > obj["expires_at"] + 0.5, 10, "the upload to expire")
    gone = client.get(f"/v1/files/{obj['id']}", headers=auth(ALICE))
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "file_not_found"
    assert client.get("/v1/files", headers=auth(ALICE)).json()["data"] == []
    assert services.files.sweep() == 1  # (the periodic sweep) the record and its bytes are gone
    assert services.files.records() == [] and list(services.files.blobs.iterdir()) == []


def test_the_window_is_shared_by_two_gateways_on_one_redis(tc_llava_dir, tmp_path):
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    gateways = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            gateways.append(LiveGateway(tmp_path / name, tc_llava_dir, redis_url=server.url,
                                        api_keys=[f"alice:{ALICE}", f"bob:{BOB}"], tenant_rpm=4,
                                        rate_limit_window_s=10, files_dir=str(tmp_path / "files")))
        a, b = gateways

        def models(gw, key=ALICE) -> httpx.Response:
            return httpx.get(gw.url("/v1/models"), headers=auth(key), timeout=30)

        for gw in (a, b, a, b):  # four requests, two on each: the window is full
            assert models(gw).status_code == 200
        for gw in (a, b):  # on either gateway
            retry = refused(models(gw), "rate_limit_exceeded", "rate_limit_exceeded", 10)
        assert models(a, BOB).status_code == 200 and models(b, BOB).status_code == 200
        time.sleep(retry + 0.2)
        assert models(b).status_code == 200
    finally:
        for gw in gateways:
            gw.close()
        server.close()
