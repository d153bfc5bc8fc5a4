"""Jobs on Redis Streams (DESIGN 5).

Keys (``prefix`` = ``fw`` by default):
  {p}:stream            job ids; consumer group ``workers`` (XREADGROUP to take, XACK when stored)
  {p}:job:{id}          hash: request, status, timestamps, progress, result, error, attempts, token
  {p}:job:{id}:events   progress events (relayed as SSE)
  {p}:idem:{key}        idempotency key -> job id
  {p}:index             zset created_at -> id (listing)
  {p}:dead              dead-lettered jobs with their last error

A delivery is identified by ``token = <entry id>:<delivery count>`` (the count read inside the
script that starts it, together with a check that this consumer holds the entry). Every state change
is a Lua script that checks the token, so a result is stored exactly once even if a slow worker's job
was reclaimed by another, and a stale worker neither writes the job nor acknowledges the entry the new
owner holds (if that owner dies too, the entry is reclaimed again). The hash's ``entry`` names the
stream entry that currently carries the job; a delivery of any other entry is dropped. Entries of
crashed workers are reclaimed with XAUTOCLAIM after the visibility timeout; owners refresh the idle
time (heartbeat) with XCLAIM JUSTID.
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

# Every script below that changes a job checks the caller's delivery token against the hash's
# ``token`` first: a stale delivery (its entry reclaimed by another worker, or handed back) never
# writes the job and never acknowledges the stream entry, which the current owner still holds.

# KEYS: idem key (or a placeholder), job hash, index, events, stream.
# ARGV: has key (1/0), job id, ttl, created_at, request, progress, idempotency key, job key prefix, event.
# -> {1, id} created, or {0, id} of the live job that already holds the idempotency key.
_SUBMIT = """
if ARGV[1] == '1' then
  local existing = redis.call('GET', KEYS[1])
  if existing and redis.call('EXISTS', ARGV[8] .. existing) == 1 then return {0, existing} end
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
local entry = redis.call('XADD', KEYS[5], '*', 'id', ARGV[2])
redis.call('HSET', KEYS[2], 'id', ARGV[2], 'request', ARGV[5], 'status', 'queued', 'created_at', ARGV[4],
           'progress', ARGV[6], 'attempts', 0, 'idempotency_key', ARGV[7], 'entry', entry)
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('XADD', KEYS[4], '*', 'data', ARGV[9])
return {1, ARGV[2]}
"""
# KEYS: job hash, stream, dead-letter stream. ARGV: entry, consumer, now, max attempts, group,
# retry-limit error JSON up to its last_error value, ttl, job id.
# -> {1, token} started; {0} nothing to run (entry acknowledged); {-1} another consumer holds the
# entry now (touch nothing); {2, error} over the attempt limit, dead-lettered.
_START = """
local p = redis.call('XPENDING', KEYS[2], ARGV[5], ARGV[1], ARGV[1], 1)[1]
if not p or p[2] ~= ARGV[2] then return {-1} end
local function ack()
  redis.call('XACK', KEYS[2], ARGV[5], ARGV[1])
  redis.call('XDEL', KEYS[2], ARGV[1])
end
local s = redis.call('HGET', KEYS[1], 'status')
local entry = redis.call('HGET', KEYS[1], 'entry')
if (s ~= 'queued' and s ~= 'running') or (entry and entry ~= ARGV[1]) then ack() return {0} end
local n = tonumber(p[4])
if n > tonumber(ARGV[4]) then
  local err = ARGV[6] .. (redis.call('HGET', KEYS[1], 'error') or 'null') .. '}'
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[3], 'error', err, 'token', '')
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  redis.call('XADD', KEYS[3], '*', 'id', ARGV[8], 'error', err)
  ack()
  return {2, err}
end
local token = ARGV[1] .. ':' .. n
redis.call('HSET', KEYS[1], 'status', 'running', 'token', token)
if not redis.call('HGET', KEYS[1], 'started_at') then redis.call('HSET', KEYS[1], 'started_at', ARGV[3]) end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return {1, token}
"""
# KEYS: job hash, stream. ARGV: token, entry, group, new status, now, field, value, ttl.
# -> 1 stored; 0 this delivery's job was cancelled meanwhile (entry acknowledged); -1 not the owner.
_FINISH = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return -1 end
redis.call('XACK', KEYS[2], ARGV[3], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'finished_at', ARGV[5], ARGV[6], ARGV[7])
if ARGV[4] == 'succeeded' then redis.call('HINCRBY', KEYS[1], 'completions', 1) end
redis.call('EXPIRE', KEYS[1], ARGV[8])
return 1
"""
# KEYS: job hash, stream, events. ARGV: token, entry, group, job id, event.
# Owner of a running job: re-queue as a fresh entry (attempt not counted) -> 1; 0 / -1 as _FINISH.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return -1 end
redis.call('XACK', KEYS[2], ARGV[3], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[4])
redis.call('HSET', KEYS[1], 'status', 'queued', 'token', '', 'entry', entry)
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 1000, '*', 'data', ARGV[5])
return 1
"""
# KEYS: job hash, events. ARGV: token, event (JSON). The owner of a running job records progress.
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'running' then
  return 0
end
redis.call('HSET', KEYS[1], 'progress', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', 'data', ARGV[2])
return 1
"""
# KEYS: job hash, stream. ARGV: token, entry, group, consumer. The owner resets its entry's idle time.
_HEARTBEAT = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'running' then
  return 0
