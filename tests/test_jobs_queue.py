"""Job queue semantics on both backends (real redis-server; the in-process queue), and workers
surviving crashes and a Redis restart. The executor here is a small coroutine; the engine-backed
path is covered by tests/test_jobs_api.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from framewise.server.jobs.base import JobNotFound
from framewise.server.jobs.memory_queue import MemoryJobQueue
from framewise.server.jobs.redis_queue import RedisJobQueue
from framewise.server.jobs.worker import JobWorker

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(params=["redis", "memory"])
def make_queue(request, redis_server):
    def make(**kw):
        return RedisJobQueue(redis_server.url, **kw) if request.param == "redis" else MemoryJobQueue(**kw)

    return make


def run(coro):
    return asyncio.run(coro)


def test_submit_progress_result_and_events(make_queue):
    async def main():
        q = make_queue()
        job, created = await q.submit(REQUEST)
        assert created and job.status == "queued"
        claim = await q.claim("w1", block_s=1)
        assert claim.job.id == job.id and (await q.get(job.id)).status == "running"
        await q.progress(claim, {"stage": "decoding", "frames_done": 8, "frames_total": 8})
        await q.progress(claim, {"stage": "generating", "tokens": 5})
        assert await q.complete(claim, {"answer": 42})
        done = await q.get(job.id)
        assert (done.status, done.result, done.attempts) == ("succeeded", {"answer": 42}, 1)
        stages = [e["stage"] async for _, e in q.events(job.id)]
        assert stages == ["queued", "running", "decoding", "generating", "done"]
        assert await q.depth() == 0
        await q.close()

    run(main())


def test_idempotency_cancel_list_and_ttl(make_queue):
    async def main():
        q = make_queue(result_ttl_s=1)
        a, created = await q.submit(REQUEST, idempotency_key="k1")
        b, again = await q.submit(REQUEST, idempotency_key="k1")
        assert created and not again and a.id == b.id
        c, _ = await q.submit(REQUEST)
        assert (await q.cancel(c.id)).status == "cancelled"
        claim = await q.claim("w1", block_s=1)
        assert claim.job.id == a.id  # the cancelled job is skipped
        assert await q.claim("w1", block_s=0.2) is None
        assert [j.id for j in await q.list("cancelled", 10, None)] == [c.id]
        assert [j.id for j in await q.list(None, 1, None)] == [c.id]  # newest first, paginated
        assert [j.id for j in await q.list(None, 1, c.created_at)] == [a.id]
        assert (await q.cancel(a.id)).status == "cancelled"  # running jobs can be cancelled
        assert await q.is_cancelled(a.id) and not await q.complete(claim, {"late": True})
        await asyncio.sleep(2.2)  # past the result TTL
        for job_id in (a.id, c.id):
            with pytest.raises(JobNotFound):
                await q.get(job_id)
        await q.close()

    run(main())


def test_retry_limit_dead_letters_a_poison_job_without_blocking_others(make_queue):
    async def main():
        q = make_queue(max_attempts=2, visibility_timeout_s=2.0)  # a failed attempt is retried after this
        assert await q.dead_letters() == 0
        poison, _ = await q.submit({**REQUEST, "poison": True})
        good, _ = await q.submit(REQUEST)

        async def execute(job, report):
            if job.request.get("poison"):
                raise RuntimeError("worker code blew up")
            return {"ok": True}

        worker = JobWorker(q, execute, consumer="w1", concurrency=2, heartbeat_s=0.1)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        deadline = time.time() + 20
        while time.time() < deadline and (await q.get(poison.id)).status != "failed":
            await asyncio.sleep(0.1)
        stop.set()
        await task
        assert (await q.get(good.id)).status == "succeeded"
        dead = await q.get(poison.id)
        assert dead.status == "failed" and dead.error["code"] == "retry_limit"
        assert "blew up" in dead.error["last_error"]["message"]
        assert await q.dead_letters() == 1  # what framewise_job_dead_letters reports
        await q.close()

    run(main())


def test_reclaimed_job_is_stored_exactly_once(redis_server):
    """A worker that stops heart-beating loses its job; its late result is refused."""

    async def main():
        q1 = RedisJobQueue(redis_server.url, visibility_timeout_s=60)
        q2 = RedisJobQueue(redis_server.url, visibility_timeout_s=60)
        job, _ = await q1.submit(REQUEST)
        stale = await q1.claim("dead-worker", block_s=1)
        assert await q2.claim("w2", block_s=0.1) is None  # still within the visibility timeout
        # the dead worker's entry ages past the visibility timeout (its idle time set, not slept)
        await q2.r.xclaim(q2.stream, "workers", "dead-worker", 0, [stale.token.rsplit(":", 1)[0]], idle=120_000,
                          justid=True)
        fresh = await q2.claim("w2", block_s=1)
        assert fresh.job.id == job.id and fresh.token != stale.token
        assert await q2.complete(fresh, {"by": "w2"})
        assert not await q1.complete(stale, {"by": "dead-worker"})
        done = await q2.get(job.id)
        assert done.result == {"by": "w2"} and done.attempts == 2 and await q2.completions(job.id) == 1
        assert q2.reclaims == 1
        await q1.close()
        await q2.close()

    run(main())


def test_jobs_survive_a_redis_restart(redis_server):
    """Queued and running jobs when Redis dies (SIGKILL, AOF fsync always): after the restart every
    job completes, none lost, none stored twice."""

    async def main():
        q = RedisJobQueue(redis_server.url, visibility_timeout_s=1.0)
        ids = [(await q.submit({**REQUEST, "n": i}))[0].id for i in range(12)]
        gate = asyncio.Event()

        async def execute(job, report):
            await report({"stage": "generating", "tokens": 1})
            await gate.wait()
            return {"n": job.request["n"]}

        worker = JobWorker(q, execute, consumer="w1", concurrency=3, heartbeat_s=0.2)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        while len(worker.running) < 3:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(redis_server.restart)  # 3 running, 9 queued
        gate.set()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                statuses = [(await q.get(i)).status for i in ids]
                if all(s == "succeeded" for s in statuses):
                    break
            except Exception:
                pass
            await asyncio.sleep(0.2)
        stop.set()
        await task
        for i, job_id in enumerate(ids):
            job = await q.get(job_id)
            assert job.status == "succeeded" and job.result == {"n": i}
            assert await q.completions(job_id) == 1
        assert await q.depth() == 0
        await q.close()

    run(main())


def test_200_jobs_through_3_workers(redis_server):
    async def main():
        queues = [RedisJobQueue(redis_server.url, visibility_timeout_s=5) for _ in range(4)]
        ids = [(await queues[0].submit({**REQUEST, "n": i}))[0].id for i in range(200)]
        seen: dict[str, list[str]] = {}

        def executor(name):
            async def execute(job, report):
                seen.setdefault(job.id, []).append(name)
                await asyncio.sleep(0.002)
                return {"n": job.request["n"], "by": name}
            return execute

        stop = asyncio.Event()
        workers = [JobWorker(queues[i + 1], executor(f"w{i}"), consumer=f"w{i}", concurrency=4) for i in range(3)]
        tasks = [asyncio.create_task(w.run(stop)) for w in workers]
        deadline = time.time() + 60
        while time.time() < deadline and await queues[0].depth() > 0:
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*tasks)
        jobs = [await queues[0].get(i) for i in ids]
        assert all(j.status == "succeeded" for j in jobs)
        assert all(len(seen[i]) == 1 for i in ids)
        assert [await queues[0].completions(i) for i in ids] == [1] * len(ids)
        assert len({j.result["by"] for j in jobs}) == 3  # the work was spread
        assert await queues[0].depth() == 0
        for q in queues:
            await q.close()

    run(main())


def test_graceful_shutdown_hands_running_jobs_back(redis_server):
    async def main():
        q = RedisJobQueue(redis_server.url)
        job, _ = await q.submit(REQUEST)

        async def slow(job, report):
            await asyncio.sleep(60)

        stop = asyncio.Event()
        worker = JobWorker(q, slow, consumer="w1")
        task = asyncio.create_task(worker.run(stop, grace_s=0.5))
        while not worker.running:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 10)
        back = await q.get(job.id)
        assert back.status == "queued" and back.attempts == 0
        claim = await q.claim("w2", block_s=1)
        assert claim.job.id == job.id and await q.complete(claim, {"ok": 1})
        await q.close()

    run(main())
