"""Property-based API testing: schemathesis against the gateway's own OpenAPI document.

The session's ``framewise serve`` (tests/stack.py, demo model) answers requests generated from ``/openapi.json`` for every
operation, valid and invalid ones (positive and negative generation modes), with a fixed seed and a
bounded number of examples. Every response must be non-5xx, have a documented status code and
content type, and match the documented schema. Generated requests are only bounded where they would
otherwise be slow: the model name is the served one (so requests reach the engine) and token counts
are capped.
"""

from __future__ import annotations

import collections
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.stack import MODEL

pytestmark = pytest.mark.engine

EXAMPLES = int(os.environ.get("FW_SCHEMATHESIS_EXAMPLES", 80))  # per operation and mode (positive, negative)
MIN_REQUESTS = 1000 if EXAMPLES >= 80 else 0  # a smaller run (while debugging) checks conformance only
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]


def _bounded(case) -> None:
    """Requests that would run the engine: the served model, at most 2 tokens per choice, at most 2 choices (a
    `max_tokens: null` would otherwise generate up to the context length: tens of seconds per request)."""
    body = case.body
    if not isinstance(body, dict) or case.operation.method.upper() != "POST":
        return
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    for key in ("max_tokens", "max_completion_tokens"):
        if key in body and (body[key] is None or (isinstance(body[key], int) and not isinstance(body[key], bool)
                                                  and body[key] > 2)):
            body[key] = 2
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 2
    if isinstance(body.get("n"), int) and not isinstance(body["n"], bool) and body["n"] > 2:
        body["n"] = 2
    if isinstance(body.get("min_tokens"), int) and not isinstance(body["min_tokens"], bool) and body["min_tokens"] > 1:
        body["min_tokens"] = 1


def _modes(op) -> list[GenerationMode]:
    """Invalid requests too, where there is something to make invalid (a body or query parameters; a path
    parameter or header of ours accepts any string)."""
    if len(op.body) or len(op.query):
        return [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    return [GenerationMode.POSITIVE]


def _run_operation(op, mode: GenerationMode, gateway, sent: collections.Counter) -> str | None:
    """Up to EXAMPLES generated requests for one operation; the first failing one, described, or None."""
    label = f"{op.method.upper()} {op.path}"

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate],  # no shrinking: a bounded run that reports the first failure
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        _bounded(case)
        response = case.call(headers=gateway.headers, timeout=120)
        sent[label] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except (AssertionError, BaseExceptionGroup) as e:  # schemathesis: Failure or FailureGroup
            raise AssertionError(f"{label} ({mode.value}): {e}\n{case.as_curl_command()}") from None

    try:
        run()
    except AssertionError as e:
        return str(e)
    except Unsatisfiable:  # negative mode, an operation whose inputs are all valid (none, or any string)
        assert mode == GenerationMode.NEGATIVE, label
    return None


def test_every_response_conforms_and_none_is_a_server_error(gateway):
    schema = schemathesis.openapi.from_url(f"{gateway.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    sent: collections.Counter = collections.Counter()
    failures = [f for op in operations for mode in _modes(op) if (f := _run_operation(op, mode, gateway, sent))]
    print(f"schemathesis: {sum(sent.values())} requests: {dict(sent)}")
    assert not failures, "\n\n".join(failures)
    assert set(sent) == {f"{op.method.upper()} {op.path}" for op in operations}  # every route was exercised
    assert sum(sent.values()) >= MIN_REQUESTS, sent
