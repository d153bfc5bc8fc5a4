"""In-process job queue: the embedded default when no ``REDIS_URL`` is set.

Same semantics as the Redis backend (tokens per delivery, retries up to ``max_attempts``,
result TTL, idempotency keys), kept in memory: jobs do not survive a restart of the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator

from server.jobs.base import FINAL, Claim, Job, JobNotFound, new_job_id


class MemoryJobQueue:
    def __init__(self, *, result_ttl_s: int = 24 * 3600, max_attempts: int = 3, **_):
        self.ttl, self.max_attempts = result_ttl_s, max_attempts
        self.jobs: dict[str, Job] = {}
        self.events_: dict[str, list[tuple[str, dict]]] = {}
        self.idem: dict[str, str] = {}
        self.ready: asyncio.Queue[str] = asyncio.Queue()
        self.tokens: dict[str, str] = {}
        self.deliveries: dict[str, int] = {}
        self.completions_: dict[str, int] = {}
        self._seq = itertools.count(1)
        self._changed = asyncio.Condition()
        self.reclaims = 0

    def _expire(self) -> None:
        now = time.time()
        for job_id in [j.id for j in self.jobs.values() if j.finished_at and now - j.finished_at > self.ttl]:
            job = self.jobs.pop(job_id)
            self.events_.pop(job_id, None)
            if job.idempotency_key:
                self.idem.pop(job.idempotency_key, None)

    async def _event(self, job_id: str, event: dict) -> None:
        self.events_.setdefault(job_id, []).append((f"{next(self._seq)}-0", event))
        async with self._changed:
            self._changed.notify_all()

    async def submit(self, request: dict, idempotency_key: str | None = None) -> tuple[Job, bool]:
        self._expire()
        if idempotency_key and idempotency_key in self.idem and self.idem[idempotency_key] in self.jobs:
            return self.jobs[self.idem[idempotency_key]], False
        job = Job(id=new_job_id(), request=request, idempotency_key=idempotency_key)
        self.jobs[job.id] = job
        if idempotency_key:
            self.idem[idempotency_key] = job.id
        await self._event(job.id, {"stage": "queued"})
        self.ready.put_nowait(job.id)
        return job, True

    async def get(self, job_id: str) -> Job:
        self._expire()
        try:
            return self.jobs[job_id]
        except KeyError:
            raise JobNotFound(job_id) from None

    async def list(self, status: str | None, limit: int, before: float | None) -> list[Job]:
        self._expire()
        jobs = sorted(self.jobs.values(), key=lambda j: j.created_at, reverse=True)
        return [j for j in jobs if (status is None or j.status == status)
                and (before is None or j.created_at < before)][:limit]

    async def cancel(self, job_id: str) -> Job:
        job = await self.get(job_id)
        if job.status in ("queued", "running"):
            job.status, job.finished_at = "cancelled", time.time()
            await self._event(job_id, {"stage": "cancelled"})
        return job

    async def events(self, job_id: str, last_id: str = "0") -> AsyncIterator[tuple[str, dict]]:
        await self.get(job_id)
        seen = 0 if last_id == "0" else next(
            (i + 1 for i, (eid, _) in enumerate(self.events_.get(job_id, [])) if eid == last_id), 0)
        while True:
            events = self.events_.get(job_id, [])
            for eid, event in events[seen:]:
                seen += 1
                yield eid, event
                if event.get("stage") in ("done", "failed", "cancelled"):
                    return
            if job_id not in self.jobs or self.jobs[job_id].status in FINAL and seen >= len(events):
                return
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 1.0)

    async def claim(self, consumer: str, block_s: float) -> Claim | None:
        try:
            job_id = await asyncio.wait_for(self.ready.get(), block_s)
        except TimeoutError:
            return None
        job = self.jobs.get(job_id)
        if job is None or job.status not in ("queued", "running"):
            return None
        n = self.deliveries[job_id] = self.deliveries.get(job_id, 0) + 1
        if n > self.max_attempts:
            job.status, job.finished_at = "failed", time.time()
            job.error = {"code": "retry_limit", "status": 500, "message": f"gave up after {self.max_attempts} "
                         "attempts", "last_error": job.error}
            await self._event(job_id, {"stage": "failed", "error": job.error})
            return None
        token = self.tokens[job_id] = f"{job_id}:{n}"
        job.status, job.attempts = "running", job.attempts + 1
        job.started_at = job.started_at or time.time()
        await self._event(job_id, {"stage": "running", "attempt": n, "worker": consumer})
        return Claim(job, token)

    async def heartbeat(self, claim: Claim, consumer: str) -> None:
        return None

    async def progress(self, claim: Claim, event: dict) -> None:
        claim.job.progress = event
        await self._event(claim.job.id, event)

    def _current(self, claim: Claim) -> bool:
        return self.tokens.get(claim.job.id) == claim.token and claim.job.status == "running"

    async def complete(self, claim: Claim, result: dict) -> bool:
        if not self._current(claim):
            return False
        job = claim.job
        job.status, job.result, job.finished_at = "succeeded", result, time.time()
        self.completions_[job.id] = self.completions_.get(job.id, 0) + 1
        await self._event(job.id, {"stage": "done"})
        return True

    async def fail(self, claim: Claim, error: dict, retry: bool) -> None:
        if not self._current(claim):
            return
        job = claim.job
        job.error = error
        if retry:
            job.status = "queued"
            self.ready.put_nowait(job.id)
            return
        job.status, job.finished_at = "failed", time.time()
        await self._event(job.id, {"stage": "failed", "error": error})

    async def release(self, claim: Claim) -> None:
        if self._current(claim):
            claim.job.status = "queued"
            claim.job.attempts -= 1
            self.deliveries[claim.job.id] -= 1
            self.ready.put_nowait(claim.job.id)

    async def is_cancelled(self, job_id: str) -> bool:
        job = self.jobs.get(job_id)
        return job is not None and job.status == "cancelled"

    async def completions(self, job_id: str) -> int:
        return self.completions_.get(job_id, 0)

    async def depth(self) -> int:
        return sum(1 for j in self.jobs.values() if j.status in ("queued", "running"))

    async def oldest_age(self) -> float:
        waiting = [j.created_at for j in self.jobs.values() if j.status in ("queued", "running")]
        return time.time() - min(waiting) if waiting else 0.0

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None
