"""Per-tenant request limits, checked before a request's body is read (server/admission.py calls them).

- **requests per window** (``rpm``, per ``rate_limit_window_s``, 60 s by default): the `limits` library's
  moving window (a sliding log: at most ``rpm`` requests in any ``window_s``; Retry-After is when the oldest
  one leaves the window). With Redis configured it lives in Redis (``<prefix>:rl:...``, the library's Lua
  scripts), so every gateway replica counts against the same window; else in this process.
- **concurrent requests** (``concurrent``): POST requests in flight (chat completions, uploads, job
  submissions). With Redis: a sorted set per tenant, ``<prefix>:inflight:<tenant>``, one member per request
  scored with a lease deadline, taken by one Lua script (drop lapsed leases, count, add) and removed when the
  request ends; this process renews the leases of its requests every :data:`LEASE_RENEW_S`, so a replica that
  dies holding some frees them within :data:`LEASE_S`. Else a counter in this process.

Redis not answering (an outage, a hung server) must not take short requests down (they never need Redis
otherwise): a call that fails or takes longer than :data:`REDIS_TIMEOUT_S` is counted in this process's own
limiter instead, and Redis is left alone for :data:`REDIS_RETRY_S` (limits then hold per replica).

Over a limit: 429 with ``Retry-After``; error type ``rate_limit_exceeded``, codes ``rate_limit_exceeded``
(requests per window) and ``concurrency_limit_exceeded`` (requests in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid

from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

from framewise.server.tenants import Tenant

log = logging.getLogger("framewise.quotas")
REDIS_TIMEOUT_S = 0.25  # a limiter call to Redis that takes longer: counted here instead
REDIS_RETRY_S = 5.0  # after a Redis failure, this process counts alone for this long
LEASE_S = 30.0  # a concurrency slot in Redis lapses this long after its last renewal
LEASE_RENEW_S = 10.0
CONCURRENCY_RETRY_AFTER_S = 1

# KEYS: the tenant's in-flight set. ARGV: now, lease deadline, member, limit.
# -> 1 taken, 0 the tenant has `limit` requests in flight.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(ARGV[2]) - tonumber(ARGV[1])) * 2000))
return 1
"""


class LimitExceeded(Exception):
    """A tenant over a limit: ``status`` 429, ``code`` (``rate_limit_exceeded`` / ``concurrency_limit_exceeded``),
    ``limit`` (the metric's label: ``rpm`` / ``concurrent``), ``retry_after`` in whole seconds (>= 1)."""

    def __init__(self, status: int, code: str, limit: str, message: str, retry_after: int):
        super().__init__(message)
        self.status, self.code, self.limit, self.message = status, code, limit, message
        self.retry_after = max(1, int(retry_after))


class Hold:
    """One request's concurrency slot; ``release`` is idempotent (and may be called from sync code)."""

    def __init__(self, limiter: TenantLimiter, tenant: str, member: str, remote: bool):
        self.limiter, self.tenant, self.member, self.remote = limiter, tenant, member, remote
        self.open = True

    def release(self) -> None:
        if not self.open:
            return
        self.open = False
        self.limiter._release(self)


