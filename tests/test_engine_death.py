"""Engine death is fatal and visible (issue 21, item 1; server/lifecycle.py, server/jobs/worker.py).

Without a vLLM engine: the stand-in engine of tests/live_support.py dies on demand (its ``dead`` flag, or a
file appearing for a subprocess). What a real engine core SIGKILLed does is tests/test_faults.py's.

- gateway: ``/health`` (the liveness probe) and ``/ready`` answer 503 ``engine_dead``, a new chat request 503
  ``engine_dead``, a stream in flight ends with the ``engine_dead`` error event; then the process exits with
  status 1 (``framewise serve``'s server, :func:`framewise.server.lifecycle.run_server`, in a subprocess).
- worker: stops claiming at once and hands back every job it holds without spending an attempt, a job that
  met ``engine_dead`` included (not retried); another worker then completes each once.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from framewise.server.app import create_app
from framewise.server.jobs.memory_queue import MemoryJobQueue
from framewise.server.jobs.redis_queue import RedisJobQueue
from framewise.server.jobs.worker import JobWorker
from framewise.server.lifecycle import DEATH_DRAIN_S
from framewise.server.settings import Settings
from tests.live_support import KEY, MODEL, LiveGateway, StandInEngine, sse, wait_for
from tests.redis_support import RedisServer

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def app_and_engine(tc_llava_dir, tmp_path):
    engine = StandInEngine(tc_llava_dir, steps=40, step_s=0.05)
    settings = Settings(model=str(tc_llava_dir), served_model_name=MODEL, api_keys=[KEY], decode_workers=1,
                        files_dir=str(tmp_path / "files"))
    return create_app(settings, engine=engine), engine


def test_a_dead_engine_turns_health_503_and_asks_the_server_to_exit(app_and_engine):
    app, engine = app_and_engine
    services = app.state.services
    exits: list[float] = []
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as client:
        services.lifecycle.on_exit(exits.append)  # what run_server registers: shut the server down
        assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
        # a stream in flight when the engine core dies (after 3 deltas): the error event, and at once (not at
        # the watcher's next look) the process is marked dead
        engine.die_after = 3
        with client.stream("POST", "/v1/chat/completions",
                           json={"model": MODEL, "messages": HI, "stream": True, "max_tokens": 5}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        assert events[0]["object"] == "chat.completion.chunk" and len(events) > 3
        assert events[-1]["error"]["code"] == "engine_dead"
        health = client.get("/health")
        assert (health.status_code, health.json()["error"]["code"]) == (503, "engine_dead")
        assert client.get("/ready").json()["error"]["code"] == "engine_dead"
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 2})
        assert (r.status_code, r.json()["error"]["code"]) == (503, "engine_dead")
        assert services.lifecycle.exit_code == 1
        wait_for(lambda: exits, 10, "the server to be asked to shut down")
        assert exits == [pytest.approx(min(services.lifecycle.drain_s, DEATH_DRAIN_S))]
        assert services.lifecycle.shutting_down


def test_the_watcher_notices_a_death_without_a_request(app_and_engine):
    app, engine = app_and_engine
    with TestClient(app) as client:
        engine.dead = True  # no request on the engine: the engine watcher looks every second
        wait_for(lambda: client.get("/health").status_code == 503, 10, "/health to answer 503")
        assert app.state.services.lifecycle.exit_code == 1


def test_serve_exits_with_status_1_after_its_engine_died(tc_llava_dir, tmp_path):
    """The server `framewise serve` runs: /health 503 while it lingers, then exit status 1 (the orchestrator
    restarts it); a stream in flight ends with the engine_dead error event."""
    death = tmp_path / "engine-died"
    gw = LiveGateway(tmp_path, tc_llava_dir, engine={"steps": 200, "step_s": 0.05, "death_file": str(death)},
                     drain_s=30)
    try:
        with httpx.stream("POST", gw.url("/v1/chat/completions"), headers=gw.headers, timeout=60,
                          json={"model": MODEL, "messages": HI, "stream": True, "max_tokens": 200}) as s:
            lines = s.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            death.touch()
            died = time.monotonic()
            body = "\n\n".join(lines)
        assert [e["data"]["error"]["code"] for e in sse(body) if "error" in e.get("data", {})] == ["engine_dead"]
        r = httpx.get(gw.url("/health"), timeout=5)  # the process lingers 2 s with /health 503
        assert (r.status_code, r.json()["error"]["code"]) == (503, "engine_dead")
        assert gw.wait_exit(60) == 1
        assert time.monotonic() - died < 30  # not the 30 s drain: the engine death drain is shorter
        assert "the inference engine died" in gw.log_text()
    finally:
        gw.close()


def test_gateway_worker_hands_back_its_jobs_without_spending_attempts(tc_llava_dir, tmp_path, redis_server):
    """A gateway that also consumes jobs (``--consume``) when its engine dies: its running jobs go back to
    the queue with the attempt count they had, and the process exits 1."""
    death = tmp_path / "engine-died"
    gw = LiveGateway(tmp_path, tc_llava_dir, engine={"steps": 400, "step_s": 0.05, "death_file": str(death)},
                     redis_url=redis_server.url, consume=True, worker_concurrency=2)

    async def main():
        q = RedisJobQueue(redis_server.url)
        ids = [(await q.submit({"model": MODEL, "messages": HI, "max_tokens": 5}))[0].id for _ in range(3)]
        deadline = time.time() + 60
        while [(await q.get(i)).status for i in ids].count("running") < 2:
            assert time.time() < deadline, "the gateway's worker did not take two jobs"
            await asyncio.sleep(0.1)
        death.touch()
        assert await asyncio.to_thread(gw.wait_exit, 60) == 1
        jobs = [await q.get(i) for i in ids]
        assert [j.status for j in jobs] == ["queued"] * 3, [j.public() for j in jobs]
        assert [j.attempts for j in jobs] == [0, 0, 0]
        assert all(j.error is None for j in jobs)
        # another worker completes each once, in one attempt
        worker = JobWorker(RedisJobQueue(redis_server.url), _answer, consumer="healthy", concurrency=3)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        while [(await q.get(i)).status for i in ids] != ["succeeded"] * 3:
            assert time.time() < deadline + 60
            await asyncio.sleep(0.1)
        stop.set()
        await task
        assert [(await q.get(i)).attempts for i in ids] == [1, 1, 1]
        assert [await q.completions(i) for i in ids] == [1, 1, 1]
        await q.close()

    try:
        asyncio.run(main())
    finally:
        gw.close()


async def _answer(job, report):
    return {"answer": job.id}


@pytest.fixture(params=["redis", "memory"])
def queue(request, tmp_path):
    if request.param == "memory":
        yield MemoryJobQueue()
        return
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    yield RedisJobQueue(server.url)
    server.close()


class EngineDead(RuntimeError):
    code = "engine_dead"  # what the pipeline raises for a dead engine (pipeline.EngineFailure)


def test_worker_stops_at_once_and_hands_back_held_jobs_and_the_failed_one(queue):
    async def main():
        ids = [(await queue.submit({"n": i}))[0].id for i in range(3)]
        fatal = asyncio.Event()
        started = asyncio.Event()

        async def execute(job, report):
            if job.request["n"] == 0:  # meets the dead engine first: EngineDeadError from generate
                await started.wait()
                fatal.set()
                raise EngineDead("engine_dead: the inference engine died")
            started.set()
            await asyncio.sleep(60)

        worker = JobWorker(queue, execute, consumer="dying", concurrency=3, heartbeat_s=0.2, fatal=fatal)
        t0 = time.monotonic()
        await asyncio.wait_for(worker.run(asyncio.Event(), grace_s=30), 10)  # grace is not waited: it is dead
        assert time.monotonic() - t0 < 8
        jobs = [await queue.get(i) for i in ids]
        assert [(j.status, j.attempts, j.error) for j in jobs] == [("queued", 0, None)] * 3
        claims = [await queue.claim("healthy", block_s=1) for _ in ids]  # nothing left pending elsewhere
        assert sorted(c.job.id for c in claims) == sorted(ids)
        for c in claims:
            assert await queue.complete(c, {"ok": True})
        assert [(await queue.get(i)).attempts for i in ids] == [1, 1, 1]
        await queue.close()

    asyncio.run(main())


def test_an_engine_failure_on_a_live_engine_is_still_retried(queue):
    """``engine_dead`` that the engine does not confirm (a stand-in, a transient): retried as before."""

    async def main():
        job, _ = await queue.submit({"n": 0})
        runs = []

        async def execute(job, report):
            runs.append(job.id)
            if len(runs) == 1:
                raise EngineDead("engine_dead")
            return {"ok": True}

        queue.visibility_ms = 200  # (redis) a retried job is reclaimed after the visibility timeout
        queue.visibility_s = 0.2  # (memory)
        worker = JobWorker(queue, execute, consumer="w", heartbeat_s=0.1, fatal=asyncio.Event())
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        deadline = time.time() + 30
        while (await queue.get(job.id)).status != "succeeded":
            assert time.time() < deadline
            await asyncio.sleep(0.1)
        stop.set()
        await task
        final = await queue.get(job.id)
        assert final.attempts == 2 and final.error is None  # a success leaves no stale error
        await queue.close()

    asyncio.run(main())
