"""Job ids and list queries are validated before they reach the store (issue 21, item 6): an id outside the
grammar of job ids is a 404 with no store call (it becomes part of Redis key names: ``<id>:events`` names
another key of the same job), numeric list parameters must be finite (422 naming the parameter), and an
Idempotency-Key is bounded. The gateway runs in-process on a private redis-server, with a stand-in engine
(no job is executed: the gateway does not consume with Redis)."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from framewise.server.app import create_app
from framewise.server.jobs.base import JobNotFound, new_job_id, valid_job_id
from framewise.server.jobs.memory_queue import MemoryJobQueue
from framewise.server.jobs.redis_queue import RedisJobQueue
from framewise.server.settings import Settings

MODEL, KEY = "stub", "sk-ids"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


class StubEngine:
    """What the app needs of an engine to start and serve /v1/jobs (nothing is generated here)."""

    ready = True

    async def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def gateway(module_redis_server, tmp_path_factory):
    """(client, services): the real app with the Redis queue."""
    settings = Settings(model="stub-model", served_model_name=MODEL, api_keys=[KEY], decode_workers=1,
                        files_dir=str(tmp_path_factory.mktemp("files")), redis_url=module_redis_server.url)
    app = create_app(settings, engine=StubEngine())
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client, app.state.services


@pytest.fixture
def store_calls(gateway):
    """The queue methods the routers call, recorded (and still run)."""
    jobs = gateway[1].jobs
    calls: list[tuple[str, str]] = []
    originals = {name: getattr(jobs, name) for name in ("get", "cancel", "events")}

    def wrap(name):
        fn = originals[name]

        def recorded(job_id, *args, **kwargs):
            calls.append((name, job_id))
            return fn(job_id, *args, **kwargs)

        return recorded

    for name in originals:
        setattr(jobs, name, wrap(name))
    yield calls
    for name in originals:
        delattr(jobs, name)


def test_the_grammar_is_what_new_job_id_makes():
    assert all(valid_job_id(new_job_id()) for _ in range(100))
    job_id = new_job_id()
    for bad in (f"{job_id}:events", job_id.upper(), "job-" + "g" * 32, job_id[:-1], job_id + "0", "job-",
                f" {job_id}", f"{job_id}\n", "fw:job:x", "", None, 42):
        assert not valid_job_id(bad), bad


def test_an_id_naming_another_key_of_a_job_is_404_not_500(gateway, store_calls):
    """``<id>:events`` is the job's events stream: HGETALL on it was a Redis type error (500)."""
    client, _ = gateway
    r = client.post("/v1/jobs", json=BODY)
    assert r.status_code == 202
    job_id = r.json()["id"]
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200
    store_calls.clear()
    for method, path in (("GET", f"/v1/jobs/{job_id}:events"), ("DELETE", f"/v1/jobs/{job_id}:events"),
                         ("GET", f"/v1/jobs/{job_id}:events/events")):
        r = client.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "job_not_found" and r.json()["error"]["param"] == "job_id"
    assert store_calls == []  # refused before the store was asked
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # the job is untouched


@pytest.mark.parametrize("bad", ["nope", "job-123", "JOB-" + "A" * 32, "job-" + "A" * 32, "job-" + "0" * 31 + "%00",
                                 "job-" + "0" * 32 + "%0A", "x" * 2000, "%2E%2E", "job-" + "0" * 32 + "%3Aevents"])
def test_ids_outside_the_grammar_are_404_without_a_store_call(gateway, store_calls, bad):
    client, _ = gateway
    for method, path in (("GET", f"/v1/jobs/{bad}"), ("DELETE", f"/v1/jobs/{bad}"),
                         ("GET", f"/v1/jobs/{bad}/events")):
        r = client.request(method, path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", (method, path, r.text)
    assert store_calls == []


def test_a_well_formed_unknown_id_is_still_looked_up(gateway, store_calls):
    client, _ = gateway
    job_id = new_job_id()
    r = client.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    assert store_calls == [("get", job_id)]


@pytest.mark.parametrize("backend", ["redis", "memory"])
def test_the_queues_refuse_ids_outside_the_grammar_themselves(module_redis_server, backend):
    """Defense in depth: get/cancel/events of both queues answer JobNotFound, never a Redis error."""

    async def main():
        q = RedisJobQueue(module_redis_server.url, prefix="ids") if backend == "redis" else MemoryJobQueue()
        job, _ = await q.submit(BODY)
        for bad in (f"{job.id}:events", "x", job.id + ":"):
            with pytest.raises(JobNotFound):
                await q.get(bad)
            with pytest.raises(JobNotFound):
                await q.cancel(bad)
            with pytest.raises(JobNotFound):
                async for _ in q.events(bad):
                    pass
            assert not await q.is_cancelled(bad)
        assert (await q.get(job.id)).status == "queued"
        await q.close()

    asyncio.run(main())


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e999"])
def test_before_must_be_finite(gateway, value):
    client, _ = gateway
    r = client.get("/v1/jobs", params={"before": value})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_parameter" and r.json()["error"]["param"] == "before"


@pytest.mark.parametrize("params, param", [({"before": "soon"}, "before"), ({"limit": "0"}, "limit"),
                                           ({"limit": "101"}, "limit"), ({"limit": "nan"}, "limit"),
                                           ({"limit": "inf"}, "limit"), ({"limit": "1.5"}, "limit"),
                                           ({"limit": "1e2"}, "limit"), ({"status": "done"}, "status")])
def test_malformed_list_queries_are_422_naming_the_parameter(gateway, params, param):
    client, _ = gateway
    r = client.get("/v1/jobs", params=params)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_parameter" and r.json()["error"]["param"] == param, r.text


def test_well_formed_list_queries_still_work(gateway):
    client, _ = gateway
    ids = [client.post("/v1/jobs", json=BODY).json()["id"] for _ in range(3)]
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = client.get("/v1/jobs", params={"limit": 1, "before": repr(page["next_before"])}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]]
    assert client.get("/v1/jobs", params={"before": "1e9", "limit": 100}).json()["data"] == []  # 2001: nothing


@pytest.mark.parametrize("key", ["k" * 256, "two words", "tab\there", "", "caf\u00e9"])
def test_idempotency_keys_are_bounded(gateway, key):
    client, _ = gateway
    r = client.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": key.encode("latin-1")})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_parameter" and r.json()["error"]["param"] == "Idempotency-Key"


def test_a_valid_idempotency_key_still_makes_one_job(gateway):
    client, _ = gateway
    key = "order-42/" + "k" * 246  # 255 printable characters
    first = client.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": key})
    again = client.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": key})
    assert (first.status_code, again.status_code) == (202, 200) and first.json()["id"] == again.json()["id"]
