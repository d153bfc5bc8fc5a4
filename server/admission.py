"""Admission before buffering: a request is admitted or refused before its body is read.

FastAPI parses a JSON body whole (a chat request may be ~342 MB: one base64 video) before the
route runs, so admission in the route came after the memory was spent: 64 concurrent data-URL
requests could hold 64 x (the body + its parsed copies) before the first 429. Here, in a pure ASGI
middleware that runs before anything reads the body:

- **chat slots**: ``POST /v1/chat/completions`` takes one of ``max_concurrent_requests`` slots
  (:class:`ChatSlot`; 429 ``overloaded`` when none is free, 503 ``engine_not_ready`` before the engine
  is up, 503 ``engine_dead`` once it died). The route finds it in ``request.state.chat_slot`` and frees it as before: when a long video
  is handed to the job queue, when a stream closes, when the answer is sent.
- **body bytes in flight** (:class:`BodyBudget`, ``max_body_in_flight_mb``): every request body is
  reserved against one global budget, the declared ``Content-Length`` before reading, a chunked body
  chunk by chunk as it streams in (cut off with 503 when the budget runs out). An upload
  (``POST /v1/files``) counts only what it holds in memory: Starlette spools a file part to disk past
  1 MiB. Over the budget: 503 ``overloaded`` with ``Retry-After`` and ``Connection: close`` (the rest
  of the body is never read). A body larger than the whole budget is admitted when it is alone, so
  no request is refused for ever; the bound is the larger of the budget and one body.
  Reservations are released when the request ends (answered, failed or disconnected): the parsed
  body lives as long as the request does.
- **stalled bodies**: a body with no bytes for ``body_idle_timeout_s`` holds a slot and budget for
  nothing: 408 and the connection is closed.

- **tenants** (server/quotas.py): the tenant of the request's key (authenticated before this middleware by
  server/http_limits.py: :meth:`Admission.tenant_of`) is counted against its requests-per-window limit --
  every ``/v1/*`` request, with or without a body -- and a request with a body takes one of the tenant's
  concurrent-request slots (released when the request ends, or, for a chat completion, with its chat slot:
  a long video handed to the job queue no longer holds one). Over either: 429 ``rate_limit_exceeded`` /
  ``concurrency_limit_exceeded`` with ``Retry-After``, before the body is read. Tenant limits are checked
  before the global ones.

Every refusal is an OpenAI error object with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from framewise.server.errors import APIError
from framewise.server.http_edges import send_error
from framewise.server.quotas import LimitExceeded

log = logging.getLogger("framewise.admission")
MB = 1 << 20
UPLOAD_IN_MEMORY = 2 * MB  # Starlette's spool threshold (1 MiB) plus the small form fields around the file
RETRY_AFTER_S = 1
CHAT_PATH = "/v1/chat/completions"
_BODY_METHODS = ("POST", "PUT", "PATCH")


class ChatSlot:
    """One of ``max_concurrent_requests`` chat requests in flight (``services.inflight``, the in-flight
    gauge); 503 before the engine is ready, 429 when all are taken. ``release`` is idempotent."""

    def __init__(self, services):
        s = services
        self.also: list = []  # more to release with the slot (the tenant's concurrency slot)
        lifecycle = getattr(s, "lifecycle", None)
        if lifecycle is not None and lifecycle.engine_dead:
            raise APIError(503, "engine_dead", "the inference engine died; this process is exiting: retry "
                           "(another replica, or this one restarted)")
        if not s.engine.ready:
            raise APIError(503, "engine_not_ready", "the engine is not ready")
        if s.inflight >= s.settings.max_concurrent_requests:
            raise APIError(429, "overloaded", "too many requests in flight; retry later")
        s.inflight += 1
        s.metrics.inflight.set(s.inflight)
        self.services, self.open = s, True

    def release(self) -> None:
        if self.open:
            self.open = False
            self.services.inflight -= 1
            self.services.metrics.inflight.set(self.services.inflight)
            for release in self.also:
                release()


class BodyBudget:
    """Bytes of request bodies in flight, all requests together (one event loop: no lock)."""

    def __init__(self, total: int, metrics=None):
        self.total, self.reserved, self.metrics = total, 0, metrics

    def try_reserve(self, n: int, held: int = 0) -> bool:
        """Reserve ``n`` more bytes for a request that holds ``held``; refused past the budget unless the
        request would be alone (a body larger than the whole budget is admitted only on its own)."""
        if n <= 0:
            return True
        if self.reserved + n > self.total and self.reserved != held:
            return False
        self._set(self.reserved + n)
        return True

    def release(self, n: int) -> None:
        self._set(max(0, self.reserved - n))

    def _set(self, value: int) -> None:
        self.reserved = value
        if self.metrics is not None:
            self.metrics.body_bytes_in_flight.set(value)


@dataclass
class Refusal(Exception):
    status: int
    code: str
    message: str
    retry_after: int | None = RETRY_AFTER_S

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", str(self.retry_after).encode())] if self.retry_after is not None else []


class Ticket:
    """What one admitted request holds: maybe a chat slot, and its reserved body bytes."""

    def __init__(self, budget: BodyBudget, slot: ChatSlot | None, cap: int | None, tenant, hold=None):
        self.budget, self.slot, self.cap, self.tenant, self.hold = budget, slot, cap, tenant, hold
        self.reserved = 0
        if slot is not None and hold is not None:
            slot.also.append(hold.release)

    def reserve(self, total: int) -> bool:
        """Hold ``total`` body bytes (capped for uploads) in all; False (nothing more held) when refused."""
        want = min(total, self.cap) if self.cap is not None else total
        if want <= self.reserved:
            return True
        if not self.budget.try_reserve(want - self.reserved, held=self.reserved):
            return False
        self.reserved = want
        return True

    def release(self) -> None:
        if self.slot is not None:
            self.slot.release()
        if self.hold is not None:
            self.hold.release()
        self.budget.release(self.reserved)
        self.reserved = 0


class Admission:
    def __init__(self, services, budget_bytes: int):
        self.services = services
        self.budget = BodyBudget(budget_bytes, services.metrics)

    def tenant_of(self, scope):
        """The request's :class:`~server.tenants.Tenant` (authenticated by server/http_limits.py), or None."""
        return scope.get("state", {}).get("tenant")

    async def admit_tenant(self, scope, body: bool):
        """The tenant's own limits, before the global ones: one request counted against its window, and for a
        request with a body one of its concurrency slots (the hold, or None). Raises :class:`Refusal`."""
        tenant, limiter = self.tenant_of(scope), getattr(self.services, "limiter", None)
        if tenant is None or limiter is None:
            return None
        try:
            await limiter.hit(tenant)
            return await limiter.acquire(tenant) if body else None
        except LimitExceeded as e:
            ring = getattr(self.services, "tenants", None)
            label = ring.label(tenant.name) if ring is not None else "other"
            self.services.metrics.tenant_refused.labels(label, e.limit).inc()
            raise Refusal(e.status, e.code, e.message, e.retry_after) from None

    def admit(self, scope, length: int | None, hold=None) -> Ticket:
        """Admit a request before its body is read (``length``: its declared ``Content-Length``), or raise
        :class:`Refusal` (``hold``, the tenant's concurrency slot, is then released)."""
        try:
            return self._admit(scope, length, hold)
        except Refusal:
            if hold is not None:
                hold.release()
            raise

    def _admit(self, scope, length: int | None, hold) -> Ticket:
        tenant = self.tenant_of(scope)
        method, path = scope["method"], scope["path"]
        slot = None
        if method == "POST" and path == CHAT_PATH:
            try:
                slot = ChatSlot(self.services)
            except APIError as e:
                raise Refusal(e.status, e.code, e.message) from None
        cap = UPLOAD_IN_MEMORY if method == "POST" and path == "/v1/files" else None
        ticket = Ticket(self.budget, slot, cap, tenant, hold)
        if length and not ticket.reserve(length):
            ticket.release()
            raise self.over_budget()
        return ticket

    def over_budget(self) -> Refusal:
        return Refusal(503, "overloaded", f"request bodies in flight exceed the gateway's budget of "
                                          f"{self.budget.total} bytes; retry later")


