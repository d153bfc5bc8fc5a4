"""``POST /v1/chat/completions`` (streaming and not)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from vllm.exceptions import VLLMClientError

from server.completions import (
    CompletionIds,
    LongVideo,
    chunk,
    completion_body,
    delta_choice,
    logprobs_of,
    prepare,
    sampling_params,
    usage_of,
)
from server.deps import get_services, require_api_key
from server.errors import APIError, error_body
from server.schemas import ChatCompletionRequest

log = logging.getLogger("framewise.chat")
router = APIRouter(prefix="/v1/chat", tags=["chat"], dependencies=[Depends(require_api_key)])


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


def _engine_error(e: Exception) -> APIError:
    msg = str(e)
    lowered = msg.lower()
    if "maximum model length" in lowered or "maximum context length" in lowered or "max_model_len" in lowered:
        return APIError(400, "context_length_exceeded", msg, "messages")
    return APIError(400, "invalid_request", msg, "messages")


@router.post("/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request, services=Depends(get_services)):
    if body.model != services.settings.model_name:
        raise APIError(404, "model_not_found", f"the model {body.model!r} does not exist", "model")
    slot = _Slot(services)
    try:
        prepared = await prepare(services, body, route_long=True)
        params = sampling_params(body, body.stream)
    except LongVideo:
        slot.release()  # the job queue does the work; this connection only waits
        return await _via_queue(services, body, request)
    except BaseException:
        slot.release()
        raise
    ids = CompletionIds(body.model)
    request_id = f"{ids.id}-{uuid.uuid4().hex[:8]}"
    top_k = body.top_logprobs or 0
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(services, slot, prepared, params, request_id, ids, include_usage, top_k),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    started = time.perf_counter()
    try:
        final = await _run_until_done(services, request, prepared, params, request_id)
    except APIError as e:
        _log_completion(ids, request_id, prepared, started, e.code)
        raise
    finally:
        slot.release()
    _log_completion(ids, request_id, prepared, started, "ok", len(final.prompt_token_ids),
                    sum(len(c.token_ids) for c in final.outputs), [c.finish_reason for c in final.outputs])
    return JSONResponse(completion_body(ids, final, prepared, top_k))


def _log_completion(ids: CompletionIds, engine_request_id: str, prepared, started: float, outcome: str,
                    prompt_tokens: int | None = None, completion_tokens: int | None = None,
                    finish_reasons: list | None = None, stream: bool = False) -> None:
    """One line per chat completion: what was asked of the engine and what came back."""
    videos = [m for m in prepared.media if m["type"] == "video"]
    log.info("chat completion %s", outcome, extra={
        "completion_id": ids.id, "engine_request_id": engine_request_id, "model": ids.model, "stream": stream,
        "outcome": outcome, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "finish_reasons": finish_reasons, "videos": len(videos), "frames": prepared.video_frames,
        "fetch_ms": sum(m["fetch_ms"] for m in prepared.media), "decode_ms": sum(m.get("decode_ms", 0) for m in videos),
        "ms": round((time.perf_counter() - started) * 1000, 1)})


async def _client_gone(request: Request) -> None:
    """Returns when the ASGI server reports the client disconnected."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _run_until_done(services, request: Request, prepared, params, request_id: str):
    """Generate to the end; abort the engine request if the client goes away."""
    start = time.perf_counter()
    final = None

    async def consume():
        nonlocal final
        first = True
        async for out in services.engine.generate(prepared.prompt, params, request_id):
            if first:
                services.metrics.ttft.observe(time.perf_counter() - start)
                first = False
            final = out

    task = asyncio.create_task(consume())
    watcher = asyncio.create_task(_client_gone(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():  # the client went away first: free the engine request
            task.cancel()
            await services.engine.abort(request_id)
            raise APIError(499, "client_disconnected", "the client closed the connection")
        task.result()
    except (ValueError, VLLMClientError) as e:  # rejected by vLLM's input processing (prompt too long, bad media)
        raise _engine_error(e) from None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    services.metrics.prompt_tokens.inc(len(final.prompt_token_ids))
    services.metrics.completion_tokens.inc(sum(len(c.token_ids) for c in final.outputs))
    return final


async def _stream(services, slot: _Slot, prepared, params, request_id, ids, include_usage: bool, top_k: int):
    start = time.perf_counter()
    finished = False
    outcome = "client_disconnected"
    prompt_tokens = completion_tokens = 0
    started: set[int] = set()
    reasons: dict[int, str] = {}
    try:
        try:
            async for out in services.engine.generate(prepared.prompt, params, request_id):
                if not started:
                    services.metrics.ttft.observe(time.perf_counter() - start)
                prompt_tokens = len(out.prompt_token_ids)
                for c in out.outputs:
                    if c.index not in started:
                        started.add(c.index)
                        yield chunk(ids, [delta_choice(c.index, {"role": "assistant", "content": ""})],
                                    extra={"framewise": {"media": prepared.media}} if c.index == 0 else None)
                    completion_tokens += len(c.token_ids)
                    if c.text or c.token_ids:
                        yield chunk(ids, [delta_choice(c.index, {"content": c.text},
                                                       logprobs=logprobs_of(c.token_ids, c.logprobs, top_k))])
                    if c.finish_reason is not None:
                        reasons[c.index] = c.finish_reason
                        reason = "stop" if c.finish_reason == "abort" else c.finish_reason
                        yield chunk(ids, [delta_choice(c.index, {}, finish_reason=reason)])
        except (ValueError, VLLMClientError) as e:
            err = _engine_error(e)
            yield f"data: {json.dumps(error_body(err.status, err.code, err.message, err.param))}\n\n"
            finished, outcome = True, err.code
            return
        if include_usage:
            yield chunk(ids, [], usage=usage_of(prompt_tokens, completion_tokens, prepared))
        yield "data: [DONE]\n\n"
        finished, outcome = True, "ok"
        services.metrics.prompt_tokens.inc(prompt_tokens)
        services.metrics.completion_tokens.inc(completion_tokens)
    finally:
        slot.release()
        _log_completion(ids, request_id, prepared, start, outcome, prompt_tokens, completion_tokens,
                        [reasons.get(i) for i in sorted(started)], stream=True)
        if not finished:  # client went away mid-stream: free the engine request
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().create_task(services.engine.abort(request_id))


# ---- long videos: run the request as a job, answer as a normal completion -------------------


async def _via_queue(services, body: ChatCompletionRequest, request: Request):
    job, _ = await services.jobs.submit(body.model_dump(exclude_none=True))
    log.info("long video: chat completion runs as a job", extra={"job_id": job.id, "stream": bool(body.stream)})
    keepalive = services.settings.queue_keepalive_s

    async def wait_final():
        async for _, event in services.jobs.events(job.id):
            if event.get("stage") in ("done", "failed", "cancelled"):
                break
        return await services.jobs.get(job.id)

    if not body.stream:
        waiter = asyncio.create_task(wait_final())
        watcher = asyncio.create_task(_client_gone(request))
        try:
            await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():  # the client left: cancel the job (its worker aborts the engine request)
                await services.jobs.cancel(job.id)
                raise APIError(499, "client_disconnected", "the client closed the connection")
            final = waiter.result()
        finally:
            watcher.cancel()
            waiter.cancel()
        return _job_response(final)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        waiter = asyncio.create_task(wait_final())
        try:
            while not waiter.done():
                done, _ = await asyncio.wait({waiter}, timeout=keepalive)
                if not done:
                    yield f": queued as {job.id}, status {(await services.jobs.get(job.id)).status}\n\n"
            final = waiter.result()
        except BaseException:
            waiter.cancel()
            with contextlib.suppress(Exception):
                await services.jobs.cancel(job.id)
            raise
        if final.status != "succeeded":
            err = final.error or {"code": "cancelled", "status": 499, "message": "the job was cancelled"}
            yield f"data: {json.dumps(error_body(err.get('status', 500), err['code'], err['message']))}\n\n"
            return
        result = final.result
        ids = CompletionIds(result["model"])
        ids.id, ids.created = result["id"], result["created"]
        for c in result["choices"]:
            yield chunk(ids, [delta_choice(c["index"], {"role": "assistant", "content": ""})],
                        extra={"framewise": {**result["framewise"], "job_id": job.id}} if c["index"] == 0 else None)
            yield chunk(ids, [delta_choice(c["index"], {"content": c["message"]["content"]})])
            yield chunk(ids, [delta_choice(c["index"], {}, finish_reason=c["finish_reason"])])
        if include_usage:
            yield chunk(ids, [], usage=result["usage"])
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _job_response(job) -> JSONResponse:
    if job.status == "succeeded":
        result = dict(job.result)
        result["framewise"] = {**result.get("framewise", {}), "job_id": job.id}
        return JSONResponse(result)
    err = job.error or {"code": "cancelled", "status": 499, "message": "the job was cancelled"}
    return JSONResponse(error_body(err.get("status", 500), err["code"], err["message"], "messages"),
                        status_code=err.get("status", 500))
