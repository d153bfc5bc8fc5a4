"""Jobs on Redis Streams (DESIGN 5).

Keys (``prefix`` = ``fw`` by default):
  {p}:stream            job ids; consumer group ``workers`` (XREADGROUP to take, XACK when stored)
  {p}:job:{id}          hash: request, model, owner, status, timestamps, progress, result, error, attempts, token
                        (a poll reads the public fields with HMGET, never ``request``: a base64 video)
  {p}:job:{id}:events   progress events (relayed as SSE)
  {p}:idem:{owner}:{key}  idempotency key -> job id (keys are per tenant: another tenant's key is another key)
  {p}:index             zset created_at -> id (listing, all tenants: an admin's); an entry leaves when its job's
                        result TTL runs out (pruned by every submit, through {p}:expiry)
  {p}:index:{owner}     zset created_at -> id of one tenant's jobs (its listing; pruned by its submits and lists)
  {p}:active:{owner}    set of the ids of one tenant's jobs that may be queued or running: the tenant's job
                        quota. The submit script drops the members whose job is no longer queued or running
                        and counts the rest, in the same step as the insert (exact across gateways)
  {p}:expiry            zset: finished job id -> when its hash expires (finished_at + result TTL)
  {p}:queued            set of the ids of queued jobs   } kept by the scripts below on every status change:
  {p}:running           set of the ids of running jobs  } depth() and the KEDA trigger read SCARD
  {p}:dead              dead-lettered jobs with their last error (the newest ``dead_letter_max``)
  {p}:dead:total        how many jobs were ever dead-lettered (framewise_job_dead_letters)

Why sets and not the consumer group's numbers: every finished entry is XDEL'd, and Redis (7.0) then
reports the group's ``lag`` as NULL whenever a deleted entry lies at or after the group's last-delivered
id with older entries still in the stream (a job finishing before one delivered earlier, a retry still
pending, a crashed worker's entry) -- so "lag + pending" undercounts the backlog exactly when workers
are busy (tests/test_queue_numbers.py). A set per state, changed in the same script as the status, is
exact under every ordering, idempotent (SADD/SREM), and what KEDA's ``redis`` scaler reads (SCARD).

A delivery is identified by ``token = <entry id>:<delivery count>`` (the count read inside the
script that starts it, together with a check that this consumer holds the entry). Every state change
is a Lua script that checks the token, so a result is stored exactly once even if a slow worker's job
was reclaimed by another, and a stale worker neither writes the job nor acknowledges the entry the new
owner holds (if that owner dies too, the entry is reclaimed again). The hash's ``entry`` names the
stream entry that currently carries the job; a delivery of any other entry is dropped. Entries of
crashed workers are reclaimed with XAUTOCLAIM after the visibility timeout; owners refresh the idle
time (heartbeat) with XCLAIM JUSTID. Consumers left behind by gone workers (nothing pending, idle past
``consumer_idle_s``) are removed from the group by a sweep that ``claim`` runs now and then.

Every event a state change emits (running, done, failed, cancelled) is written by the same script as the
state, so a Redis failure between the two never leaves a finished job without its final event.

Redis off the synchronous path: every command has a short timeout (:data:`OP_TIMEOUT_S`; a blocking read
its block time more) and one reconnect on a broken connection, and a store that does not answer raises
:class:`~server.jobs.base.QueueUnavailable` (503 ``queue_unavailable`` + ``Retry-After`` on the HTTP
API; the worker retries).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from framewise.server.jobs.base import (
    DEFAULT_OWNER,
    FINAL,
    Claim,
    Job,
    JobNotFound,
    JobQuotaExceeded,
    QueueUnavailable,
    is_final_event,
    new_job_id,
    valid_job_id,
)

GROUP = "workers"
OP_TIMEOUT_S = 1.0  # a command (connect, or reply) that takes longer: the store is unavailable
BLOCK_S = 1.0  # blocking reads (XREAD, XREADGROUP) wait this long at most per call
# the fields a poll reads (HMGET): everything public, never the request
_PUBLIC = ("id", "model", "status", "created_at", "started_at", "finished_at", "progress", "result", "error",
           "attempts", "idempotency_key", "owner")
_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)  # redis-py's BusyLoadingError is a ConnectionError


def _unavailable(e: BaseException) -> QueueUnavailable:
    return QueueUnavailable(f"the job store (Redis) is unavailable: {type(e).__name__}: {e}")


def _store_call(fn):
    """Redis not answering -> :class:`QueueUnavailable`."""

    @functools.wraps(fn)
    async def call(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except QueueUnavailable:
            raise
        except _DOWN as e:
            raise _unavailable(e) from e

    return call


def state_keys(prefix: str) -> dict[str, str]:
    """The sets holding the ids of queued and running jobs (deploy/k8s/components/keda reads them)."""
    return {"queued": f"{prefix}:queued", "running": f"{prefix}:running"}


# Every script below that changes a job checks the caller's delivery token against the hash's
# ``token`` first: a stale delivery (its entry reclaimed by another worker, or handed back) never
# writes the job and never acknowledges the stream entry, which the current owner still holds.

# KEYS: idem key (or a placeholder), job hash, index, events, stream, queued set, expiry, the owner's index, the
# owner's active set.
# ARGV: has key (1/0), job id, ttl, created_at, request, progress, idempotency key, job key prefix, event,
# how many expired index entries to prune at most, model, owner, the owner's job quota (0: none).
# -> {1, id} created, {0, id} of the live job that already holds the owner's idempotency key, or {-1, ''}
# the owner has its quota of jobs queued or running (nothing written).
_SUBMIT = """
if ARGV[1] == '1' then
  local existing = redis.call('GET', KEYS[1])
  if existing and redis.call('EXISTS', ARGV[8] .. existing) == 1 then return {0, existing} end
