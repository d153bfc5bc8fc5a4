"""Jobs on Redis Streams (DESIGN 5).

Keys (``prefix`` = ``fw`` by default):
  {p}:stream            job ids; consumer group ``workers`` (XREADGROUP to take, XACK when stored)
  {p}:job:{id}          hash: request, status, timestamps, progress, result, error, attempts, token
  {p}:job:{id}:events   progress events (relayed as SSE)
  {p}:idem:{key}        idempotency key -> job id
  {p}:index             zset created_at -> id (listing)
  {p}:dead              dead-lettered jobs with their last error

A delivery is identified by ``token = <entry id>:<delivery count>``; every state change is a
Lua script that checks it, so a result is stored exactly once even if a slow worker's job was
reclaimed by another. Entries of crashed workers are reclaimed with XAUTOCLAIM after the
visibility timeout; workers refresh idle time (heartbeat) with XCLAIM JUSTID.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from server.jobs.base import FINAL, Claim, Job, JobNotFound, new_job_id

GROUP = "workers"

# KEYS[1] job hash; ARGV: token, now. Queued/running -> running (this delivery). 0 if cancelled/final.
_START = """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'queued' and s ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running', 'token', ARGV[1])
if not redis.call('HGET', KEYS[1], 'started_at') then redis.call('HSET', KEYS[1], 'started_at', ARGV[2]) end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return 1
"""
# KEYS[1] job hash; ARGV: token, new status, now, field, value, ttl. Only the current delivery may finish.
_FINISH = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3], ARGV[4], ARGV[5])
if ARGV[2] == 'succeeded' then redis.call('HINCRBY', KEYS[1], 'completions', 1) end
redis.call('EXPIRE', KEYS[1], ARGV[6])
return 1
"""
# KEYS[1] job hash; ARGV: now, ttl. Queued/running -> cancelled.
_CANCEL = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return -1 end
if s ~= 'queued' and s ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
# KEYS[1] job hash; ARGV: now, error json, ttl. Any non-final -> failed (dead letter).
_DEAD = """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'queued' and s ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[1], 'error', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


def _decode(h: dict) -> Job:
    def j(name, default=None):
        v = h.get(name)
        return json.loads(v) if v else default

    def f(name):
        v = h.get(name)
        return float(v) if v else None

    return Job(id=h["id"], request=j("request", {}), status=h["status"], created_at=float(h["created_at"]),
               started_at=f("started_at"), finished_at=f("finished_at"), progress=j("progress", {}),
               result=j("result"), error=j("error"), attempts=int(h.get("attempts", 0)),
               idempotency_key=h.get("idempotency_key") or None)


class RedisJobQueue:
    def __init__(self, url: str, *, prefix: str = "fw", result_ttl_s: int = 24 * 3600,
                 visibility_timeout_s: float = 60.0, max_attempts: int = 3):
        self.r = aioredis.from_url(url, decode_responses=True, health_check_interval=5,
                                   socket_connect_timeout=5, retry_on_timeout=True)
        self.p, self.ttl = prefix, int(result_ttl_s)
        self.visibility_ms = int(visibility_timeout_s * 1000)
        self.max_attempts = max_attempts
        self.stream = f"{prefix}:stream"
        self.reclaims = 0
        self._start, self._finish = self.r.register_script(_START), self.r.register_script(_FINISH)
        self._cancel, self._dead = self.r.register_script(_CANCEL), self.r.register_script(_DEAD)
        self._group_ready = False
        self.held: set[str] = set()  # stream entries this process is running

    def _job(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    def _events(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}:events"

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self.r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    # ---- client side --------------------------------------------------------------------------
    async def submit(self, request: dict, idempotency_key: str | None = None) -> tuple[Job, bool]:
        await self._ensure_group()
        job = Job(id=new_job_id(), request=request, idempotency_key=idempotency_key)
        if idempotency_key:
            key = f"{self.p}:idem:{idempotency_key}"
            if not await self.r.set(key, job.id, nx=True, ex=self.ttl):
                existing = await self.r.get(key)
                if existing:
                    try:
                        return await self.get(existing), False
                    except JobNotFound:
                        await self.r.set(key, job.id, ex=self.ttl)
        fields = {"id": job.id, "request": json.dumps(request), "status": "queued", "created_at": job.created_at,
                  "progress": json.dumps(job.progress), "attempts": 0, "idempotency_key": idempotency_key or ""}
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(self._job(job.id), mapping=fields)
            pipe.zadd(f"{self.p}:index", {job.id: job.created_at})
            pipe.xadd(self._events(job.id), {"data": json.dumps({"stage": "queued"})})
            pipe.xadd(self.stream, {"id": job.id})
            await pipe.execute()
        return job, True

    async def get(self, job_id: str) -> Job:
        h = await self.r.hgetall(self._job(job_id))
        if not h:
            raise JobNotFound(job_id)
        return _decode(h)

    async def list(self, status: str | None, limit: int, before: float | None) -> list[Job]:
        hi = f"({before}" if before is not None else "+inf"
        out: list[Job] = []
        offset = 0
        while len(out) < limit:
            ids = await self.r.zrevrangebyscore(f"{self.p}:index", hi, "-inf", start=offset, num=limit * 2)
            if not ids:
                break
            offset += len(ids)
            for job_id in ids:
                try:
                    job = await self.get(job_id)
                except JobNotFound:  # expired
                    await self.r.zrem(f"{self.p}:index", job_id)
                    offset -= 1
                    continue
                if status is None or job.status == status:
                    out.append(job)
                    if len(out) == limit:
                        break
        return out

    async def cancel(self, job_id: str) -> Job:
        res = await self._cancel(keys=[self._job(job_id)], args=[time.time(), self.ttl])
        if res == -1:
            raise JobNotFound(job_id)
        if res == 1:
            await self._event(job_id, {"stage": "cancelled"}, final=True)
        return await self.get(job_id)

    async def events(self, job_id: str, last_id: str = "0") -> AsyncIterator[tuple[str, dict]]:
        await self.get(job_id)
        while True:
            resp = await self.r.xread({self._events(job_id): last_id}, block=1000, count=100)
            for _, entries in resp or []:
                for entry_id, data in entries:
                    last_id = entry_id
                    event = json.loads(data["data"])
                    yield entry_id, event
                    if event.get("stage") in ("done", "failed", "cancelled"):
                        return
            if not resp and (await self.get(job_id)).status in FINAL:
                return

    async def _event(self, job_id: str, event: dict, final: bool = False) -> None:
        key = self._events(job_id)
        await self.r.xadd(key, {"data": json.dumps(event)}, maxlen=1000, approximate=True)
        if final:
            await self.r.expire(key, self.ttl)

    # ---- worker side --------------------------------------------------------------------------
    async def claim(self, consumer: str, block_s: float) -> Claim | None:
        await self._ensure_group()
        # entries of dead consumers first (idle past the visibility timeout)
        _, entries, _ = await self.r.xautoclaim(self.stream, GROUP, consumer, self.visibility_ms, "0-0", count=1)
        # never take over a job this process is still running (its heartbeat may just be late)
        entries = [(e, d) for e, d in entries if e not in self.held and d]
        if entries:
            self.reclaims += 1
        else:
            resp = await self.r.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=1,
                                           block=max(1, int(block_s * 1000)))
            entries = resp[0][1] if resp else []
        for entry_id, data in entries:
            claim = await self._deliver(entry_id, data["id"], consumer)
            if claim is not None:
                return claim
        return None

    async def _deliver(self, entry_id: str, job_id: str, consumer: str) -> Claim | None:
        pending = await self.r.xpending_range(self.stream, GROUP, min=entry_id, max=entry_id, count=1)
        delivered = int(pending[0]["times_delivered"]) if pending else 1
        key = self._job(job_id)
        if delivered > self.max_attempts:
            h = await self.r.hgetall(key)
            last = json.loads(h["error"]) if h.get("error") else None
            error = {"code": "retry_limit", "status": 500, "message": f"gave up after {self.max_attempts} attempts",
                     "last_error": last}
            if await self._dead(keys=[key], args=[time.time(), json.dumps(error), self.ttl]):
                await self.r.xadd(f"{self.p}:dead", {"id": job_id, "error": json.dumps(error)})
                await self._event(job_id, {"stage": "failed", "error": error}, final=True)
            await self._ack(entry_id)
            return None
        token = f"{entry_id}:{delivered}"
        if not await self._start(keys=[key], args=[token, time.time()]):
            await self._ack(entry_id)  # cancelled, finished, or expired
            return None
        await self._event(job_id, {"stage": "running", "attempt": delivered, "worker": consumer})
        self.held.add(entry_id)
        return Claim(await self.get(job_id), token)

    async def _ack(self, entry_id: str) -> None:
        self.held.discard(entry_id)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
            await pipe.execute()

    async def heartbeat(self, claim: Claim, consumer: str) -> None:
        entry_id = claim.token.rsplit(":", 1)[0]
        await self.r.xclaim(self.stream, GROUP, consumer, 0, [entry_id], justid=True)

    async def progress(self, claim: Claim, event: dict) -> None:
        await self.r.hset(self._job(claim.job.id), "progress", json.dumps(event))
        await self._event(claim.job.id, event)

    async def complete(self, claim: Claim, result: dict) -> bool:
        stored = await self._finish(keys=[self._job(claim.job.id)],
                                    args=[claim.token, "succeeded", time.time(), "result", json.dumps(result), self.ttl])
        if stored:
            await self._event(claim.job.id, {"stage": "done"}, final=True)
        await self._ack(claim.token.rsplit(":", 1)[0])
        return bool(stored)

    async def fail(self, claim: Claim, error: dict, retry: bool) -> None:
        key = self._job(claim.job.id)
        if retry:  # keep it pending: reclaimed after the visibility timeout, until max_attempts
            await self.r.hset(key, "error", json.dumps(error))
            self.held.discard(claim.token.rsplit(":", 1)[0])
            return
        if await self._finish(keys=[key], args=[claim.token, "failed", time.time(), "error", json.dumps(error),
                                                self.ttl]):
            await self._event(claim.job.id, {"stage": "failed", "error": error}, final=True)
        await self._ack(claim.token.rsplit(":", 1)[0])

    async def release(self, claim: Claim) -> None:
        """Graceful hand-back: re-queue as a fresh entry without counting an attempt."""
        entry_id = claim.token.rsplit(":", 1)[0]
        self.held.discard(entry_id)
        key = self._job(claim.job.id)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"status": "queued", "token": ""})
            pipe.hincrby(key, "attempts", -1)
            pipe.xadd(self.stream, {"id": claim.job.id})
            pipe.xack(self.stream, GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
            await pipe.execute()
        await self._event(claim.job.id, {"stage": "queued", "reason": "worker shutdown"})

    async def is_cancelled(self, job_id: str) -> bool:
        return await self.r.hget(self._job(job_id), "status") == "cancelled"

    async def completions(self, job_id: str) -> int:
        return int(await self.r.hget(self._job(job_id), "completions") or 0)

    async def depth(self) -> int:
        await self._ensure_group()
        groups = await self.r.xinfo_groups(self.stream)
        g = next((g for g in groups if g["name"] == GROUP), None)
        return int((g.get("lag") or 0) + g.get("pending", 0)) if g else 0

    async def oldest_age(self) -> float:
        first = await self.r.xrange(self.stream, count=1)
        if not first:
            return 0.0
        return max(0.0, time.time() - int(first[0][0].split("-")[0]) / 1000)

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.r.ping(), 2))
        except Exception:
            return False

    async def close(self) -> None:
        await self.r.aclose()
