"""Jobs: a chat-completions request run asynchronously, with progress events and a stored result."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")  # statuses of a job not finished yet
FINAL = ("succeeded", "failed", "cancelled")  # statuses of a finished job
# the progress-event stages that end a job's event stream (a job reaching a FINAL status emits one of them)
FINAL_STAGES = ("done", "failed", "cancelled")
# how a worker's run of a job ends (server/jobs/worker.py; framewise_jobs_total{outcome})
OUTCOMES = ("succeeded", "failed", "retried", "handed_back", "cancelled", "lost", "refused")


_JOB_ID = re.compile(r"job-[0-9a-f]{32}")
DEFAULT_OWNER = "default"  # the tenant of a bare API key, of development mode, and of jobs stored before owners


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex}"


def valid_job_id(job_id: object) -> bool:
    """The grammar :func:`new_job_id` makes (``job-`` and 32 lowercase hex digits). Anything else names no
    job, and never reaches a store: a job id becomes part of Redis key names (``<prefix>:job:<id>``), so
    ``<id>:events`` would otherwise name another key of the same job."""
    return isinstance(job_id, str) and _JOB_ID.fullmatch(job_id) is not None


@dataclass
class Job:
    id: str
    request: dict
    status: str = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    progress: dict = field(default_factory=lambda: {"stage": "queued"})
    result: dict | None = None
    error: dict | None = None
    attempts: int = 0
    idempotency_key: str | None = None
    owner: str = DEFAULT_OWNER  # the tenant that submitted it (server/tenants.py): only it (or an admin) sees it

    def public(self) -> dict:
        d = asdict(self)
        d.pop("request")
        d.pop("owner")
        d["object"] = "job"
        d["model"] = self.request.get("model")
        return d


@dataclass
class Claim:
    """A job handed to a worker; ``token`` identifies this delivery."""

    job: Job
    token: str


class JobNotFound(KeyError):
    """No such job -- or one another tenant owns: the same answer (404), so ids leak no existence."""


class JobQuotaExceeded(Exception):
    """The tenant already has ``limit`` jobs queued or running (``POST /v1/jobs`` and completions that run as
    jobs answer 429 ``job_quota_exceeded``)."""

    RETRY_AFTER_S = 5

    def __init__(self, owner: str, limit: int):
        super().__init__(f"tenant {owner!r} has {limit} jobs queued or running, its limit")
        self.owner, self.limit = owner, limit


class QueueUnavailable(ConnectionError):
    """The job store (Redis) did not answer in time: the HTTP API answers ``503 queue_unavailable`` with
    ``Retry-After``; a worker retries. A ``ConnectionError``, so code that retries connection errors
    (the worker's store calls) retries this too."""

    RETRY_AFTER_S = 2


def is_final_event(event: dict) -> bool:
    return event.get("stage") in FINAL_STAGES


class JobQueue(Protocol):
    """Both backends (Redis Streams, in-process) implement this. Any method may raise
    :class:`QueueUnavailable` when the store does not answer."""

    reclaims: int  # deliveries of jobs whose owner stopped heart-beating, taken by this process (a counter)

    # Ownership: ``owner`` names a tenant. On reads and changes, ``owner=None`` means any owner (an admin, the
    # worker, the gateway's own waits); a job another tenant owns is :class:`JobNotFound`.

    async def submit(self, request: dict, idempotency_key: str | None = None, owner: str = DEFAULT_OWNER,
                     max_active: int = 0) -> tuple[Job, bool]:
        """Returns (job, created); an existing job of ``owner`` for the same idempotency key is returned as is
        (atomically: concurrent submits with one key create one job; keys are per owner). ``max_active`` > 0:
        :class:`JobQuotaExceeded` when ``owner`` already has that many jobs queued or running (checked in the
        same atomic step as the insert)."""

    async def get(self, job_id: str, owner: str | None = None) -> Job:
        """The job's status, progress, result and error, **without** its request (``request`` holds only
        ``model``): polls never read a request body back (a base64 video may be hundreds of MB)."""

    async def get_request(self, job_id: str) -> dict:
        """The job's whole request (what a worker runs)."""

    async def list(self, status: str | None, limit: int, before: float | None,
                   owner: str | None = None) -> list[Job]: ...

    async def cancel(self, job_id: str, owner: str | None = None) -> Job: ...

    def events(self, job_id: str, last_id: str = "0", owner: str | None = None) -> AsyncIterator[tuple[str, dict]]:
        """``(event id, event)`` from after ``last_id``, ending after a :data:`FINAL_STAGES` event."""

    async def claim(self, consumer: str, block_s: float) -> Claim | None:
        """The next queued job, or a running one whose owner stopped heart-beating (reclaimed after
        the visibility timeout), as a new delivery with its own token; ``claim.job.request`` is whole."""

    # Every state change below takes effect only while ``claim.token`` is the job's current delivery
    # (a stale worker, whose job was reclaimed or handed back, changes nothing and gets False).

    async def heartbeat(self, claim: Claim, consumer: str) -> bool:
        """Extend the delivery's lease; False: this delivery no longer owns a running job."""

    async def progress(self, claim: Claim, event: dict) -> bool: ...

    async def complete(self, claim: Claim, result: dict) -> bool:
        """Store the result; False when refused (not the owner, or cancelled meanwhile)."""

    async def fail(self, claim: Claim, error: dict, retry: bool) -> bool: ...

    async def release(self, claim: Claim) -> bool:
        """Hand a running job back (graceful shutdown) without counting an attempt: another worker takes it.
        A finished or cancelled job, or one another delivery owns, is left as it is."""

    async def is_cancelled(self, job_id: str) -> bool: ...

    async def depth(self) -> int:
        """Jobs queued or running (by status), exactly: counted by the queue's own state changes."""

    async def counts(self) -> dict[str, int]:
        """``{"queued": n, "running": m}`` (``depth() == n + m``)."""

    async def oldest_age(self) -> float: ...

    async def dead_letters(self) -> int:
        """Jobs ever given up after their last attempt, queue-wide (the Redis queue keeps the newest of them,
        with their last error, in ``<prefix>:dead``)."""

    async def completions(self, job_id: str) -> int:
        """How many times a result was stored for the job (1 for a succeeded job: exactly once)."""

    async def ping(self) -> bool:
        """The store answers (never raises): ``framewise_queue_up``."""

    async def close(self) -> None: ...
