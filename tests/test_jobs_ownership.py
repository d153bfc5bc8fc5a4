"""Job ownership under every ordering, on both backends (a private redis-server per test; the
in-process queue): each state change takes effect only for the delivery that owns the job, a stale
worker neither stores nor removes what the new owner holds, a job whose owner died is reclaimed and
completed once, one idempotency key makes one job, and a worker stops within its grace period with
every slot busy. Job bodies are small coroutines (no engine)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from framewise.server.jobs.memory_queue import MemoryJobQueue
from framewise.server.jobs.redis_queue import GROUP, RedisJobQueue
from framewise.server.jobs.worker import JobWorker

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
VIS = 60.0  # visibility timeout (s): never reached by itself here; `lapse` ages the leases instead
GRACE = 1.0


@pytest.fixture(params=["redis", "memory"])
def backend(request):
    return request.param


@pytest.fixture
def queues(backend, request):
    """``queues(n, **kw)``: n clients of one queue (separate connections for Redis; one in-process queue)."""
    server = request.getfixturevalue("redis_server") if backend == "redis" else None

    def make(n: int, **kw):
        if server is None:
            return [MemoryJobQueue(**kw)] * n
        return [RedisJobQueue(server.url, **kw) for _ in range(n)]

    return make


def run(coro):
    return asyncio.run(coro)


async def lapse(qs) -> None:
    """Every current owner's lease runs out, as if it had been silent for longer than the visibility timeout.
    No sleeping: on a loaded 2-core machine a sub-second timeout also runs out when nobody meant it to (a
    stalled heartbeat), so the tests age the leases where the queue keeps them. Redis: the pending entries'
    idle time (``XCLAIM ... IDLE ... JUSTID`` to the same consumer: no owner or delivery-count change);
    in-process: the lease deadlines."""
    q = qs[0]
    if isinstance(q, MemoryJobQueue):
        for job_id in q.leases:
            q.leases[job_id] = 0.0
        return
    for p in await q.r.xpending_range(q.stream, GROUP, "-", "+", 100):
        await q.r.xclaim(q.stream, GROUP, p["consumer"], 0, [p["message_id"]], idle=int(VIS * 1000) * 10,
                         justid=True)


async def stages(q, job_id: str) -> list[str]:
    return [e["stage"] async for _, e in q.events(job_id)]


async def close(qs) -> None:
    for q in set(qs):
        await q.close()


async def reclaimed(qs):
    """A job claimed by w1, which then goes silent; w2 reclaims it after the visibility timeout."""
    job, _ = await qs[0].submit(REQUEST)
    stale = await qs[0].claim("w1", block_s=1)
    await lapse(qs)
    fresh = await qs[1].claim("w2", block_s=1)
    assert stale.job.id == fresh.job.id == job.id and fresh.token != stale.token
    return job, stale, fresh


async def stale_writes_are_refused(q, stale) -> None:
    assert not await q.heartbeat(stale, "w1")
    assert not await q.progress(stale, {"stage": "generating", "tokens": 99})
    assert not await q.complete(stale, {"by": "w1"})
    assert not await q.fail(stale, {"code": "internal_error", "message": "stale"}, retry=True)
    assert not await q.fail(stale, {"code": "invalid_request", "message": "stale"}, retry=False)
    assert not await q.release(stale)


async def pending_owners(q) -> list[str]:
    return [p["consumer"] for p in await q.r.xpending_range(q.stream, GROUP, "-", "+", 10)]


def test_stale_worker_finishing_before_the_new_owner_changes_nothing(queues, backend):
    async def main():
        qs = queues(3, visibility_timeout_s=VIS)
        job, stale, fresh = await reclaimed(qs)
        await stale_writes_are_refused(qs[0], stale)
        now = await qs[1].get(job.id)
        assert (now.status, now.result, now.error, now.attempts) == ("running", None, None, 2)
        assert now.progress.get("tokens") != 99
        if backend == "redis":  # the entry is still pending, held by the new owner (not acked, not taken back)
            assert await pending_owners(qs[1]) == ["w2"]
        assert await qs[1].heartbeat(fresh, "w2")
        assert await qs[2].claim("w3", block_s=0.05) is None  # the stale release queued nothing
        assert await qs[1].progress(fresh, {"stage": "generating", "tokens": 3})
        assert await qs[1].complete(fresh, {"by": "w2"})
        done = await qs[1].get(job.id)
        assert (done.status, done.result, done.progress) == ("succeeded", {"by": "w2"}, {"stage": "generating",
                                                                                         "tokens": 3})
        assert await qs[1].completions(job.id) == 1 and await qs[1].depth() == 0
        await close(qs)

    run(main())


def test_new_owner_dying_after_a_stale_refusal_is_reclaimed_and_completed_once(queues):
    """The failure mode of the issue: the stale worker's refused result used to remove the entry the
    new owner held; the new owner then died and the job stayed `running` forever."""

    async def main():
        qs = queues(3, visibility_timeout_s=VIS)
        job, stale, fresh = await reclaimed(qs)
        assert not await qs[0].complete(stale, {"by": "w1"})
        assert not await qs[0].fail(stale, {"code": "invalid_request", "message": "stale"}, retry=False)
        waiting = asyncio.create_task(stages(qs[0], job.id))  # a client waiting for the result
        await lapse(qs)  # w2 dies silently
        third = await qs[2].claim("w3", block_s=1)
        assert third is not None and third.job.id == job.id and third.token not in (stale.token, fresh.token)
        assert await qs[2].complete(third, {"by": "w3"})
        assert not await qs[1].complete(fresh, {"by": "w2"})  # w2 was not dead after all: refused too
        seen = await asyncio.wait_for(waiting, 10)
        assert seen[-1] == "done" and seen.count("done") == 1 and seen.count("running") == 3
        done = await qs[2].get(job.id)
        assert (done.status, done.result, done.attempts) == ("succeeded", {"by": "w3"}, 3)
        assert await qs[2].completions(job.id) == 1 and await qs[2].depth() == 0
        await lapse(qs)
        assert await qs[0].claim("w4", block_s=0.2) is None
        await close(qs)

    run(main())


def test_stale_worker_finishing_after_the_new_owner_changes_nothing(queues):
    async def main():
        qs = queues(3, visibility_timeout_s=VIS)
        job, stale, fresh = await reclaimed(qs)
        assert await qs[1].complete(fresh, {"by": "w2"})
        await stale_writes_are_refused(qs[0], stale)  # including the late release()
        done = await qs[0].get(job.id)
        assert (done.status, done.result, done.error) == ("succeeded", {"by": "w2"}, None)
        await lapse(qs)
        assert await qs[2].claim("w3", block_s=0.2) is None  # never runs again
        assert await qs[0].completions(job.id) == 1 and await qs[0].depth() == 0
        await close(qs)

    run(main())


@pytest.mark.parametrize("end", ["complete", "cancel"])
def test_late_release_after_complete_or_cancel_leaves_the_job_as_it_is(queues, end):
    async def main():
        qs = queues(2, visibility_timeout_s=VIS)
        job, _ = await qs[0].submit(REQUEST)
        claim = await qs[0].claim("w1", block_s=1)
        if end == "complete":
            assert await qs[0].complete(claim, {"ok": 1})
        else:
            await qs[1].cancel(job.id)
        assert not await qs[0].release(claim)  # shutdown hand-back after the fact
        after = await qs[1].get(job.id)
        assert after.status == ("succeeded" if end == "complete" else "cancelled")
        assert after.attempts == 1
        await lapse(qs)
        assert await qs[1].claim("w2", block_s=0.2) is None  # never runs twice
        assert await qs[1].completions(job.id) == (1 if end == "complete" else 0)
        assert await qs[1].depth() == 0  # the entry is gone, not left pending
        await close(qs)

    run(main())


def test_concurrent_submits_with_one_idempotency_key_create_one_job(queues, backend):
    async def main():
        qs = queues(2)
        keys = [f"key-{i}" for i in range(25)]
        for k in keys:  # one client, and two clients on separate connections
            same = await asyncio.gather(*(qs[0].submit(REQUEST, idempotency_key=k + "a") for _ in range(2)))
            other = await asyncio.gather(*(q.submit(REQUEST, idempotency_key=k + "b") for q in qs))
            for pair in (same, other):
                assert pair[0][0].id == pair[1][0].id
                assert sorted(created for _, created in pair) == [False, True]
        jobs = await qs[0].list(None, 100, None)
        assert len(jobs) == 2 * len(keys) and len({j.idempotency_key for j in jobs}) == 2 * len(keys)
        assert await qs[0].depth() == 2 * len(keys)  # one queue entry per key
        await close(qs)

    run(main())


def test_idempotency_race_between_processes_creates_one_job(redis_server):
    """Redis clients on their own event loops and connections (as gateway processes are), released
    together for each key: the check and the insert must be one atomic step, not two round trips.
    (The in-process queue has a single event loop; the test above covers it.)"""
    clients, n_keys = 3, 150
    barrier = threading.Barrier(clients)
    ids: list[list[str]] = [[] for _ in range(clients)]

    def client(i: int) -> None:
        async def main():
            q = RedisJobQueue(redis_server.url)
            for k in range(n_keys):
                await asyncio.to_thread(barrier.wait, 10)
                ids[i].append((await q.submit(REQUEST, idempotency_key=f"key-{k}"))[0].id)
            await q.close()

        asyncio.run(main())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(len(x) == n_keys for x in ids)
    assert [k for k in range(n_keys) if len({x[k] for x in ids}) != 1] == []

    async def depth():
        q = RedisJobQueue(redis_server.url)
        try:
            return await q.depth(), len(await q.list(None, 2 * n_keys, None))
        finally:
            await q.close()

    assert run(depth()) == (n_keys, n_keys)  # one job and one queue entry per key


def test_job_stuck_running_with_no_live_owner_is_reclaimed_by_a_worker(queues):
    async def main():
        qs = queues(2, visibility_timeout_s=VIS)
        job, _ = await qs[0].submit(REQUEST)
        assert (await qs[0].claim("crashed", block_s=1)).job.id == job.id  # ... and never heard of again
        await lapse(qs)
        waiting = asyncio.create_task(stages(qs[0], job.id))
        runs = []

        async def body(job, report):
            runs.append(job.id)
            return {"ok": True}

        stop = asyncio.Event()
        worker = JobWorker(qs[1], body, consumer="w2", heartbeat_s=0.1)
        task = asyncio.create_task(worker.run(stop, grace_s=1))
        seen = await asyncio.wait_for(waiting, 10)
        stop.set()
        await asyncio.wait_for(task, 5)
        assert seen[-1] == "done" and seen.count("done") == 1 and runs == [job.id]
        done = await qs[0].get(job.id)
        assert (done.status, done.result, done.attempts) == ("succeeded", {"ok": True}, 2)
        assert await qs[0].completions(job.id) == 1 and await qs[0].depth() == 0
        await close(qs)

    run(main())


def test_worker_that_lost_its_job_stops_it_and_stores_nothing(queues):
    """A worker whose heartbeat came too late learns from its next heartbeat that another delivery owns the
    job: it cancels the work and writes nothing; the new owner's result stands."""

    async def main():
        qs = queues(2, visibility_timeout_s=VIS)
        job, _ = await qs[0].submit(REQUEST)
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def body(job, report):
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async def keep(claim):  # the new owner's heartbeat
            while await qs[1].heartbeat(claim, "w2"):
                await asyncio.sleep(0.05)

        stop = asyncio.Event()
        slow = JobWorker(qs[0], body, consumer="w1", concurrency=1, heartbeat_s=2.0)  # loses its lease
        task = asyncio.create_task(slow.run(stop, grace_s=1))
        await asyncio.wait_for(started.wait(), 5)
        fresh = None
        for _ in range(5):  # (w1's heartbeat may renew its lease between the lapse and the claim: again)
            await lapse(qs)
            if fresh := await qs[1].claim("w2", block_s=0.05):
                break
        assert fresh is not None and fresh.job.id == job.id
        beat = asyncio.create_task(keep(fresh))
        await asyncio.wait_for(cancelled.wait(), 30)
        if slow.running:  # its run ends without storing anything
            await asyncio.wait([t for _, t in slow.running.values()], timeout=5)
        assert not slow.running
        now = await qs[1].get(job.id)
        assert (now.status, now.error) == ("running", None)  # the stale worker stored no failure
        assert await qs[1].complete(fresh, {"by": "w2"})
        await beat
        stop.set()
        await asyncio.wait_for(task, 5)
        done = await qs[1].get(job.id)
        assert (done.status, done.result) == ("succeeded", {"by": "w2"}) and await qs[1].completions(job.id) == 1
        await close(qs)

    run(main())