end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[9])) do
  local s = redis.call('HGET', ARGV[8] .. id, 'status')
  if s ~= 'queued' and s ~= 'running' then redis.call('SREM', KEYS[9], id) end
end
if tonumber(ARGV[13]) > 0 and redis.call('SCARD', KEYS[9]) >= tonumber(ARGV[13]) then return {-1, ''} end
if ARGV[1] == '1' then redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
local entry = redis.call('XADD', KEYS[5], '*', 'id', ARGV[2])
redis.call('HSET', KEYS[2], 'id', ARGV[2], 'request', ARGV[5], 'status', 'queued', 'created_at', ARGV[4],
           'progress', ARGV[6], 'attempts', 0, 'idempotency_key', ARGV[7], 'entry', entry, 'model', ARGV[11],
           'owner', ARGV[12])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('ZADD', KEYS[8], ARGV[4], ARGV[2])
redis.call('SADD', KEYS[9], ARGV[2])
redis.call('SADD', KEYS[6], ARGV[2])
redis.call('XADD', KEYS[4], '*', 'data', ARGV[9])
local gone = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', ARGV[4], 'LIMIT', 0, tonumber(ARGV[10]))
if #gone > 0 then
  redis.call('ZREM', KEYS[3], unpack(gone))
  redis.call('ZREM', KEYS[8], unpack(gone))
  redis.call('ZREM', KEYS[7], unpack(gone))
end
for _, id in ipairs(redis.call('ZRANGE', KEYS[8], 0, 1)) do  -- the owner's oldest entries, expired meanwhile
  if redis.call('EXISTS', ARGV[8] .. id) == 0 then redis.call('ZREM', KEYS[8], id) end
end
return {1, ARGV[2]}
"""
# KEYS: job hash, stream, dead-letter stream, queued set, running set, expiry, dead-letter total, events.
# ARGV: entry, consumer, now, max attempts, group, retry-limit error JSON up to its last_error value, ttl,
# job id, dead letters kept.
# -> {1, token, hash fields...} started (its "running" event written); {0} nothing to run (entry
# acknowledged); {-1} another consumer holds the entry now (touch nothing); {2, error} over the attempt
# limit, dead-lettered (its "failed" event written).
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
  redis.call('SREM', KEYS[4], ARGV[8])
  redis.call('SREM', KEYS[5], ARGV[8])
  redis.call('ZADD', KEYS[6], tonumber(ARGV[3]) + tonumber(ARGV[7]), ARGV[8])
  redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[9], '*', 'id', ARGV[8], 'error', err)
  redis.call('INCR', KEYS[7])
  redis.call('XADD', KEYS[8], 'MAXLEN', '~', 1000, '*', 'data', '{"stage": "failed", "error": ' .. err .. '}')
  redis.call('EXPIRE', KEYS[8], ARGV[7])
  ack()
  return {2, err}
end
local token = ARGV[1] .. ':' .. n
redis.call('SREM', KEYS[4], ARGV[8])
redis.call('SADD', KEYS[5], ARGV[8])
redis.call('HSET', KEYS[1], 'status', 'running', 'token', token)
if not redis.call('HGET', KEYS[1], 'started_at') then redis.call('HSET', KEYS[1], 'started_at', ARGV[3]) end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('XADD', KEYS[8], 'MAXLEN', '~', 1000, '*', 'data',
           cjson.encode({stage = 'running', attempt = n, worker = ARGV[2]}))
return {1, token, redis.call('HGETALL', KEYS[1])}
"""
# KEYS: job hash, stream, running set, expiry, events. ARGV: token, entry, group, new status, now, field, value,
# ttl, job id, final event (JSON).
# -> 1 stored (a success drops the error an earlier attempt left; the final event written); 0 this
# delivery's job was cancelled meanwhile (entry acknowledged); -1 not the owner.
_FINISH = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return -1 end
redis.call('XACK', KEYS[2], ARGV[3], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'finished_at', ARGV[5], ARGV[6], ARGV[7])
if ARGV[4] == 'succeeded' then
  redis.call('HINCRBY', KEYS[1], 'completions', 1)
  redis.call('HDEL', KEYS[1], 'error')
