"""The queue's own numbers (issue 21, item 5): depth counts the jobs queued or running exactly under every
ordering of the stream deletions, the KEDA triggers read those counts, the keys the queue writes stay
bounded (listing index, dead letters, consumers of gone workers), and the counts it exports are Counters
with the worker's outcomes apart. A private redis-server per test (tests/redis_support.py); no engine."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from types import SimpleNamespace

import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from framewise.server.errors import APIError
from framewise.server.jobs.base import FINAL
from framewise.server.jobs.memory_queue import MemoryJobQueue
from framewise.server.jobs.redis_queue import GROUP, RedisJobQueue, state_keys
from framewise.server.jobs.worker import JobWorker
from framewise.server.metrics import Metrics, refresh_queue_gauges
from tests.conftest import ROOT

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
CLIENT_ERROR = {"code": "invalid_request", "status": 400, "message": "bad"}
INTERNAL = {"code": "internal_error", "status": 500, "message": "boom"}


def run(coro):
    return asyncio.run(coro)


async def truth(q, ids) -> dict[str, int]:
    """Queued and running jobs by their stored status: what depth must say."""
    if isinstance(q, RedisJobQueue):  # one round trip
        async with q.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(q._job(job_id), "status")
            statuses = await pipe.execute()
    else:
        statuses = [q.jobs[i].status if i in q.jobs else None for i in ids]
    return {"queued": statuses.count("queued"), "running": statuses.count("running")}


async def check(q, ids, where: str) -> None:
    want = await truth(q, ids)
    assert await q.counts() == want, where
    assert await q.depth() == want["queued"] + want["running"], where


# ---- the finding: consumer-group lag is NULL after XDEL ------------------------------------------


def test_redis_reports_consumer_group_lag_as_null_after_xdel(redis_server):
    """FINDING (proved, redis-server 7.0.15 here): once an entry at or after the group's last-delivered id is
    XDEL'd while an older entry is still in the stream, XINFO GROUPS reports ``lag`` as NULL (Redis cannot
    tell how many entries it skipped). The queue XDELs every finished entry, so the old ``depth()`` =
    ``(lag or 0) + pending`` undercounted, and KEDA's ``lagCount`` (which reads the same field) saw no
    backlog: with concurrency 2, a job finishing before the one delivered just before it; with concurrency
    1, any job finishing while an earlier entry is still pending (a retry, a crashed worker's job)."""
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    version = r.info()["redis_version"]

    def lag_and_pending() -> tuple:
        [g] = r.xinfo_groups("s")
        return g["lag"], g["pending"]

    # concurrency 2: e0 and e1 delivered, e1 finishes first (ack + XDEL); e2 waits
    r.xgroup_create("s", "g", id="0", mkstream=True)
    e = [r.xadd("s", {"n": i}) for i in range(3)]
    r.xreadgroup("g", "w", {"s": ">"}, count=2)
    assert lag_and_pending() == (1, 2)  # right before any deletion
    r.xack("s", "g", e[1])
    r.xdel("s", e[1])
    lag, pending = lag_and_pending()
    assert lag is None, f"redis {version}: lag {lag}"
    assert (lag or 0) + pending == 1  # the old depth: 1, while e0 runs and e2 waits (2 unfinished)

    # concurrency 1: e0 delivered and left pending (an attempt that will be retried), e1 delivered, finished
    r.delete("s")
    r.xgroup_create("s", "g", id="0", mkstream=True)
    e = [r.xadd("s", {"n": i}) for i in range(4)]
    r.xreadgroup("g", "w", {"s": ">"}, count=1)
    r.xreadgroup("g", "w", {"s": ">"}, count=1)
    r.xack("s", "g", e[1])
    r.xdel("s", e[1])
    lag, pending = lag_and_pending()
    assert lag is None, f"redis {version}: lag {lag}"
    assert (lag or 0) + pending == 1  # the old depth: 1, while e0 waits for its retry and e2, e3 wait (3)
    r.close()


# ---- depth under every XDEL order ------------------------------------------------------------------


async def _play_xdel_order(q, order: tuple[int, ...], concurrency: int, variant: int) -> None:
    """Run len(order) jobs so that their stream entries are deleted exactly in ``order``, with at most
    ``concurrency`` jobs holding a worker slot. A job that must finish after a later one gives its slot up
    with a retry (its entry stays pending, its delivery still owns it) and is finished from there later.
    Each job ends by a completion, a client error, or a cancel the worker then acknowledges (rotating with
    ``variant``). Depth is checked after every step."""
    ids = [(await q.submit({**REQUEST, "n": i}))[0].id for i in range(len(order))]
    await check(q, ids, "submitted")
    claims: dict[int, object] = {}
    slots: list[int] = []
    claimed = 0
    for step, target in enumerate(order):
        while target not in claims:
            if len(slots) == concurrency:  # free a slot: the held job that is deleted last retries
                victim = max(slots, key=order.index)
                assert await q.fail(claims[victim], INTERNAL, retry=True)
                slots.remove(victim)
                await check(q, ids, f"{order} c={concurrency}: retry of {victim}")
            claim = await q.claim("w1", block_s=0.05)
            assert claim is not None and claim.job.id == ids[claimed]
            claims[claimed] = claim
            slots.append(claimed)
            claimed += 1
            await check(q, ids, f"{order} c={concurrency}: claim of {claimed - 1}")
        claim = claims[target]
        end = ("complete", "fail", "cancel")[(step + variant) % 3]
        if end == "complete":
            assert await q.complete(claim, {"n": target})
        elif end == "fail":
            assert await q.fail(claim, CLIENT_ERROR, retry=False)
        else:
            await q.cancel(ids[target])
            await check(q, ids, f"{order} c={concurrency}: cancel of running {target}")
            assert not await q.fail(claim, {"code": "cancelled"}, retry=False)  # acknowledged, status kept
        if target in slots:
            slots.remove(target)
        await check(q, ids, f"{order} c={concurrency}: {end} of {target}")
    assert await q.r.xlen(q.stream) == 0  # every entry was deleted
    assert await q.depth() == 0 and await truth(q, ids) == {"queued": 0, "running": 0}


@pytest.mark.parametrize("concurrency", [1, 2])
def test_depth_counts_queued_and_running_jobs_under_every_xdel_order(redis_server, concurrency):
    """Every permutation of the order in which 4 jobs' entries are deleted (acknowledged and XDEL'd), with
    one or two worker slots: depth (and the queued/running split) equals the number of jobs whose status
    is queued/running after every single step. Redis's consumer-group lag goes NULL in most of these."""

    async def main():
        for i, order in enumerate(itertools.permutations(range(4))):
            q = RedisJobQueue(redis_server.url, prefix=f"o{concurrency}-{i}")
            try:
                await _play_xdel_order(q, order, concurrency, variant=i)
            finally:
                await q.close()

    run(main())


async def _play_random(q, rng: random.Random, concurrency: int, steps: int) -> None:
    """Random operations by one worker with ``concurrency`` slots and clients: submits (some resubmitting an
    idempotency key), cancels of queued and running jobs, completions, client errors, retries, hand-backs,
    a dead-lettered delivery. Depth is checked after every step."""
    ids: list[str] = []
    held: list = []
    for step in range(steps):
        ops = ["submit", "submit", "claim", "cancel_any"]
        if held:
            ops += ["complete", "fail", "retry", "release", "cancel_held", "complete"]
        op = rng.choice(ops)
        if op == "submit":
            key = rng.choice([None, None, "k1", "k2"])
            job, _ = await q.submit({**REQUEST, "step": step}, idempotency_key=key)
            if job.id not in ids:
                ids.append(job.id)
        elif op == "claim" and len(held) < concurrency:
            if rng.random() < 0.15:  # this delivery is over the attempt limit: dead-lettered
                q.max_attempts = 0
            claim = await q.claim("w1", block_s=0.05)
            q.max_attempts = 3
            if claim is not None:
                held.append(claim)
        elif op == "cancel_any" and ids:
            await q.cancel(rng.choice(ids))
        elif op in ("complete", "fail", "retry", "release", "cancel_held") and held:
            claim = held.pop(rng.randrange(len(held)))
            if op == "complete":
                await q.complete(claim, {"ok": True})
            elif op == "fail":
                await q.fail(claim, CLIENT_ERROR, retry=False)
            elif op == "retry":
                await q.fail(claim, INTERNAL, retry=True)
            elif op == "release":
                await q.release(claim)
            else:
                await q.cancel(claim.job.id)
                await check(q, ids, f"step {step}: cancel of a running job")
                await q.fail(claim, {"code": "cancelled"}, retry=False)
        await check(q, ids, f"step {step}: {op}")
    # drain: whatever is left ends (queued ones are cancelled, running ones completed)
    for claim in held:
        await q.complete(claim, {"ok": True})
    for job_id in ids:
        if (await q.get(job_id)).status not in FINAL:
            await q.cancel(job_id)
    await check(q, ids, "drained")
    assert await q.depth() == 0


@pytest.mark.parametrize("backend", ["redis", "memory"])
@pytest.mark.parametrize("concurrency", [1, 2])
def test_depth_matches_job_statuses_under_random_operations(redis_server, backend, concurrency):
    """Seeded random mixes of every state change on both backends (the in-process queue counts the same
    way): depth and the queued/running split equal the stored statuses after each step."""

    async def main():
        for seed in range(12):
            q = (RedisJobQueue(redis_server.url, prefix=f"r{concurrency}-{seed}") if backend == "redis"
                 else MemoryJobQueue())
            try:
                await _play_random(q, random.Random(seed * 10 + concurrency), concurrency, steps=40)
            finally:
                await q.close()

    run(main())


def _keda_length(r: redis.Redis, key: str) -> int:
    """What KEDA's ``redis`` scaler reads for ``listName``: the length by the key's type (SCARD for a set)."""
    kind = r.type(key)
    return {"set": r.scard, "list": r.llen, "zset": r.zcard, "hash": r.hlen}.get(kind, lambda _k: 0)(key)


def test_keda_triggers_read_the_exact_counts(redis_server):
    """The ScaledObject's triggers name the keys the queue keeps, and KEDA's read of them gives the exact
    queued and running counts in a state where the consumer group's lag is NULL."""
    so = [d for d in yaml.safe_load_all((ROOT / "deploy/k8s/components/keda/scaledobject.yaml").read_text())
          if d and d["kind"] == "ScaledObject"][0]
    triggers = {t["metadata"]["listName"]: t for t in so["spec"]["triggers"]}
    keys = state_keys("fw")
    assert set(triggers) == set(keys.values()) and {t["type"] for t in triggers.values()} == {"redis"}

    async def main():
        q = RedisJobQueue(redis_server.url)  # the default prefix, as deployed
        ids = [(await q.submit({**REQUEST, "n": i}))[0].id for i in range(6)]
        first, second = await q.claim("w1", 0.05), await q.claim("w1", 0.05)
        assert await q.complete(second, {"ok": 1})  # finished before the job delivered ahead of it
        await q.cancel(ids[5])  # a cancelled job's entry is still in the stream
        await q.close()
        return first

    first = run(main())
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    [group] = r.xinfo_groups("fw:stream")
    assert group["name"] == GROUP and group["lag"] is None  # what a lagCount trigger would have read
    assert _keda_length(r, keys["queued"]) == 3  # ids[2..4]
    assert _keda_length(r, keys["running"]) == 1 and r.smembers(keys["running"]) == {first.job.id}
    r.close()


# ---- bounded keys ----------------------------------------------------------------------------------


def test_listing_index_is_pruned_of_expired_jobs_on_submit(redis_server):
    """Finished jobs leave ``{p}:index`` when their result TTL runs out (pruned by the next submit), while
    unfinished jobs stay listed however old they are."""

    async def main():
        q = RedisJobQueue(redis_server.url, result_ttl_s=1)
        ids = [(await q.submit({**REQUEST, "n": i}))[0].id for i in range(6)]
        for _ in range(3):
            assert await q.complete(await q.claim("w1", 0.05), {"ok": 1})
        await q.cancel(ids[3])
        running = await q.claim("w1", 0.05) or await q.claim("w1", 0.05)  # (skips the cancelled ids[3])
        assert running.job.id == ids[4]  # ids[5] stays queued
        assert await q.r.zcard(q.index) == 6
        deadline = time.time() + 30  # wait (generously) for the finished jobs' hashes to expire
        while time.time() < deadline and any([await q.r.exists(q._job(i)) for i in ids[:4]]):
            await asyncio.sleep(0.2)
        assert not any([await q.r.exists(q._job(i)) for i in ids[:4]])
        newest, _ = await q.submit(REQUEST)
        assert set(await q.r.zrange(q.index, 0, -1)) == {running.job.id, ids[5], newest.id}
        assert await q.r.zcard(q.expiry) == 0
        assert [j.id for j in await q.list(None, 10, None)] == [newest.id, ids[5], running.job.id]
        await q.close()

    run(main())


def test_dead_letters_are_capped_and_counted_in_full(redis_server):
    async def main():
        # every delivery is over a limit of 0 attempts: each claim dead-letters one job
        q = RedisJobQueue(redis_server.url, max_attempts=0, dead_letter_max=3)
        ids = [(await q.submit({**REQUEST, "n": i}))[0].id for i in range(5)]
        for _ in ids:
            assert await q.claim("w1", 0.05) is None
        assert [(await q.get(i)).error["code"] for i in ids] == ["retry_limit"] * 5
        assert await q.r.xlen(q.dead) == 3  # the newest three kept
        assert [e["id"] for _, e in await q.r.xrange(q.dead)] == ids[2:]
        assert await q.dead_letters() == 5  # framewise_job_dead_letters: the total
        assert await q.depth() == 0
        await q.close()

    run(main())


def test_consumers_of_gone_workers_are_removed(redis_server):
    """A consumer that holds nothing and stays idle past ``consumer_idle_s`` is removed from the group by the
    sweep that ``claim`` runs; one still holding a job is kept (its entry is reclaimed first)."""

    async def consumers(q) -> dict[str, int]:
        return {c["name"]: c["pending"] for c in await q.r.xinfo_consumers(q.stream, GROUP)}

    async def main():
        q = RedisJobQueue(redis_server.url, consumer_idle_s=3600)  # sweeps nothing: `live` below does
        for _ in range(2):
            await q.submit(REQUEST)
        done = await q.claim("gone-idle", 0.05)
        assert await q.complete(done, {"ok": 1})
        assert await q.claim("gone-holding", 0.05) is not None  # crashed holding its job
        assert await consumers(q) == {"gone-idle": 0, "gone-holding": 1}
        live = RedisJobQueue(redis_server.url, consumer_idle_s=2)
        deadline = time.time() + 60
        while time.time() < deadline and "gone-idle" in await consumers(q):
            await live.claim("live", block_s=0.2)  # an idle worker polling the queue
        left = await consumers(q)
        assert "gone-idle" not in left and left["gone-holding"] == 1
        await live.close()
        await q.close()

    run(main())


# ---- metrics ----------------------------------------------------------------------------------------


def _samples(metrics: Metrics) -> dict[str, tuple[str, float]]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if not s.labels:
                out[s.name] = (family.type, s.value)
    return out


def test_reclaims_and_decode_restarts_are_counters():
    jobs = SimpleNamespace(reclaims=3, depth=lambda: _value(0), oldest_age=lambda: _value(0.0),
                           dead_letters=lambda: _value(0))
    services = SimpleNamespace(metrics=Metrics(), jobs=jobs, pool=SimpleNamespace(restarts=1),
                               engine=SimpleNamespace(ready=True))

    async def scrape():
        await refresh_queue_gauges(services)
        return _samples(services.metrics)

    first = run(scrape())
    assert first["framewise_job_reclaims_total"] == ("counter", 3)
    assert first["framewise_decode_worker_restarts_total"] == ("counter", 1)
    jobs.reclaims, services.pool.restarts = 5, 4
    again = run(scrape())
    assert again["framewise_job_reclaims_total"] == ("counter", 5)
    assert again["framewise_decode_worker_restarts_total"] == ("counter", 4)
    assert run(scrape())["framewise_job_reclaims_total"] == ("counter", 5)  # a scrape adds nothing by itself


async def _value(v):
    return v


@pytest.mark.parametrize("backend", ["redis", "memory"])
def test_worker_outcomes_are_counted_apart(redis_server, backend):
    """A success, a client error, an internal error (retried: not a failure yet) and a job handed back at
    shutdown: four outcomes, each under its own label of framewise_jobs_total."""

    async def main():
        q = (RedisJobQueue(redis_server.url, max_attempts=1) if backend == "redis"
             else MemoryJobQueue(max_attempts=1))
        kinds = ["ok", "bad", "boom", "slow"]
        ids = {k: (await q.submit({**REQUEST, "kind": k}))[0].id for k in kinds}
        release = asyncio.Event()

        async def execute(job, report):
            kind = job.request["kind"]
            if kind == "bad":
                raise APIError(400, "invalid_request", "the client's fault")
            if kind == "boom":
                raise RuntimeError("worker code blew up")
            if kind == "slow":
                await release.wait()
            return {"kind": kind}

        metrics = Metrics()
        worker = JobWorker(q, execute, consumer="w1", concurrency=4, heartbeat_s=0.2, metrics=metrics)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop, grace_s=0.2))

        def count(outcome: str) -> float:
            return metrics.registry.get_sample_value("framewise_jobs_total", {"outcome": outcome}) or 0

        deadline = time.time() + 60
        while time.time() < deadline and not (
                count("succeeded") == count("failed") == count("retried") == 1 and ids["slow"] in worker.running):
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 30)
        counted = {o: count(o) for o in ("succeeded", "failed", "retried", "handed_back", "cancelled", "lost",
                                         "refused")}
        assert counted == {"succeeded": 1, "failed": 1, "retried": 1, "handed_back": 1, "cancelled": 0,
                           "lost": 0, "refused": 0}
        assert (await q.get(ids["bad"])).status == "failed"
        assert (await q.get(ids["slow"])).status == "queued"  # handed back
        await q.close()

    run(main())
