"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with stable codes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from framewise.server.error_codes import CODES
from framewise.server.jobs.base import JobQuotaExceeded, QueueUnavailable
from framewise.server.video.errors import MediaError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          408: "timeout_error", 413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          431: "invalid_request_error", 503: "service_unavailable_error", 504: "timeout_error"}
# a tenant over one of its limits (server/quotas.py): OpenAI's types for a rate limit and an exhausted quota
_CODE_TYPES = {"rate_limit_exceeded": "rate_limit_exceeded", "concurrency_limit_exceeded": "rate_limit_exceeded",
               "job_quota_exceeded": "insufficient_quota", "storage_quota_exceeded": "insufficient_quota"}


log = logging.getLogger("framewise.errors")


class APIError(Exception):
    """An OpenAI error object. ``extra``: more members of the error object (a queued completion's
    ``job_id``); ``headers``: response headers (``Retry-After``, ``Location``). ``transient``: a failure
    another try may get past (a media fetch timing out, an origin answering 5xx): a job retries it."""

    transient = False

    def __init__(self, status: int, code: str, message: str, param: str | None = None, *,
                 extra: dict | None = None, headers: dict[str, str] | None = None):
        if code not in CODES:  # server/error_codes.py is the catalogue clients and docs/api.md rely on
            log.error("error code %r is not in server/error_codes.py", code)
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.extra, self.headers = extra, headers

    def body(self) -> dict:
        return error_body(self.status, self.code, self.message, self.param, self.extra)

    @classmethod
    def from_media(cls, e: MediaError, param: str | None = "messages") -> APIError:
        return cls(e.status, e.code, e.message, param)


def error_body(status: int, code: str, message: str, param: str | None = None, extra: dict | None = None) -> dict:
    kind = _CODE_TYPES.get(code) or _TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code, **(extra or {})}}


def error_response(status: int, code: str, message: str, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, param), status_code=status, headers=headers)


def validation_param(loc, body) -> str | None:
    """The request field a validation error is about, as a client writes it:
    ``messages[0].content[0].video_url.fps``. Pydantic's location also names union branches (``str``,
    ``parts``, a part's ``type``): in a JSON body an element is kept when it is a key or an index of the
    request at that point, or the last element under an object (a missing field); the others are branch
    names. Elsewhere (query, path, header, cookie) the name alone."""
    loc = list(loc)
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):  # where it was: the name says enough
        where, loc = loc[0], loc[1:]
    else:
        where = None
    if not loc:
        return None
    if where != "body" or not isinstance(body, dict):
        return ".".join(str(p) for p in loc)
    out, cur = [], body
    for i, p in enumerate(loc, start=1):
        if isinstance(cur, dict) and isinstance(p, str) and p in cur:
            out.append(f".{p}")
            cur = cur[p]
        elif isinstance(cur, list) and isinstance(p, int) and 0 <= p < len(cur):
            out.append(f"[{p}]")
            cur = cur[p]
        elif i == len(loc) and isinstance(cur, dict):
            out.append(f".{p}")
    return "".join(out).lstrip(".") or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        log.info("request refused: %s", exc.message, extra={"code": exc.code, "status": exc.status})
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        headers.update(exc.headers or {})
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers or None)

    @app.exception_handler(QueueUnavailable)
    async def _queue_unavailable(request: Request, exc: QueueUnavailable):
        log.warning("job queue unavailable: %s", exc, extra={"code": "queue_unavailable", "status": 503})
        return error_response(503, "queue_unavailable", "the job queue is unavailable; retry later",
                              headers={"Retry-After": str(QueueUnavailable.RETRY_AFTER_S)})

    @app.exception_handler(JobQuotaExceeded)
    async def _job_quota(request: Request, exc: JobQuotaExceeded):
        log.info("job quota: %s", exc, extra={"code": "job_quota_exceeded", "status": 429})
        services = getattr(request.app.state, "services", None)
        ring = getattr(services, "tenants", None)
        if ring is not None:
            services.metrics.tenant_refused.labels(ring.label(exc.owner), "jobs").inc()
        return error_response(429, "job_quota_exceeded", f"{exc}; retry when one has finished",
                              headers={"Retry-After": str(JobQuotaExceeded.RETRY_AFTER_S)})

    @app.exception_handler(MediaError)
    async def _media_error(request: Request, exc: MediaError):
        log.info("media refused: %s", exc.message, extra={"code": exc.code, "status": exc.status})
        return error_response(exc.status, exc.code, exc.message, "messages")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = validation_param(first.get("loc", ()), getattr(exc, "body", None))
        message = f"{param + ': ' if param else ''}{first.get('msg', 'invalid request')}"
        return error_response(422, "invalid_parameter", message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # runs outside the request-id middleware: the id is read back from the request state
        rid = getattr(request.state, "request_id", None)
        log.error("unhandled error", exc_info=exc, extra={"request_id": rid, "code": "internal_error",
                                                           "status": 500})
        return error_response(500, "internal_error", f"internal error: {type(exc).__name__}",
                              headers={"X-Request-ID": rid} if rid else None)
