"""Job workers: take jobs from a queue, run them through the chat pipeline, store results.

- concurrency limit, heartbeats (refresh the visibility timeout, notice cancellation);
- a failure the client caused (bad video, invalid request) ends the job ``failed`` with the same
  error the synchronous API gives; anything else is retried up to the queue's limit, then
  dead-lettered;
- graceful shutdown: stop taking jobs, let running ones finish for ``grace_s``, hand the rest back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

from server import logs
from server.errors import APIError
from server.jobs.base import Claim, Job
from server.video.decode import MediaError

log = logging.getLogger("framewise.jobs")

Report = Callable[[dict], Awaitable[None]]
Execute = Callable[[Job, Report], Awaitable[dict]]


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class JobWorker:
    def __init__(self, queue, execute: Execute, *, consumer: str | None = None, concurrency: int = 2,
                 heartbeat_s: float = 2.0, metrics=None):
        self.queue, self.execute = queue, execute
        self.consumer = consumer or consumer_name()
        self.concurrency, self.heartbeat_s, self.metrics = concurrency, heartbeat_s, metrics
        self.running: dict[str, tuple[Claim, asyncio.Task]] = {}

    async def run(self, stop: asyncio.Event, grace_s: float = 30.0) -> None:
        """Take jobs until ``stop`` is set (noticed even while every slot is busy), then give the
        running ones ``grace_s`` from that moment to finish and hand the rest back."""
        slots = asyncio.Semaphore(self.concurrency)
        loop = asyncio.get_running_loop()
        stopping = asyncio.ensure_future(stop.wait())
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
                if stop.is_set():  # taken while stopping: straight back
                    slots.release()
                    await self._hand_back(claim)
                    break
                task = asyncio.create_task(self._run_one(claim))
                self.running[claim.job.id] = (claim, task)
                task.add_done_callback(lambda _t, job_id=claim.job.id: (self.running.pop(job_id, None),
                                                                        slots.release()))
        finally:
            stopping.cancel()
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
            if await self._retrying(self.queue.release, claim, attempts=4):
                log.info("job %s handed back", claim.job.id)
        except Exception as e:  # the visibility timeout hands it to another worker instead
            log.warning("handing job %s back failed: %s", claim.job.id, e)

    async def _run_one(self, claim: Claim) -> None:
        job = claim.job
        logs.job_id.set(job.id)  # this task's context only: every line logged for the job carries it
        log.info("job started", extra={"attempt": job.attempts, "worker": self.consumer})
        start = time.perf_counter()
        work = asyncio.create_task(self.execute(job, lambda ev: self.queue.progress(claim, ev)))
        beat = asyncio.create_task(self._heartbeat(claim, work))
        outcome = "failed"
        try:
            result = await work
            stored = await self._retrying(self.queue.complete, claim, result)
            outcome = "succeeded" if stored else "refused"  # another delivery owns it, or it was cancelled
        except asyncio.CancelledError:
            if beat.done() and not beat.cancelled() and beat.result() == "lost":
                outcome = "lost"  # reclaimed by another worker: store nothing, let go of the delivery
                await self._hand_back(claim)
            elif await self.queue.is_cancelled(job.id):
                outcome = "cancelled"  # the client cancelled it: acknowledge, keep its status
                await self._retrying(self.queue.fail, claim, {"code": "cancelled", "status": 499,
                                                             "message": "cancelled by the client"}, False)
            else:
                raise  # shutdown: _drain hands the job back
        except (APIError, MediaError) as e:  # the client's fault: same error as the sync API
            status = getattr(e, "status", 400)
            error = {"code": e.code, "message": e.message, "status": status}
            await self._retrying(self.queue.fail, claim, error, False)
        except Exception as e:
            log.exception("job %s failed", job.id)
            await self._retrying(self.queue.fail, claim, {"code": "internal_error", "status": 500,
                                                         "message": f"{type(e).__name__}: {e}"}, True)
        finally:
            beat.cancel()
            log.info("job %s", outcome, extra={"outcome": outcome,
                                                "ms": round((time.perf_counter() - start) * 1000, 1)})
            if self.metrics is not None:
                self.metrics.jobs.labels(outcome).inc()
                self.metrics.job_seconds.observe(time.perf_counter() - start)

    async def _heartbeat(self, claim: Claim, work: asyncio.Task) -> str | None:
        """Refresh the lease; stop the work when the client cancelled or another delivery took the job."""
        while not work.done():
            await asyncio.sleep(self.heartbeat_s)
            try:
                if await self.queue.is_cancelled(claim.job.id):
                    work.cancel()
                    return "cancelled"
                if not await self.queue.heartbeat(claim, self.consumer) and not work.done():  # (done: stored)
                    log.warning("job %s: this worker no longer owns it; stopping", claim.job.id)
                    work.cancel()
                    return "lost"
            except Exception as e:
                log.warning("heartbeat for %s failed: %s", claim.job.id, e)
        return None

    async def _retrying(self, fn, *args, attempts: int = 60) -> object:
        """Store outcomes through a Redis restart (connection errors) without losing them."""
        for i in range(attempts):
            try:
                return await fn(*args)
            except (ConnectionError, OSError, TimeoutError) + _redis_errors() as e:
                if i == attempts - 1:
                    raise
                log.warning("job store unavailable (%s); retrying", e)
                await asyncio.sleep(0.5)
        return None


def _redis_errors() -> tuple[type[BaseException], ...]:
    try:
        from redis.exceptions import ConnectionError as RConnErr
        from redis.exceptions import TimeoutError as RTimeout

        return (RConnErr, RTimeout)
    except ImportError:
        return ()
