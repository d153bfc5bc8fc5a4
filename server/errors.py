"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with stable codes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.video.decode import MediaError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable_error", 504: "timeout_error"}


log = logging.getLogger("framewise.errors")


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param

    @classmethod
    def from_media(cls, e: MediaError, param: str | None = "messages") -> APIError:
        return cls(e.status, e.code, e.message, param)


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(status: int, code: str, message: str, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, param), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        log.info("request refused: %s", exc.message, extra={"code": exc.code, "status": exc.status})
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.code, exc.message, exc.param, headers)

    @app.exception_handler(MediaError)
    async def _media_error(request: Request, exc: MediaError):
        log.info("media refused: %s", exc.message, extra={"code": exc.code, "status": exc.status})
        return error_response(exc.status, exc.code, exc.message, "messages")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        message = f"{'.'.join(loc) + ': ' if loc else ''}{first.get('msg', 'invalid request')}"
        return error_response(422, "invalid_parameter", message, ".".join(loc) or None)

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
