"""Structured logs: one JSON object per line, carrying the id of the request or job in scope.

The HTTP middleware takes the client's ``X-Request-ID`` when it is a sane token (else makes
one), puts it in :data:`request_id` for everything logged while the request is handled, and
returns it in the response's ``X-Request-ID`` header. Job workers set :data:`job_id`. :data:`tenant` is the
tenant of the API key that authenticated the request (server/tenants.py), or the owner of the job a worker
runs: its name, never the key.
Fields passed as ``extra={...}`` become top-level keys of the JSON object.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TextIO

request_id: ContextVar[str | None] = ContextVar("framewise_request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("framewise_job_id", default=None)
tenant: ContextVar[str | None] = ContextVar("framewise_tenant", default=None)

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# LogRecord's own attributes, plus what uvicorn and vLLM attach to every record
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", "color_message",
                                                    "vllm_process_name"}


def _ids() -> dict[str, str]:
    return {k: v for k, var in (("request_id", request_id), ("job_id", job_id), ("tenant", tenant))
            if (v := var.get()) is not None}


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def new_request_id(header: str | None) -> str:
    """The client's id when it is a short token of safe characters, else a fresh one."""
    if header and _CLIENT_ID.match(header):
        return header
    return f"req-{uuid.uuid4().hex}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_ids())
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {**_ids(), **_extras(record)}
        return " ".join([line, *(f"{k}={v}" for k, v in fields.items())])


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Route Framewise's and uvicorn's loggers to stderr (or ``stream``) in ``fmt`` (``json`` or ``text``).

    uvicorn's access log should be switched off (``access_log=False``): the gateway writes
    its own access line with the request id, route, status and duration.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("framewise", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
