"""Response shapes for the OpenAPI document (``responses=`` on the routes; the routes return plain dicts).

They document what the gateway sends, and the schemathesis test (tests/test_schemathesis.py) checks
every response against them, so a route that drifts from its documented shape fails that test.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from framewise.server.jobs.base import STATUSES


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI-style error body (server/errors.py)."""

    error: ErrorDetail


# every route: its 4xx answers (422 included, which replaces FastAPI's own validation-error schema) and 5xx
ERROR_RESPONSES: dict = {"4XX": {"model": ErrorResponse, "description": "refused (OpenAI-style error)"},
                         "5XX": {"model": ErrorResponse, "description": "failed (OpenAI-style error)"}}


# one server-sent event (before OpenAPI 3.2, the `schema` of an event stream describes each event)
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                            "retry": {"type": "integer"}}}


def sse(description: str) -> dict:
    """A ``text/event-stream`` body."""
    return {"description": description, "content": {"text/event-stream": {"schema": SSE_EVENT}}}


def plain_text(description: str) -> dict:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


JobStatus = Literal[STATUSES]  # type: ignore[valid-type]


class JobObject(BaseModel):
    id: str
    object: Literal["job"]
    model: str | None
    status: JobStatus
    created_at: float
    started_at: float | None
    finished_at: float | None
    progress: dict
    result: dict | None
    error: dict | None
    attempts: int
    idempotency_key: str | None


class JobList(BaseModel):
    object: Literal["list"]
    data: list[JobObject]
    has_more: bool
    next_before: float | None


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    model: str


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: dict | None
    finish_reason: str | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    video_frames: int = 0


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    framewise: dict


CHAT_RESPONSES: dict = {200: {"model": ChatCompletion, "description": "a completion (`stream: false`) or, "
                              "with `stream: true`, server-sent `chat.completion.chunk` events",
                              "content": {"text/event-stream": {"schema": SSE_EVENT}}}}
