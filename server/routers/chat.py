"""``POST /v1/chat/completions``: the HTTP adapter of the chat pipeline (:mod:`server.chat.pipeline`).

Here: validation, admission, the wrapping as JSON or server-sent events, and noticing a client
that leaves. The work, the timeout and the error classification are the pipeline's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.chat import pipeline
from server.deps import get_services, require_api_key
from server.errors import APIError
from server.openapi import CHAT_RESPONSES
from server.schemas import ChatCompletionRequest

router = APIRouter(prefix="/v1/chat", tags=["chat"], dependencies=[Depends(require_api_key)])
T = TypeVar("T")


class _Slot:
    """Admission control: a bounded number of chat requests in flight (429 beyond)."""

    def __init__(self, services):
        s = services
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


@router.post("/completions", responses=CHAT_RESPONSES)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, services=Depends(get_services)):
    pipeline.check_model(services, body)
    deadline = pipeline.deadline(services.settings)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    slot = _Slot(services)
    try:
        run = await pipeline.start(services, body, deadline=deadline, route_long=True)
    except pipeline.LongVideo:
        slot.release()  # the job queue does the work; this connection only waits
        job = await pipeline.queue(services, body)
        if body.stream:
            return _sse(pipeline.stream_queued(services, job, deadline, include_usage))
        return JSONResponse(await _unless_client_leaves(request, pipeline.queued_completion(services, job.id,
                                                                                            deadline)))
    except BaseException:
        slot.release()
        raise
    if body.stream:
        return _sse(pipeline.stream(run, include_usage, on_close=slot.release))
    try:
        return JSONResponse(await _unless_client_leaves(request, pipeline.collect(run)))
    finally:
        slot.release()


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _client_gone(request: Request) -> None:
    """Returns when the ASGI server reports the client disconnected."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result, unless the client disconnects first: then ``work`` is cancelled (the pipeline
    aborts the engine request, or cancels the job) and the answer is 499."""
    task = asyncio.create_task(work)
    watcher = asyncio.create_task(_client_gone(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
            raise APIError(499, "client_disconnected", "the client closed the connection")
        return task.result()
    finally:
        watcher.cancel()
        task.cancel()
