"""Jobs: a chat-completions request run asynchronously, with progress events and a stored result."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex}"


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

    def public(self) -> dict:
        d = asdict(self)
        d.pop("request")
        d["object"] = "job"
        d["model"] = self.request.get("model")
        return d


@dataclass
class Claim:
    """A job handed to a worker; ``token`` identifies this delivery."""

    job: Job
    token: str


class JobNotFound(KeyError):
    pass


class JobQueue(Protocol):
    """Both backends (Redis Streams, in-process) implement this."""

    async def submit(self, request: dict, idempotency_key: str | None = None) -> tuple[Job, bool]:
        """Returns (job, created); an existing job for the same idempotency key is returned as is
        (atomically: concurrent submits with one key create one job)."""

    async def get(self, job_id: str) -> Job: ...

    async def list(self, status: str | None, limit: int, before: float | None) -> list[Job]: ...

    async def cancel(self, job_id: str) -> Job: ...

    async def events(self, job_id: str, last_id: str = "0") -> AsyncIterator[tuple[str, dict]]: ...

    async def claim(self, consumer: str, block_s: float) -> Claim | None:
        """The next queued job, or a running one whose owner stopped heart-beating (reclaimed after
        the visibility timeout), as a new delivery with its own token."""

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

    async def depth(self) -> int: ...

    async def oldest_age(self) -> float: ...

    async def dead_letters(self) -> int:
        """Jobs given up after their last attempt, queue-wide (the Redis queue keeps them in ``<prefix>:dead``)."""

    async def close(self) -> None: ...
