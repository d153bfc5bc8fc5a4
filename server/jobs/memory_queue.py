"""In-process job queue: the embedded default when no ``REDIS_URL`` is set.

Same semantics as the Redis backend (tokens per delivery checked by every state change, a
visibility timeout after which a running job whose owner stopped heart-beating is reclaimed,
retries up to ``max_attempts``, result TTL, idempotency keys), kept in memory: jobs do not survive
a restart of the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import AsyncIterator

from framewise.server.jobs.base import (
    ACTIVE,
    DEFAULT_OWNER,
    FINAL,
    Claim,
    Job,
    JobNotFound,
    JobQuotaExceeded,
    is_final_event,
    new_job_id,
    valid_job_id,
)


class MemoryJobQueue:
    def __init__(self, *, result_ttl_s: int = 24 * 3600, max_attempts: int = 3, visibility_timeout_s: float = 60.0,
                 **_):
        self.ttl, self.max_attempts, self.visibility_s = result_ttl_s, max_attempts, visibility_timeout_s
        self.jobs: dict[str, Job] = {}
        self.events_: dict[str, list[tuple[str, dict]]] = {}
        self.idem: dict[tuple[str, str], str] = {}  # (owner, idempotency key) -> job id
        self.ready: asyncio.Queue[str] = asyncio.Queue()
        self.tokens: dict[str, str] = {}  # job id -> token of its current delivery
        self.leases: dict[str, float] = {}  # job id -> monotonic deadline of its current delivery
        self.dead = 0  # jobs given up after their last attempt
        self.deliveries: dict[str, int] = {}
        self.completions_: dict[str, int] = {}
        self._seq = itertools.count(1)
        self._changed = asyncio.Condition()
        self.reclaims = 0

    def _expire(self) -> None:
        now = time.time()
        for job_id in [j.id for j in self.jobs.values() if j.finished_at and now - j.finished_at > self.ttl]:
            job = self.jobs.pop(job_id)
            for table in (self.events_, self.tokens, self.leases, self.deliveries, self.completions_):
                table.pop(job_id, None)
            if job.idempotency_key:
                self.idem.pop((job.owner, job.idempotency_key), None)

    async def _event(self, job_id: str, event: dict) -> None:
        self.events_.setdefault(job_id, []).append((f"{next(self._seq)}-0", event))
        async with self._changed:
            self._changed.notify_all()

    async def submit(self, request: dict, idempotency_key: str | None = None, owner: str = DEFAULT_OWNER,
                     max_active: int = 0) -> tuple[Job, bool]:
        """Check and insert with no await in between: concurrent submits with one key make one job."""
        self._expire()
        idem = (owner, idempotency_key) if idempotency_key else None
        if idem and idem in self.idem and self.idem[idem] in self.jobs:
            return self.jobs[self.idem[idem]], False
        if max_active > 0 and sum(j.owner == owner and j.status in ACTIVE for j in self.jobs.values()) >= max_active:
            raise JobQuotaExceeded(owner, max_active)
        job = Job(id=new_job_id(), request=request, idempotency_key=idempotency_key, owner=owner)
        self.jobs[job.id] = job
        if idem:
            self.idem[idem] = job.id
        await self._event(job.id, {"stage": "queued"})
        self.ready.put_nowait(job.id)
        return job, True

    async def get(self, job_id: str, owner: str | None = None) -> Job:
        if not valid_job_id(job_id):
            raise JobNotFound(job_id)
        self._expire()
        job = self.jobs.get(job_id)
        if job is None or (owner is not None and job.owner != owner):
            raise JobNotFound(job_id)
        return job

    async def get_request(self, job_id: str) -> dict:
        return (await self.get(job_id)).request

    async def list(self, status: str | None, limit: int, before: float | None,
                   owner: str | None = None) -> list[Job]:
        if before is not None and not math.isfinite(before):
            raise ValueError(f"before must be a finite number, not {before!r}")
        self._expire()
        jobs = sorted(self.jobs.values(), key=lambda j: j.created_at, reverse=True)
        return [j for j in jobs if (status is None or j.status == status) and (owner is None or j.owner == owner)
                and (before is None or j.created_at < before)][:limit]

    async def cancel(self, job_id: str, owner: str | None = None) -> Job:
        job = await self.get(job_id, owner)
        if job.status in ACTIVE:
            job.status, job.finished_at = "cancelled", time.time()
            await self._event(job_id, {"stage": "cancelled"})
        return job

    async def events(self, job_id: str, last_id: str = "0", owner: str | None = None
                     ) -> AsyncIterator[tuple[str, dict]]:
        await self.get(job_id, owner)
        seen = 0 if last_id == "0" else next(
            (i + 1 for i, (eid, _) in enumerate(self.events_.get(job_id, [])) if eid == last_id), 0)
        while True:
            events = self.events_.get(job_id, [])
            for eid, event in events[seen:]:
                seen += 1
                yield eid, event
                if is_final_event(event):
                    return
            if job_id not in self.jobs or self.jobs[job_id].status in FINAL and seen >= len(events):
                return
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 1.0)

    def _lapsed(self) -> str | None:
        """A running job whose owner stopped heart-beating (lease past the visibility timeout)."""
        now = time.monotonic()
        for job_id, deadline in list(self.leases.items()):
            job = self.jobs.get(job_id)
            if job is None or job.status != "running":
                del self.leases[job_id]
            elif deadline <= now:
                return job_id
        return None

    async def claim(self, consumer: str, block_s: float) -> Claim | None:
        until = time.monotonic() + block_s
        while True:
            job_id, want = self._lapsed(), "running"
            if job_id is not None:
                self.reclaims += 1
            elif not self.ready.empty():
                job_id, want = self.ready.get_nowait(), "queued"
            else:
                if time.monotonic() >= until:
                    return None
                wait = min([until, *self.leases.values()]) - time.monotonic()  # wake when a lease lapses
                try:
                    job_id, want = await asyncio.wait_for(self.ready.get(), max(wait, 0.001)), "queued"
                except TimeoutError:
                    continue
            job = self.jobs.get(job_id)
            if job is None or job.status != want:
                continue  # cancelled or finished while queued
            claim = await self._deliver(job, consumer)
            if claim is not None:
                return claim

    async def _deliver(self, job: Job, consumer: str) -> Claim | None:
        n = self.deliveries[job.id] = self.deliveries.get(job.id, 0) + 1
        self.leases.pop(job.id, None)
        if n > self.max_attempts:
            self.dead += 1
            job.status, job.finished_at = "failed", time.time()
            job.error = {"code": "retry_limit", "status": 500, "message": f"gave up after {self.max_attempts} "
                         "attempts", "last_error": job.error}
            await self._event(job.id, {"stage": "failed", "error": job.error})
            return None
        token = self.tokens[job.id] = f"{job.id}:{n}"
        self.leases[job.id] = time.monotonic() + self.visibility_s
        job.status, job.attempts = "running", job.attempts + 1
        job.started_at = job.started_at or time.time()
        await self._event(job.id, {"stage": "running", "attempt": n, "worker": consumer})
        return Claim(job, token)

    def _current(self, claim: Claim) -> bool:
        """The claim's delivery still owns the job, and the job is running."""
        job = self.jobs.get(claim.job.id)
        return job is not None and self.tokens.get(job.id) == claim.token and job.status == "running"

    async def heartbeat(self, claim: Claim, consumer: str) -> bool:
        if not self._current(claim):
            return False
        self.leases[claim.job.id] = time.monotonic() + self.visibility_s
        return True

    async def progress(self, claim: Claim, event: dict) -> bool:
        if not self._current(claim):
            return False
        claim.job.progress = event
        await self._event(claim.job.id, event)
        return True

    async def complete(self, claim: Claim, result: dict) -> bool:
        if not self._current(claim):
            return False
        job = claim.job
        self.leases.pop(job.id, None)
        job.status, job.result, job.finished_at, job.error = "succeeded", result, time.time(), None
        self.completions_[job.id] = self.completions_.get(job.id, 0) + 1
        await self._event(job.id, {"stage": "done"})
        return True

    async def fail(self, claim: Claim, error: dict, retry: bool) -> bool:
        if not self._current(claim):
            return False
        job = claim.job
        self.leases.pop(job.id, None)
        job.error = error
        if retry:
            job.status = "queued"
            self.ready.put_nowait(job.id)
            return True
        job.status, job.finished_at = "failed", time.time()
        await self._event(job.id, {"stage": "failed", "error": error})
        return True

    async def release(self, claim: Claim) -> bool:
        """Hand back a running job this delivery still owns (attempt not counted); else change nothing."""
        if not self._current(claim):
            return False
        job = claim.job
        self.leases.pop(job.id, None)
        self.tokens.pop(job.id, None)
        job.status, job.attempts = "queued", job.attempts - 1
        self.deliveries[job.id] -= 1
        self.ready.put_nowait(job.id)
        await self._event(job.id, {"stage": "queued", "reason": "worker shutdown"})
        return True

    async def is_cancelled(self, job_id: str) -> bool:
        job = self.jobs.get(job_id)
        return job is not None and job.status == "cancelled"

    async def completions(self, job_id: str) -> int:
        return self.completions_.get(job_id, 0)

    async def counts(self) -> dict[str, int]:
        states = [j.status for j in self.jobs.values()]
        return {"queued": states.count("queued"), "running": states.count("running")}

    async def depth(self) -> int:
        counts = await self.counts()
        return counts["queued"] + counts["running"]

    async def oldest_age(self) -> float:
        waiting = [j.created_at for j in self.jobs.values() if j.status in ACTIVE]
        return time.time() - min(waiting) if waiting else 0.0

    async def dead_letters(self) -> int:
        return self.dead

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None
