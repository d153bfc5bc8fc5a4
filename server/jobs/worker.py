"""Job workers: take jobs from a queue, run them through the chat pipeline, store results.

- concurrency limit, heartbeats (refresh the visibility timeout, notice cancellation);
- a failure the client caused (bad video, invalid request) ends the job ``failed`` with the same
  error the synchronous API gives; anything else is retried up to the queue's limit, then
  dead-lettered;
- graceful shutdown: stop taking jobs, let running ones finish for ``grace_s``, hand the rest back.
- a dead engine (``fatal`` set: server/lifecycle.py): stop taking jobs at once and hand back every job held,
  without spending an attempt (a job that met ``engine_dead`` on this worker is handed back, not retried);
  the process then exits non-zero and is restarted.
- the job store (Redis) unavailable: claiming waits for it; progress events are best-effort (a job keeps
  running through an outage); heartbeats resume when it is back (the lease is refreshed before the
  visibility timeout hands the job to another worker, unless the outage outlasted it); an outcome is
  stored by retrying for up to ``store_retry_s`` (exactly once either way: every store call checks the
  delivery's token).

Every run ends with one outcome (log line ``job <outcome>``, ``framewise_jobs_total{outcome}``):
``succeeded``; ``failed`` (ended failed: the client's error); ``retried`` (an internal error: the job
goes back to the queue, or is dead-lettered when that was its last attempt, counted by
``framewise_job_dead_letters``); ``handed_back`` (shutdown: returned to the queue unfinished);
``cancelled`` (by the client); ``lost`` (another worker took the job over); ``refused`` (the store
refused the outcome: this delivery no longer owned the job). ``handed_back`` also counts jobs handed back
because the engine died.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

from framewise.server import logs
from framewise.server.errors import APIError
from framewise.server.jobs.base import Claim, Job, JobQueue
from framewise.server.video.decode import MediaError

log = logging.getLogger("framewise.jobs")

Report = Callable[[dict], Awaitable[None]]
Execute = Callable[[Job, Report], Awaitable[dict]]


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


ENGINE_DEATH_WAIT_S = 3.0  # a job that met engine_dead: how long to wait for the engine to be reported dead


class JobWorker:
    def __init__(self, queue: JobQueue, execute: Execute, *, consumer: str | None = None, concurrency: int = 2,
                 heartbeat_s: float = 2.0, metrics=None, fatal: asyncio.Event | None = None,
                 store_retry_s: float = 300.0):
        self.queue, self.execute = queue, execute
        self.consumer = consumer or consumer_name()
        self.concurrency, self.heartbeat_s, self.metrics = concurrency, heartbeat_s, metrics
        self.fatal, self.store_retry_s = fatal, store_retry_s
        self.running: dict[str, tuple[Claim, asyncio.Task]] = {}

    def _dead(self) -> bool:
        return self.fatal is not None and self.fatal.is_set()

    async def run(self, stop: asyncio.Event, grace_s: float = 30.0) -> None:
        """Take jobs until ``stop`` is set (noticed even while every slot is busy), then give the
        running ones ``grace_s`` from that moment to finish and hand the rest back. ``fatal`` set (the
        engine died): stop at once and hand every job back."""
        slots = asyncio.Semaphore(self.concurrency)
        loop = asyncio.get_running_loop()
        waits = [asyncio.ensure_future(stop.wait())]
        if self.fatal is not None:
            waits.append(asyncio.ensure_future(self.fatal.wait()))
        stopping = asyncio.ensure_future(asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED))
        stopped_at: list[float] = []
        stopping.add_done_callback(lambda _f: stopped_at.append(loop.time()))
        try:
            while await self._slot(slots, stopping):
                try:
                    claim = await self.queue.claim(self.consumer, block_s=1.0)
                except Exception as e:  # Redis restarting: keep trying
                    slots.release()
                    log.warning("job queue unavailable (%s); retrying", e)
                    await asyncio.wait({stopping}, timeout=0.5)
                    continue
                if claim is None:
                    slots.release()
                    continue
                if stop.is_set() or self._dead():  # taken while stopping: straight back
                    slots.release()
                    await self._hand_back(claim)
                    self._count("handed_back")
                    break
                task = asyncio.create_task(self._run_one(claim))
                self.running[claim.job.id] = (claim, task)
                task.add_done_callback(lambda _t, job_id=claim.job.id: (self.running.pop(job_id, None),
                                                                        slots.release()))
        finally:
            stopping.cancel()
            for w in waits:
                w.cancel()
        if self._dead():
            log.error("the engine died: handing back %d job(s) without spending an attempt", len(self.running))
            grace_s = 0.0
        deadline = (stopped_at[0] if stopped_at else loop.time()) + grace_s
        await self._drain(max(0.0, deadline - loop.time()))

    @staticmethod
    async def _slot(slots: asyncio.Semaphore, stopping: asyncio.Future) -> bool:
        """Wait for a free slot; False as soon as stop is set (never blocks shutdown on busy slots)."""
        if stopping.done():
            return False
        acquire = asyncio.ensure_future(slots.acquire())
        await asyncio.wait({acquire, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not stopping.done():
            return True
        if acquire.done() and not acquire.cancelled():
            slots.release()
        else:
            acquire.cancel()
        return False

    async def _drain(self, grace_s: float) -> None:
        if self.running:
            await asyncio.wait([t for _, t in self.running.values()], timeout=grace_s)
        left = list(self.running.values())  # still running: hand back (only while this delivery owns them)
        for _, task in left:
            task.cancel()
        await asyncio.gather(*(self._hand_back(claim) for claim, _ in left))
        if left:
            await asyncio.wait([t for _, t in left], timeout=2.0)

    async def _hand_back(self, claim: Claim) -> None:
        try:
            if await self._retrying(self.queue.release, claim, budget_s=5.0):
                log.info("job %s handed back", claim.job.id)
        except Exception as e:  # the visibility timeout hands it to another worker instead
            log.warning("handing job %s back failed: %s", claim.job.id, e)

    async def _run_one(self, claim: Claim) -> None:
        job = claim.job
        logs.job_id.set(job.id)  # this task's context only: every line logged for the job carries it
        logs.tenant.set(job.owner)  # and the tenant it runs for
        log.info("job started", extra={"attempt": job.attempts, "worker": self.consumer})
        start = time.perf_counter()
        work = asyncio.create_task(self.execute(job, lambda ev: self._progress(claim, ev)))
        beat = asyncio.create_task(self._heartbeat(claim, work))
        outcome = "refused"  # until the store accepted what this run did
        try:
            result = await work
            stored = await self._retrying(self.queue.complete, claim, result)
            outcome = "succeeded" if stored else "refused"  # another delivery owns it, or it was cancelled
        except asyncio.CancelledError:
            said = beat.result() if beat.done() and not beat.cancelled() else None
            if said == "lost":
                outcome = "lost"  # reclaimed by another worker: store nothing, let go of the delivery
                await self._hand_back(claim)
            elif said == "cancelled" or (not self._dead() and await self._client_cancelled(job.id)):
                outcome = "cancelled"  # the client cancelled it: acknowledge, keep its status
                await self._retrying(self.queue.fail, claim, {"code": "cancelled", "status": 499,
                                                             "message": "cancelled by the client"}, False)
            else:
                outcome = "handed_back"  # shutdown: _drain hands the job back
                raise
        except (APIError, MediaError) as e:  # the client's fault: same error as the sync API
            status = getattr(e, "status", 400)
            error = {"code": e.code, "message": e.message, "status": status}
            if await self._retrying(self.queue.fail, claim, error, False):
                outcome = "failed"
        except Exception as e:
            if getattr(e, "code", None) == "engine_dead" and await self._engine_died():
                outcome = "handed_back"  # not the job's fault: back to the queue, no attempt spent
                await self._hand_back(claim)
                return
            log.exception("job %s attempt failed; it will be retried (or dead-lettered after its last attempt)",
                          job.id)
            if await self._retrying(self.queue.fail, claim, {"code": "internal_error", "status": 500,
                                                            "message": f"{type(e).__name__}: {e}"}, True):
                outcome = "retried"
        finally:
            beat.cancel()
            log.info("job %s", outcome, extra={"outcome": outcome,
                                                "ms": round((time.perf_counter() - start) * 1000, 1)})
            self._count(outcome, time.perf_counter() - start)

    def _count(self, outcome: str, seconds: float | None = None) -> None:
        if self.metrics is not None:
            self.metrics.jobs.labels(outcome).inc()
            if seconds is not None:
                self.metrics.job_seconds.observe(seconds)

    async def _progress(self, claim: Claim, event: dict) -> None:
        """Best-effort: a progress event the store cannot take now is dropped, the job runs on."""
        try:
            await self.queue.progress(claim, event)
        except (ConnectionError, OSError, TimeoutError) + _redis_errors() as e:
            log.warning("progress of %s not stored (%s)", claim.job.id, e)

    async def _client_cancelled(self, job_id: str) -> bool:
        try:
            return await self.queue.is_cancelled(job_id)
        except (ConnectionError, OSError, TimeoutError) + _redis_errors():
            return False  # cannot tell: hand it back (it stays cancelled if it is)

    async def _engine_died(self) -> bool:
        """A job met ``engine_dead``: is the engine reported dead (within a few seconds)?"""
        if self.fatal is None:
            return False
        try:
            await asyncio.wait_for(self.fatal.wait(), ENGINE_DEATH_WAIT_S)
        except TimeoutError:
            return False
        return True

    async def _heartbeat(self, claim: Claim, work: asyncio.Task) -> str | None:
        """Refresh the lease until the run has stored its outcome (cancelled by ``_run_one``: the lease is kept
        while an outcome waits for the store, or for the engine's death to be confirmed); stop the work when
        the client cancelled or another delivery took the job. After a Redis outage the first heartbeat that
        gets through takes the lease back (unless another worker reclaimed the job meanwhile)."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                if not work.done() and await self.queue.is_cancelled(claim.job.id):
                    work.cancel()
                    return "cancelled"
                if not await self.queue.heartbeat(claim, self.consumer):
                    if work.done():
                        return None  # (stored meanwhile)
                    log.warning("job %s: this worker no longer owns it; stopping", claim.job.id)
                    work.cancel()
                    return "lost"
            except Exception as e:
                log.warning("heartbeat for %s failed: %s", claim.job.id, e)

    async def _retrying(self, fn, *args, budget_s: float | None = None) -> object:
        """Store outcomes through a Redis outage (connection errors) without losing them: retried with backoff
        (0.25 s doubling to 2 s) for up to ``budget_s`` (default ``store_retry_s``). Storing twice is harmless:
        every store call checks the delivery's token."""
        give_up = time.monotonic() + (self.store_retry_s if budget_s is None else budget_s)
        pause = 0.25
        while True:
            try:
                return await fn(*args)
            except (ConnectionError, OSError, TimeoutError) + _redis_errors() as e:
                if time.monotonic() + pause > give_up:
                    raise
                log.warning("job store unavailable (%s); retrying", e)
                await asyncio.sleep(pause)
                pause = min(2 * pause, 2.0)


def _redis_errors() -> tuple[type[BaseException], ...]:
    try:
        from redis.exceptions import ConnectionError as RConnErr
        from redis.exceptions import TimeoutError as RTimeout

        return (RConnErr, RTimeout)
    except ImportError:
        return ()