class _BodyRefused(Exception):
    """Raised from ``receive`` when a streaming body runs over the budget or stalls."""


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class AdmissionMiddleware:
    """Runs inside the body-limit/auth middleware (a refused or unauthenticated body is never admitted) and
    outside the application (nothing has read the body yet)."""

    def __init__(self, app, admission: Admission, body_idle_timeout_s: float | None = 30.0):
        self.app, self.admission, self.idle_s = app, admission, body_idle_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics = self.admission.services.metrics
        body = scope["method"] in _BODY_METHODS
        length = _content_length(scope)
        ticket = None
        try:
            hold = await self.admission.admit_tenant(scope, body)
            if body:
                ticket = self.admission.admit(scope, length, hold)
        except Refusal as r:
            metrics.admission_refused.labels(r.code).inc()
            log.info("request refused before reading its body: %s", r.message,
                     extra={"status": r.status, "code": r.code, "content_length": length})
            return await send_error(send, r.status, r.code, r.message, r.headers(), close=body)
        if ticket is None:  # no body expected (at most max_body_kb: server/http_limits.py)
            return await self.app(scope, receive, send)
        if ticket.slot is not None:
            scope.setdefault("state", {})["chat_slot"] = ticket.slot
        received = 0
        body_done = not length and length is not None  # Content-Length: 0
        refused: Refusal | None = None
        started = False

        async def admitted_receive():
            nonlocal received, body_done, refused
            if refused is not None:
                raise _BodyRefused()
            if body_done or not self.idle_s:
                message = await receive()
            else:
                try:
                    async with asyncio.timeout(self.idle_s):
                        message = await receive()
                except TimeoutError:
                    refused = Refusal(408, "request_timeout", f"no request body bytes for {self.idle_s:g} s",
                                      retry_after=None)
                    raise _BodyRefused() from None
            if message["type"] == "http.request":
                chunk = len(message.get("body", b""))
                received += chunk
                if not message.get("more_body", False):
                    body_done = True
                if not ticket.reserve(received):
                    refused = self.admission.over_budget()
                    raise _BodyRefused()  # this chunk never reaches the application
                metrics.body_bytes_received.inc(chunk)
            elif message["type"] == "http.disconnect":
                body_done = True
            return message

        async def guarded_send(message):
            nonlocal started
            if refused is not None and not started:
                return  # the application's answer to the cut-off body is replaced by the refusal
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, admitted_receive, guarded_send)
        except Exception:
            if refused is None or started:
                raise
        finally:
            ticket.release()
        if refused is not None and not started:
            metrics.admission_refused.labels(refused.code).inc()
            log.info("request body refused while streaming: %s", refused.message,
                     extra={"status": refused.status, "code": refused.code, "received": received})
            await send_error(send, refused.status, refused.code, refused.message, refused.headers())