class TenantLimiter:
    def __init__(self, redis_url: str | None = None, prefix: str = "fw"):
        self.local_window = MovingWindowRateLimiter(MemoryStorage())
        self.local_inflight: dict[str, int] = {}
        self.redis_url, self.prefix = redis_url, prefix
        self._down_until = 0.0
        self._held: dict[str, Hold] = {}  # member -> the Redis holds of this process (renewed)
        self._renewer: asyncio.Task | None = None
        self.window = self.r = None
        if redis_url:
            import redis.asyncio as aioredis

            opts = dict(socket_timeout=REDIS_TIMEOUT_S * 4, socket_connect_timeout=REDIS_TIMEOUT_S * 4)
            storage = RedisStorage(f"async+{redis_url}", implementation="redispy", key_prefix=f"{prefix}:rl", **opts)
            self.window = MovingWindowRateLimiter(storage)
            self.r = aioredis.from_url(redis_url, decode_responses=True, **opts)
            self._acquire = self.r.register_script(_ACQUIRE)

    # ---- Redis, or this process when it does not answer ----------------------------------------------
    def _remote(self) -> bool:
        return self.r is not None and time.monotonic() >= self._down_until

    def _redis_failed(self, what: str, e: BaseException) -> None:
        if time.monotonic() >= self._down_until:
            log.warning("tenant limits: Redis did not answer (%s: %s: %s); counting in this process for %g s",
                        what, type(e).__name__, e, REDIS_RETRY_S)
        self._down_until = time.monotonic() + REDIS_RETRY_S

    async def _in_redis(self, what: str, call):
        """``await call()`` bounded by :data:`REDIS_TIMEOUT_S`; None (and this process counts alone for a while)
        when Redis fails or is slow."""
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                return await call()
        except Exception as e:  # noqa: BLE001 - any failure of the store: fall back, never fail the request
            self._redis_failed(what, e)
            return None

    # ---- requests per window ------------------------------------------------------------------------------
    async def hit(self, tenant: Tenant) -> None:
        """Count one request of ``tenant``; :class:`LimitExceeded` when its window is full."""
        lim = tenant.limits
        if lim.rpm <= 0:
            return
        item = RateLimitItemPerSecond(lim.rpm, lim.window_s)
        window = self.local_window
        allowed = None
        if self._remote():
            allowed = await self._in_redis("rate limit", lambda: self.window.hit(item, tenant.name))
            if allowed is not None:
                window = self.window
        if allowed is None:
            allowed = await self.local_window.hit(item, tenant.name)
        if allowed:
            return
        if window is self.local_window:
            stats = await window.get_window_stats(item, tenant.name)
        else:
            stats = await self._in_redis("window stats", lambda: window.get_window_stats(item, tenant.name))
        retry = math.ceil(stats.reset_time - time.time()) if stats is not None else lim.window_s
        raise LimitExceeded(429, "rate_limit_exceeded", "rpm", f"tenant {tenant.name!r} is over its limit of "
                            f"{lim.rpm} requests per {lim.window_s} s; retry after the time in Retry-After",
                            min(max(retry, 1), lim.window_s))

    # ---- requests in flight ---------------------------------------------------------------------------------
    async def acquire(self, tenant: Tenant) -> Hold | None:
        """A concurrency slot for one request of ``tenant`` (None: it has no such limit);
        :class:`LimitExceeded` when all are taken."""
        limit = tenant.limits.concurrent
        if limit <= 0:
            return None
        member = uuid.uuid4().hex
        if self._remote():
            now = time.time()
            got = await self._in_redis("concurrency", lambda: self._acquire(
                keys=[self._key(tenant.name)], args=[now, now + LEASE_S, member, limit]))
            if got is not None:
                if int(got) != 1:
                    raise self._busy(tenant)
                hold = Hold(self, tenant.name, member, remote=True)
                self._held[member] = hold
                self._ensure_renewer()
                return hold
        if self.local_inflight.get(tenant.name, 0) >= limit:
            raise self._busy(tenant)
        self.local_inflight[tenant.name] = self.local_inflight.get(tenant.name, 0) + 1
        return Hold(self, tenant.name, member, remote=False)

    def _key(self, tenant: str) -> str:
        return f"{self.prefix}:inflight:{tenant}"

    @staticmethod
    def _busy(tenant: Tenant) -> LimitExceeded:
        return LimitExceeded(429, "concurrency_limit_exceeded", "concurrent",
                             f"tenant {tenant.name!r} has {tenant.limits.concurrent} requests in flight, its limit; "
                             "retry when one has finished", CONCURRENCY_RETRY_AFTER_S)

    def _release(self, hold: Hold) -> None:
        if not hold.remote:
            self.local_inflight[hold.tenant] = max(0, self.local_inflight.get(hold.tenant, 0) - 1)
            return
        self._held.pop(hold.member, None)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the lease lapses by itself
        loop.create_task(self._in_redis("release", lambda: self.r.zrem(self._key(hold.tenant), hold.member)))

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        """Push the lease of every Redis slot this process holds forward (until none is held)."""
        while self._held:
            await asyncio.sleep(LEASE_RENEW_S)
            deadline = time.time() + LEASE_S
            by_tenant: dict[str, dict[str, float]] = {}
            for member, hold in list(self._held.items()):
                by_tenant.setdefault(hold.tenant, {})[member] = deadline
            for tenant, members in by_tenant.items():
                await self._in_redis("lease renewal", lambda t=tenant, m=members: self.r.zadd(self._key(t), m, xx=True))

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        if self.r is not None:
            with contextlib.suppress(Exception):
                await self.r.aclose()
        if self.window is not None:
            with contextlib.suppress(Exception):
                await self.window.storage.bridge.storage.aclose()