end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', 1000, '*', 'data', ARGV[10])
redis.call('EXPIRE', KEYS[5], ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('SREM', KEYS[3], ARGV[9])
redis.call('ZADD', KEYS[4], tonumber(ARGV[5]) + tonumber(ARGV[8]), ARGV[9])
return 1
"""
# KEYS: job hash, stream, events, queued set, running set. ARGV: token, entry, group, job id, event.
# Owner of a running job: re-queue as a fresh entry (attempt not counted) -> 1; 0 / -1 as _FINISH.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return -1 end
redis.call('XACK', KEYS[2], ARGV[3], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[4])
redis.call('HSET', KEYS[1], 'status', 'queued', 'token', '', 'entry', entry)
redis.call('SREM', KEYS[5], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[4])
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
# KEYS: job hash, queued set, running set, expiry, events; ARGV: now, ttl, job id, owner ('' = any). Queued/running
# -> cancelled, its "cancelled" event written (a running job's worker notices at its next heartbeat and
# acknowledges the entry). -1: no such job, or another owner's.
_CANCEL = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return -1 end
if ARGV[4] ~= '' and (redis.call('HGET', KEYS[1], 'owner') or 'default') ~= ARGV[4] then return -1 end
if s ~= 'queued' and s ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', 1000, '*', 'data', '{"stage": "cancelled"}')
redis.call('EXPIRE', KEYS[5], ARGV[2])
redis.call('SREM', KEYS[2], ARGV[3])
redis.call('SREM', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], tonumber(ARGV[1]) + tonumber(ARGV[2]), ARGV[3])
return 1
"""
# KEYS: stream. ARGV: group, idle ms. Consumers with nothing pending that have not read, claimed or
# heart-beaten for longer than that (workers gone: every crash and restart leaves a new name behind) are
# removed, in one step with the check, so an entry a consumer takes meanwhile is never dropped. A live
# worker removed while idle is recreated by its next read.
_SWEEP = """
local removed = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if tonumber(f['pending']) == 0 and tonumber(f['idle']) > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    removed[#removed + 1] = f['name']
  end
end
return removed
"""


def _decode(h: dict) -> Job:
    """A job from its hash fields; without ``request`` (a poll's HMGET), ``request`` is ``{"model": ...}``."""

    def j(name, default=None):
        v = h.get(name)
        return json.loads(v) if v else default

    def f(name):
        v = h.get(name)
        return float(v) if v else None

    request = j("request") if "request" in h else {"model": h.get("model")}
    return Job(id=h["id"], request=request, status=h["status"], created_at=float(h["created_at"]),
               started_at=f("started_at"), finished_at=f("finished_at"), progress=j("progress", {}),
               result=j("result"), error=j("error"), attempts=int(h.get("attempts", 0)),
               idempotency_key=h.get("idempotency_key") or None, owner=h.get("owner") or DEFAULT_OWNER)


class RedisJobQueue:
    PRUNE_PER_SUBMIT = 100  # expired listing entries a submit removes at most (each submit adds one)

    def __init__(self, url: str, *, prefix: str = "fw", result_ttl_s: int = 24 * 3600,
                 visibility_timeout_s: float = 60.0, max_attempts: int = 3, dead_letter_max: int = 10_000,
                 consumer_idle_s: float | None = None):
        """``dead_letter_max``: dead letters kept in ``<prefix>:dead`` (the oldest are trimmed; the total
        is counted apart). ``consumer_idle_s``: a consumer with nothing pending and no read, claim or
        heartbeat for this long is removed from the group (default 10 visibility timeouts)."""
        # short timeouts and one reconnect (a connection broken by a Redis restart), no backoff: a store that
        # does not answer is reported within ~2 x OP_TIMEOUT_S, never waited out on a request path
        common = dict(decode_responses=True, health_check_interval=5, socket_connect_timeout=OP_TIMEOUT_S,
                      retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
        self.r = aioredis.from_url(url, socket_timeout=OP_TIMEOUT_S, **common)
        self.rb = aioredis.from_url(url, socket_timeout=BLOCK_S + OP_TIMEOUT_S, **common)  # blocking reads
        self.p, self.ttl = prefix, int(result_ttl_s)
        self.visibility_ms = int(visibility_timeout_s * 1000)
        self.max_attempts = max_attempts
        self.dead_letter_max = int(dead_letter_max)
        self.consumer_idle_ms = int((consumer_idle_s if consumer_idle_s is not None
                                     else 10 * visibility_timeout_s) * 1000)
        self._sweep_every_s = min(60.0, self.consumer_idle_ms / 2000)
        self._next_sweep = 0.0
        self.stream = f"{prefix}:stream"
        states = state_keys(prefix)
        self.queued_key, self.running_key = states["queued"], states["running"]
        self.index, self.expiry = f"{prefix}:index", f"{prefix}:expiry"
        self.dead, self.dead_total = f"{prefix}:dead", f"{prefix}:dead:total"
        self.reclaims = 0
        script = self.r.register_script
        self._submit, self._start, self._finish = script(_SUBMIT), script(_START), script(_FINISH)
        self._release, self._progress, self._heartbeat = script(_RELEASE), script(_PROGRESS), script(_HEARTBEAT)
        self._retry, self._cancel, self._sweep = script(_RETRY), script(_CANCEL), script(_SWEEP)
        self._group_ready = False
        self.held: set[str] = set()  # stream entries this process is running

    def _job(self, job_id: str) -> str:
        if not valid_job_id(job_id):  # never a key name built from anything else
            raise JobNotFound(job_id)
        return f"{self.p}:job:{job_id}"

    def _events(self, job_id: str) -> str:
        return f"{self._job(job_id)}:events"

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
    def owner_index(self, owner: str) -> str:
        return f"{self.p}:index:{owner}"

    @_store_call
    async def submit(self, request: dict, idempotency_key: str | None = None, owner: str = DEFAULT_OWNER,
                     max_active: int = 0) -> tuple[Job, bool]:
        """One script: two concurrent submits with the same key (and owner) create one job; the owner's job
        quota is counted and the job inserted in the same step."""
        await self._ensure_group()
        while True:
            job = Job(id=new_job_id(), request=request, idempotency_key=idempotency_key, owner=owner)
            idem = f"{self.p}:idem:{owner}:{idempotency_key}" if idempotency_key else f"{self.p}:idem"
            keys = [idem, self._job(job.id), self.index, self._events(job.id), self.stream, self.queued_key,
                    self.expiry, self.owner_index(owner), f"{self.p}:active:{owner}"]
            created, job_id = await self._submit(keys=keys, args=[
                1 if idempotency_key else 0, job.id, self.ttl, job.created_at, json.dumps(request),
                json.dumps(job.progress), idempotency_key or "", f"{self.p}:job:", json.dumps({"stage": "queued"}),
                self.PRUNE_PER_SUBMIT, str(request.get("model", "")), owner, int(max_active)])
            if int(created) == -1:
                raise JobQuotaExceeded(owner, max_active)
            if int(created) == 1:
                return job, True
            try:
                return await self.get(job_id, owner), False
            except JobNotFound:  # expired just now: the key is free again
                continue

    @_store_call
    async def get(self, job_id: str, owner: str | None = None) -> Job:
        key = self._job(job_id)  # (an id outside the grammar: JobNotFound, no Redis call)
        h = dict(zip(_PUBLIC, await self.r.hmget(key, _PUBLIC), strict=True))
        if h["status"] is None or (owner is not None and (h["owner"] or DEFAULT_OWNER) != owner):
            raise JobNotFound(job_id)
        if h["model"] is None:  # a job submitted before the hash had its own `model` field
            h["request"] = await self.r.hget(key, "request")
        return _decode({k: v for k, v in h.items() if v is not None})

    @_store_call
    async def get_request(self, job_id: str) -> dict:
        raw = await self.r.hget(self._job(job_id), "request")
        if raw is None:
            raise JobNotFound(job_id)
        return json.loads(raw)

    @_store_call
    async def list(self, status: str | None, limit: int, before: float | None,
                   owner: str | None = None) -> list[Job]:
        """Newest first: ``owner``'s jobs (its own index), or everyone's (``owner`` None: an admin)."""
        if before is not None and not math.isfinite(before):
            raise ValueError(f"before must be a finite number, not {before!r}")
        hi = f"({before!r}" if before is not None else "+inf"
        index = self.index if owner is None else self.owner_index(owner)
        out: list[Job] = []
        offset = 0
        while len(out) < limit:
            ids = await self.r.zrevrangebyscore(index, hi, "-inf", start=offset, num=limit * 2)
            if not ids:
                break
            offset += len(ids)
            for job_id in ids:
                try:
                    job = await self.get(job_id)
                except JobNotFound:  # expired
                    await self.r.zrem(index, job_id)
                    if owner is None:
                        await self.r.zrem(self.expiry, job_id)
                    offset -= 1
                    continue
                if status is None or job.status == status:
                    out.append(job)
                    if len(out) == limit:
                        break
        return out

    @_store_call
    async def cancel(self, job_id: str, owner: str | None = None) -> Job:
        res = await self._cancel(keys=[self._job(job_id), self.queued_key, self.running_key, self.expiry,
                                       self._events(job_id)], args=[time.time(), self.ttl, job_id, owner or ""])
        if res == -1:
            raise JobNotFound(job_id)
        return await self.get(job_id)

    async def events(self, job_id: str, last_id: str = "0", owner: str | None = None
                     ) -> AsyncIterator[tuple[str, dict]]:
        """Raises :class:`QueueUnavailable` when Redis stops answering (the last id yielded is where to resume)."""
        await self.get(job_id, owner)
        while True:
            try:
                resp = await self.rb.xread({self._events(job_id): last_id}, block=int(BLOCK_S * 1000), count=100)
            except _DOWN as e:
                raise _unavailable(e) from e
            for _, entries in resp or []:
                for entry_id, data in entries:
                    last_id = entry_id
                    event = json.loads(data["data"])
                    yield entry_id, event
                    if is_final_event(event):
                        return
            if not resp and (await self.get(job_id)).status in FINAL:
                return

    # ---- worker side --------------------------------------------------------------------------
    @_store_call
    async def claim(self, consumer: str, block_s: float) -> Claim | None:
        await self._ensure_group()
        try:
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + self._sweep_every_s
                await self.sweep_consumers()
            # entries of dead consumers first (idle past the visibility timeout), but never one this process is
            # still running (its heartbeat may just be late, or Redis was away): looked up before claiming, as
            # claiming an entry counts a delivery, and deliveries are attempts (XAUTOCLAIM would count them)
            idle = await self.r.xpending_range(self.stream, GROUP, "-", "+", len(self.held) + 1,
                                               idle=self.visibility_ms)
            stale = [p["message_id"] for p in idle if p["message_id"] not in self.held]
            entries = []
            if stale:
                claimed = await self.r.xclaim(self.stream, GROUP, consumer, self.visibility_ms, stale[:1])
                entries = [(e, d) for e, d in claimed if d]  # (a deleted entry leaves the pending list)
            if entries:
                self.reclaims += 1
            else:
                resp = await self.rb.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=1,
                                                block=max(1, int(min(block_s, BLOCK_S) * 1000)))
                entries = resp[0][1] if resp else []
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self._group_ready = False  # Redis came back without its data: the group is made again next time
            return None
        for entry_id, data in entries:
            if not valid_job_id(data.get("id")):  # not one of ours: acknowledge and drop it
                await self.r.xack(self.stream, GROUP, entry_id)
                await self.r.xdel(self.stream, entry_id)
                continue
            claim = await self._deliver(entry_id, data["id"], consumer)
            if claim is not None:
                return claim
        return None

    async def _deliver(self, entry_id: str, job_id: str, consumer: str) -> Claim | None:
        """One script starts the delivery, writes its event and returns the whole job: a Redis failure
        never leaves a job started that this worker does not know it holds."""
        error = {"code": "retry_limit", "status": 500, "message": f"gave up after {self.max_attempts} attempts"}
        res = await self._start(keys=[self._job(job_id), self.stream, self.dead, self.queued_key, self.running_key,
                                      self.expiry, self.dead_total, self._events(job_id)], args=[
            entry_id, consumer, time.time(), self.max_attempts, GROUP, json.dumps(error)[:-1] + ', "last_error": ',
            self.ttl, job_id, self.dead_letter_max])
        if int(res[0]) != 1:  # cancelled, finished, expired, dead-lettered, or taken by another consumer
            return None
        self.held.add(entry_id)
        flat = res[2]
        return Claim(_decode(dict(zip(flat[::2], flat[1::2], strict=True))), res[1])

    @staticmethod
    def _entry(claim: Claim) -> str:
        return claim.token.rsplit(":", 1)[0]

    @_store_call
    async def heartbeat(self, claim: Claim, consumer: str) -> bool:
        owner = bool(await self._heartbeat(keys=[self._job(claim.job.id), self.stream],
                                           args=[claim.token, self._entry(claim), GROUP, consumer]))
        if not owner:  # reclaimed by another worker (or finished): this process may reclaim it later
            self.held.discard(self._entry(claim))
        return owner

    @_store_call
    async def progress(self, claim: Claim, event: dict) -> bool:
        return bool(await self._progress(keys=[self._job(claim.job.id), self._events(claim.job.id)],
                                         args=[claim.token, json.dumps(event)]))

    async def _finish_as(self, claim: Claim, status: str, field: str, value: dict, event: dict) -> bool:
        self.held.discard(self._entry(claim))
        job_id = claim.job.id
        res = await self._finish(keys=[self._job(job_id), self.stream, self.running_key, self.expiry,
                                       self._events(job_id)], args=[
            claim.token, self._entry(claim), GROUP, status, time.time(), field, json.dumps(value), self.ttl,
            job_id, json.dumps(event)])
        return res == 1

    @_store_call
    async def complete(self, claim: Claim, result: dict) -> bool:
        return await self._finish_as(claim, "succeeded", "result", result, {"stage": "done"})

    @_store_call
    async def fail(self, claim: Claim, error: dict, retry: bool) -> bool:
        if retry:  # keep it pending: reclaimed after the visibility timeout, until max_attempts
            self.held.discard(self._entry(claim))
            return bool(await self._retry(keys=[self._job(claim.job.id)], args=[claim.token, json.dumps(error)]))
        return await self._finish_as(claim, "failed", "error", error, {"stage": "failed", "error": error})

    @_store_call
    async def release(self, claim: Claim) -> bool:
        """Graceful hand-back of a running job this delivery still owns: re-queued as a fresh entry
        without counting an attempt. A stale delivery changes nothing."""
        self.held.discard(self._entry(claim))
        event = json.dumps({"stage": "queued", "reason": "worker shutdown"})
        res = await self._release(keys=[self._job(claim.job.id), self.stream, self._events(claim.job.id),
                                        self.queued_key, self.running_key],
                                  args=[claim.token, self._entry(claim), GROUP, claim.job.id, event])
        return res == 1

    @_store_call
    async def is_cancelled(self, job_id: str) -> bool:
        return valid_job_id(job_id) and await self.r.hget(self._job(job_id), "status") == "cancelled"

    @_store_call
    async def completions(self, job_id: str) -> int:
        return int(await self.r.hget(self._job(job_id), "completions") or 0) if valid_job_id(job_id) else 0

    @_store_call
    async def counts(self) -> dict[str, int]:
        """Queued and running jobs, read together (one MULTI) from the sets the scripts keep."""
        async with self.r.pipeline(transaction=True) as pipe:
            queued, running = await pipe.scard(self.queued_key).scard(self.running_key).execute()
        return {"queued": int(queued), "running": int(running)}

    async def depth(self) -> int:
        counts = await self.counts()
        return counts["queued"] + counts["running"]

    @_store_call
    async def sweep_consumers(self) -> list[str]:
        """Remove consumers of the group that hold nothing and have been idle past ``consumer_idle_s``."""
        await self._ensure_group()
        return list(await self._sweep(keys=[self.stream], args=[GROUP, self.consumer_idle_ms]))

    @_store_call
    async def oldest_age(self) -> float:
        first = await self.r.xrange(self.stream, count=1)
        if not first:
            return 0.0
        return max(0.0, time.time() - int(first[0][0].split("-")[0]) / 1000)

    @_store_call
    async def dead_letters(self) -> int:
        """Jobs ever dead-lettered (``<prefix>:dead`` itself keeps only the newest ``dead_letter_max``)."""
        return int(await self.r.get(self.dead_total) or 0)

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.r.ping(), 2))
        except Exception:
            return False

    async def close(self) -> None:
        await self.r.aclose()
        await self.rb.aclose()
