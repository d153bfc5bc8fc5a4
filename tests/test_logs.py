"""Log formatting and request ids (the served path is covered in test_gateway)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from framewise.server import logs


@pytest.fixture
def stream():
    saved = {n: (lg.handlers[:], lg.level, lg.propagate) for n in ("framewise", "uvicorn", "uvicorn.error")
             for lg in [logging.getLogger(n)]}
    yield io.StringIO()
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


def test_json_lines_carry_ids_and_extra_fields(stream):
    logs.configure_logging("info", "json", stream)
    log = logging.getLogger("framewise.test")
    token = logs.request_id.set("req-1")
    try:
        log.info("refused %s", "x", extra={"code": "invalid_video", "status": 400})
        log.debug("not shown at info")
    finally:
        logs.request_id.reset(token)
    log.warning("outside a request")
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first["msg"] == "refused x" and first["request_id"] == "req-1" and first["level"] == "info"
    assert (first["code"], first["status"], first["logger"]) == ("invalid_video", 400, "framewise.test")
    assert "request_id" not in second and second["level"] == "warning"


def test_text_format(stream):
    logs.configure_logging("info", "text", stream)
    token = logs.job_id.set("job-9")
    try:
        logging.getLogger("framewise.jobs").info("job started", extra={"attempt": 2})
    finally:
        logs.job_id.reset(token)
    assert stream.getvalue().rstrip().endswith("INFO framewise.jobs: job started job_id=job-9 attempt=2")


@pytest.mark.parametrize("header, kept", [("trace-1.2:3_x", True), ("a" * 128, True), ("a" * 129, False),
                                          ("has space", False), ("new\nline", False), ("", False), (None, False)])
def test_client_request_ids_are_kept_only_when_safe(header, kept):
    rid = logs.new_request_id(header)
    assert (rid == header) == kept
    if not kept:
        assert rid.startswith("req-") and len(rid) == 36