def test_stop_with_every_slot_busy_returns_within_grace_and_hands_jobs_back(queues):
    async def main():
        qs = queues(2)
        ids = [(await qs[0].submit({**REQUEST, "n": i}))[0].id for i in range(3)]
        started, cancelled, both = [], [], asyncio.Event()

        async def forever(job, report):
            started.append(job.id)
            if len(started) == 2:
                both.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(job.id)
                raise

        stop = asyncio.Event()
        worker = JobWorker(qs[0], forever, consumer="w1", concurrency=2, heartbeat_s=0.1)
        task = asyncio.create_task(worker.run(stop, grace_s=GRACE))
        await asyncio.wait_for(both.wait(), 5)  # both slots busy, the third job waiting
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        stop.set()
        await asyncio.wait_for(task, GRACE + 5)
        elapsed = loop.time() - t0
        assert GRACE - 0.05 <= elapsed < GRACE + 5, elapsed  # (slack: a loaded 2-core machine)
        assert sorted(cancelled) == sorted(started) and len(started) == 2
        for job_id in ids:
            job = await qs[1].get(job_id)
            assert (job.status, job.attempts) == ("queued", 0)
        taken = [await qs[1].claim("w2", block_s=1) for _ in ids]  # another worker takes all three
        assert sorted(c.job.id for c in taken) == sorted(ids)
        for c in taken:
            assert await qs[1].complete(c, {"ok": 1})
        assert await qs[1].depth() == 0
        await close(qs)

    run(main())


def test_jobs_finishing_within_the_grace_period_are_stored(queues):
    async def main():
        qs = queues(1)
        quick, _ = await qs[0].submit({**REQUEST, "quick": True})
        slow, _ = await qs[0].submit(REQUEST)
        finish, both, started = asyncio.Event(), asyncio.Event(), []

        async def body(job, report):
            started.append(job.id)
            if len(started) == 2:
                both.set()
            if job.request.get("quick"):
                await finish.wait()
                return {"quick": True}
            await asyncio.Event().wait()

        stop = asyncio.Event()
        worker = JobWorker(qs[0], body, consumer="w1", concurrency=2, heartbeat_s=0.1)
        task = asyncio.create_task(worker.run(stop, grace_s=2 * GRACE))
        await asyncio.wait_for(both.wait(), 5)
        stop.set()
        await asyncio.sleep(0.1)
        finish.set()  # within the grace period
        await asyncio.wait_for(task, 2 * GRACE + 5)
        assert (await qs[0].get(quick.id)).status == "succeeded" and await qs[0].completions(quick.id) == 1
        assert ((await qs[0].get(slow.id)).status, (await qs[0].get(slow.id)).attempts) == ("queued", 0)
        await close(qs)

    run(main())