end
if #redis.call('XCLAIM', KEYS[2], ARGV[3], ARGV[4], 0, ARGV[2], 'JUSTID') == 0 then return 0 end
return 1
"""
# KEYS: job hash. ARGV: token, error (JSON). The owner records the error of a failed attempt.
_RETRY = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'status') ~= 'running' then
  return 0
end
redis.call('HSET', KEYS[1], 'error', ARGV[2])
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
        script = self.r.register_script
        self._submit, self._start, self._finish = script(_SUBMIT), script(_START), script(_FINISH)
        self._release, self._progress, self._heartbeat = script(_RELEASE), script(_PROGRESS), script(_HEARTBEAT)
        self._retry, self._cancel = script(_RETRY), script(_CANCEL)
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
        """One script: two concurrent submits with the same key create one job."""
        await self._ensure_group()
        while True:
            job = Job(id=new_job_id(), request=request, idempotency_key=idempotency_key)
            idem = f"{self.p}:idem:{idempotency_key}" if idempotency_key else f"{self.p}:idem"
            keys = [idem, self._job(job.id), f"{self.p}:index", self._events(job.id), self.stream]
            created, job_id = await self._submit(keys=keys, args=[
                1 if idempotency_key else 0, job.id, self.ttl, job.created_at, json.dumps(request),
                json.dumps(job.progress), idempotency_key or "", f"{self.p}:job:", json.dumps({"stage": "queued"})])
            if created:
                return job, True
            try:
                return await self.get(job_id), False
            except JobNotFound:  # expired just now: the key is free again
                continue

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
        error = {"code": "retry_limit", "status": 500, "message": f"gave up after {self.max_attempts} attempts"}
        res = await self._start(keys=[self._job(job_id), self.stream, f"{self.p}:dead"], args=[
            entry_id, consumer, time.time(), self.max_attempts, GROUP, json.dumps(error)[:-1] + ', "last_error": ',
            self.ttl, job_id])
        if int(res[0]) == 2:
            await self._event(job_id, {"stage": "failed", "error": json.loads(res[1])}, final=True)
        if int(res[0]) != 1:  # cancelled, finished, expired, dead-lettered, or taken by another consumer
            return None
        self.held.add(entry_id)
        await self._event(job_id, {"stage": "running", "attempt": int(res[1].rsplit(":", 1)[1]), "worker": consumer})
        return Claim(await self.get(job_id), res[1])

    @staticmethod
    def _entry(claim: Claim) -> str:
        return claim.token.rsplit(":", 1)[0]

    async def heartbeat(self, claim: Claim, consumer: str) -> bool:
        owner = bool(await self._heartbeat(keys=[self._job(claim.job.id), self.stream],
                                           args=[claim.token, self._entry(claim), GROUP, consumer]))
        if not owner:  # reclaimed by another worker (or finished): this process may reclaim it later
            self.held.discard(self._entry(claim))
        return owner

    async def progress(self, claim: Claim, event: dict) -> bool:
        return bool(await self._progress(keys=[self._job(claim.job.id), self._events(claim.job.id)],
                                         args=[claim.token, json.dumps(event)]))

    async def _finish_as(self, claim: Claim, status: str, field: str, value: dict) -> bool:
        self.held.discard(self._entry(claim))
        res = await self._finish(keys=[self._job(claim.job.id), self.stream], args=[
            claim.token, self._entry(claim), GROUP, status, time.time(), field, json.dumps(value), self.ttl])
        return res == 1

    async def complete(self, claim: Claim, result: dict) -> bool:
        stored = await self._finish_as(claim, "succeeded", "result", result)
        if stored:
            await self._event(claim.job.id, {"stage": "done"}, final=True)
        return stored

    async def fail(self, claim: Claim, error: dict, retry: bool) -> bool:
        if retry:  # keep it pending: reclaimed after the visibility timeout, until max_attempts
            self.held.discard(self._entry(claim))
            return bool(await self._retry(keys=[self._job(claim.job.id)], args=[claim.token, json.dumps(error)]))
        stored = await self._finish_as(claim, "failed", "error", error)
        if stored:
            await self._event(claim.job.id, {"stage": "failed", "error": error}, final=True)
        return stored

    async def release(self, claim: Claim) -> bool:
        """Graceful hand-back of a running job this delivery still owns: re-queued as a fresh entry
        without counting an attempt. A stale delivery changes nothing."""
        self.held.discard(self._entry(claim))
        event = json.dumps({"stage": "queued", "reason": "worker shutdown"})
        res = await self._release(keys=[self._job(claim.job.id), self.stream, self._events(claim.job.id)],
                                  args=[claim.token, self._entry(claim), GROUP, claim.job.id, event])
        return res == 1

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

    async def dead_letters(self) -> int:
        return int(await self.r.xlen(f"{self.p}:dead"))

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.r.ping(), 2))
        except Exception:
            return False

    async def close(self) -> None:
        await self.r.aclose()
