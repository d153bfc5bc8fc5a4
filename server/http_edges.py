"""HTTP edges: the request head (size, header count, ``Host``), slow and idle connections, trailing slashes.

What uvicorn (0.55, its ``httptools`` protocol, the one it picks when httptools is installed) does
and does not do, and what is added here:

- **head size**: httptools (llhttp) has no limit; an 8 MB header was accepted and a few 64 MB
  headers added ~250 MB RSS. :class:`GuardedHttpToolsProtocol` counts the bytes of a request head
  as they arrive and answers ``431`` (then closes) past ``max_header_kb``; the head held in memory
  stays under the limit plus one socket read (256 KiB). Under h11 (no httptools) uvicorn's
  ``h11_max_incomplete_event_size`` bounds it instead (h11 answers 400).
- **slow heads** (slowloris): uvicorn times out only an idle keep-alive connection between requests
  (``timeout_keep_alive``), and cancels that timer at the first byte; a connection that opens and
  sends nothing, or sends its head a byte at a time, was held for ever. The protocol closes a
  connection whose head is not complete ``header_timeout_s`` after the connection opened or the
  head's first byte arrived (``408`` if part of a head came).
- **header count and Host**: :class:`EdgeMiddleware` (pure ASGI): more than ``max_headers`` header
  lines -> ``431``; an HTTP/1.1 request without exactly one ``Host`` header (or any request with
  several) -> ``400`` (RFC 9112 3.2). Neither llhttp nor uvicorn checks either.
- **trailing slashes**: Starlette's automatic redirect built an absolute ``Location`` from the
  ``Host`` header (``Host: evil.example`` -> a 307 to evil.example). The app is created with
  ``redirect_slashes=False`` and :class:`EdgeMiddleware` routes ``/v1/jobs/`` as ``/v1/jobs`` (no
  route of this app ends in a slash), so a client that used a trailing slash is served directly.

A body that stalls is the admission middleware's (server/admission.py): it holds a slot and budget.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from framewise.server.errors import error_body

log = logging.getLogger("framewise.http")
KB = 1024


@dataclass(frozen=True)
class HeadLimits:
    max_bytes: int = 64 * KB  # request line + header lines
    timeout_s: float = 15.0  # from the connection opening, or the head's first byte, to its end

    @classmethod
    def from_settings(cls, s) -> HeadLimits:
        return cls(max_bytes=int(s.max_header_kb * KB), timeout_s=s.header_timeout_s)


def json_response(status: int, code: str, message: str, extra_headers=(), close: bool = True) -> tuple[list, bytes]:
    """(ASGI headers, body) of an OpenAI-style error that closes the connection (the rest of the
    request is never read; ``close=False``: a request without a body keeps its connection)."""
    body = json.dumps(error_body(status, code, message)).encode()
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            *([(b"connection", b"close")] if close else []), *extra_headers], body


async def send_error(send, status: int, code: str, message: str, extra_headers=(), close: bool = True) -> None:
    headers, body = json_response(status, code, message, extra_headers, close)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class EdgeMiddleware:
    """Header count, ``Host``, trailing slashes; before any other middleware reads the request."""

    def __init__(self, app, max_headers: int = 100):
        self.app, self.max_headers = app, max_headers

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers", ())
        if len(headers) > self.max_headers:
            log.info("request refused: too many headers", extra={"status": 431, "headers": len(headers)})
            return await send_error(send, 431, "request_header_fields_too_large",
                                    f"the request has {len(headers)} header fields; at most {self.max_headers} "
                                    "are accepted")
        hosts = sum(1 for name, _ in headers if name == b"host")
        if hosts > 1 or (hosts == 0 and scope.get("http_version") == "1.1"):
            log.info("request refused: Host header count", extra={"status": 400, "hosts": hosts})
            return await send_error(send, 400, "invalid_host_header",
                                    "an HTTP/1.1 request needs exactly one Host header (RFC 9112 section 3.2); "
                                    f"this one has {hosts}")
        path = scope.get("path", "")
        if len(path) > 1 and path.endswith("/"):
            scope = dict(scope, path=path.rstrip("/") or "/")
            if scope.get("raw_path"):
                scope["raw_path"] = scope["raw_path"].rstrip(b"/") or b"/"
        return await self.app(scope, receive, send)


def http_protocol(limits: HeadLimits):
    """The uvicorn ``http`` protocol class enforcing ``limits``; None when httptools is missing (then
    :func:`uvicorn_options` falls back to h11 and its head-size limit)."""
    try:
        import httptools
        from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools comes with uvicorn[standard] (fastapi[standard], vLLM)
        return None

    class _HeadRefused(Exception):
        def __init__(self, status: int, code: str, message: str):
            super().__init__(message)
            self.status, self.code, self.message = status, code, message

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with a bounded request head: its bytes (431) and the time it takes
        to arrive (408, or a silent close for a connection that never sent a byte)."""

        head_limits = limits

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._awaiting_head = True  # from the connection's start or a message's end to the next head's end
            self._head_begun = False  # a byte of that head has come
            self._head_bytes = 0  # bytes received since then (a lower bound: see data_received)
            self._completed = 0  # messages parsed to their end
            self._head_timer = None

        # timer: armed when a connection opens and when a head begins, cancelled when the head ends
        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.head_limits.timeout_s, self._head_timeout)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or not self._awaiting_head:
                return
            if self.cycle is not None and not self.cycle.response_complete:
                self._arm_head_timer()  # a pipelined head waits for the response before it: check again later
                return
            if not self._head_begun and self.cycle is not None:
                return  # idle between requests: uvicorn's keep-alive timeout closes it
            log.info("connection closed: request head not complete in time",
                     extra={"status": 408, "timeout_s": self.head_limits.timeout_s, "bytes": self._head_bytes})
            if self._head_begun:
                self._refuse(408, "request_timeout",
                             f"the request head did not arrive within {self.head_limits.timeout_s:g} s")
            else:
                self.transport.close()

        def _refuse(self, status: int, code: str, message: str) -> None:
            headers, body = json_response(status, code, message)
            out = [STATUS_LINE[status]]
            for name, value in [*self.server_state.default_headers, *headers]:
                out += [name, b": ", value, b"\r\n"]
            out += [b"\r\n", body]
            self._cancel_head_timer()
            self.transport.write(b"".join(out))
            self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            awaiting, completed = self._awaiting_head, self._completed
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:  # as uvicorn's own data_received (the warning's name varies across uvicorn versions)
                    getattr(self, "_unsupported_upgrade_warning", lambda: None)()
                return
            except httptools.HttpParserError as e:
                refused = e.__context__
                if isinstance(refused, _HeadRefused):
                    log.info("request refused: %s", refused.message, extra={"status": refused.status})
                    self._refuse(refused.status, refused.code, refused.message)
                else:
                    self.logger.warning("Invalid HTTP request received.")
                    self.send_400_response("Invalid HTTP request received.")
                return
            # Bytes of a head still incomplete: all of `data` when this head was already awaited before it
            # and no message ended within it; a head that began after a message ended within `data`
            # (pipelining) is counted from the next read on (the lower bound is off by one read at most).
            if self._awaiting_head and awaiting and completed == self._completed:
                self._head_bytes += len(data)
                if self._head_bytes > self.head_limits.max_bytes:
                    log.info("request refused: head too large", extra={"status": 431, "bytes": self._head_bytes})
                    self._refuse(431, "request_header_fields_too_large",
                                 f"the request head exceeds {self.head_limits.max_bytes} bytes")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._awaiting_head = self._head_begun = True
            self._arm_head_timer()

        def on_headers_complete(self) -> None:
            self._awaiting_head = self._head_begun = False
            self._head_bytes = 0
            self._cancel_head_timer()
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > self.head_limits.max_bytes:
                raise _HeadRefused(431, "request_header_fields_too_large",
                                   f"the request head exceeds {self.head_limits.max_bytes} bytes")
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._completed += 1
            self._awaiting_head, self._head_bytes = True, 0
            super().on_message_complete()

    return GuardedHttpToolsProtocol


def uvicorn_options(settings) -> dict:
    """``uvicorn.run`` keyword arguments for the HTTP edges (``framewise serve``; the tests' servers)."""
    limits = HeadLimits.from_settings(settings)
    protocol = http_protocol(limits)
    options = {"timeout_keep_alive": settings.keep_alive_timeout_s}
    if protocol is None:  # pragma: no cover
        log.warning("httptools is not installed: h11 bounds the request head, no head timeout")
        return {**options, "http": "h11", "h11_max_incomplete_event_size": limits.max_bytes}
    return {**options, "http": protocol}
