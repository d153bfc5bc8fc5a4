"""Request-body limits enforced while the body streams in (a pure ASGI middleware).

FastAPI reads a JSON body whole and Starlette spools a multipart part whole before a route
runs, so a limit checked in the route comes too late: the bytes are already in memory or on
disk. This middleware answers 413 before reading when ``Content-Length`` is over the limit,
and otherwise counts the bytes as the application receives them, cutting the body off (and
answering 413) the moment the count passes the limit, whether or not a ``Content-Length``
was sent or honest. The application never receives more than the limit.

It also authenticates ``/v1/*`` requests (the tenant of the key, server/tenants.py) before anything reads
a body: a request with a body and no valid key is answered 401 unread; an authenticated request carries its
tenant in ``scope["state"]["tenant"]`` (for admission, the routes and the log context). A request without a
body and without a valid key goes on to its route, which answers 401 (or 404 for no route).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from framewise.server import logs
from framewise.server.deps import UNAUTHORIZED, bearer_token
from framewise.server.errors import error_body
from framewise.server.tenants import KeyRing

log = logging.getLogger("framewise.limits")
MB = 1 << 20
MULTIPART_SLACK = 64 * 1024  # boundaries, part headers and the small form fields around the file
JSON_SLACK = 1 * MB  # the rest of a chat request around one base64 data: URL
_BODY_METHODS = ("POST", "PUT", "PATCH")


class BodyTooLarge(Exception):
    """Raised from ``receive`` once the body passes its route's limit."""


@dataclass(frozen=True)
class BodyLimits:
    upload: int  # POST /v1/files: the multipart body
    json: int  # POST /v1/chat/completions, POST /v1/jobs
    other: int  # every other request

    @classmethod
    def from_settings(cls, s) -> BodyLimits:
        """Upload: the file limit plus the multipart envelope. JSON: one ``max_video_mb`` video as a base64
        ``data:`` URL (4/3 of its size) plus slack, unless ``max_json_body_mb`` sets it."""
        json_limit = (int(s.max_json_body_mb * MB) if s.max_json_body_mb is not None
                      else int(max(s.max_video_mb, s.max_image_mb) * MB * 4 / 3) + JSON_SLACK)
        return cls(upload=int(s.max_upload_mb * MB) + MULTIPART_SLACK, json=json_limit,
                   other=int(s.max_body_kb * 1024))

    def for_request(self, method: str, path: str) -> tuple[int, str]:
        """(limit in bytes, error code) for one request."""
        path = path.rstrip("/")
        if method == "POST" and path == "/v1/files":
            return self.upload, "file_too_large"
        if method == "POST" and path in ("/v1/chat/completions", "/v1/jobs"):
            return self.json, "request_too_large"
        return self.other, "request_too_large"


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server itself refuses a malformed length
    return None


async def _refuse(send, limit: int, code: str) -> None:
    body = json.dumps(error_body(413, code, f"the request body exceeds the limit of {limit} bytes")).encode()
    # `Connection: close`: the server stops reading the rest of the body instead of draining it
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


async def _unauthorized(send) -> None:
    body = json.dumps(error_body(401, "invalid_api_key", UNAUTHORIZED))
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", b"Bearer"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body.encode()})


class BodyLimitMiddleware:
    """``tenants`` (or ``api_keys``, a plain list): a request with a body to an authenticated route (``/v1/...``)
    is refused (401) before its body is read: FastAPI reads a body before it runs the route's auth dependency."""

    def __init__(self, app, limits: BodyLimits, api_keys: list[str] | None = None, tenants: KeyRing | None = None):
        self.app, self.limits = app, limits
        if tenants is None:
            from types import SimpleNamespace

            tenants = KeyRing(SimpleNamespace(api_keys=api_keys or []))
        self.tenants = tenants

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not scope["path"].startswith("/v1/"):
            return await self._limited(scope, receive, send)
        tenant = self.tenants.authenticate(bearer_token(scope))
        if tenant is None:
            if scope["method"] in _BODY_METHODS:
                return await _unauthorized(send)
            return await self._limited(scope, receive, send)
        scope.setdefault("state", {})["tenant"] = tenant
        token = logs.tenant.set(tenant.name)
        try:
            return await self._limited(scope, receive, send)
        finally:
            logs.tenant.reset(token)

    async def _limited(self, scope, receive, send):
        limit, code = self.limits.for_request(scope["method"], scope["path"])
        length = _content_length(scope)
        if length is not None and length > limit:
            log.info("request body refused before reading", extra={"code": code, "status": 413,
                                                                   "content_length": length, "limit": limit})
            return await _refuse(send, limit, code)

        received = 0
        exceeded = started = False

        async def counted_receive():
            nonlocal received, exceeded
            if exceeded:
                raise BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True  # this chunk is never handed to the application
                    raise BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if exceeded and not started:
                return  # the application's answer to the cut-off body is replaced by the 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not exceeded or started:
                raise
        if exceeded and not started:
            log.info("request body refused while streaming", extra={"code": code, "status": 413, "limit": limit})
            await _refuse(send, limit, code)
