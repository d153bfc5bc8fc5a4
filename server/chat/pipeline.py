"""The chat pipeline: prepare media -> generate -> stream or collect -> OpenAI JSON.

The HTTP route (:mod:`framewise.server.routers.chat`) hands a request to :func:`respond`, which returns the whole
answer: a JSON completion, a server-sent-event stream, or -- when a video is long (the :class:`LongVideo`
decision :func:`prepare` returns) -- the completion of a job it queued. The job worker (:func:`run_chat_job`)
runs the same pipeline, so both give the same completion object (``n`` choices, logprobs, usage,
``framewise.media``) and the same error codes:

- ``request_timeout_s`` bounds a request from its arrival: media fetch, a decode waiting for a pool
  worker, decoding, generation. Past it: 504 ``timeout``, and the engine request is aborted.
- a client that disconnects while its media is fetched or decoded, or while it is generated, cancels
  that work (the fetch, the decode, the engine request).
- what the engine reports is classified, never passed off as a finished choice: ``finish_reason``
  "abort" (the engine aborted the request; the client and the timeout are handled before) -> 503
  ``request_aborted``; "error" or a failed generate -> 500 ``engine_error``; a dead engine core
  -> 503 ``engine_dead`` (and the process goes away: server/lifecycle.py); vLLM refusing the input -> 400.
- once a stream has begun, an error is one ``data: {"error": ...}`` event and the stream ends
  without ``[DONE]``.

**Queued completions** (a long video): the connection waits for the job, up to ``queued_wait_s`` from the
moment it is queued. A job is cancelled only by ``DELETE /v1/jobs/{id}`` or by its client leaving (the JSON
request's connection closes, the stream's client disconnects). Anything else ends the *wait*, never the
job, with an error object that names it -- ``"job_id"`` next to ``code``, a ``Location: /v1/jobs/{id}``
header and ``x-should-retry: false`` (the OpenAI SDKs do not resubmit: that would run the video again) --
so the client polls ``GET /v1/jobs/{id}`` for the result:

- ``503 gateway_shutdown``: this gateway is shutting down (SIGTERM, a rolling deploy) or its engine died;
- ``504 timeout``: ``queued_wait_s`` passed;
- ``503 queue_unavailable``: the job store stopped answering while the client waited.

A stream sends the same error object as its final ``data: {"error": ...}`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request
from starlette.responses import Response
from vllm.exceptions import VLLMClientError, VLLMServerError

from framewise.server.chat.media import LongVideo, MediaRun, Prepared, prepare
from framewise.server.chat.responses import (
    CompletionIds,
    chunk,
    delta_choice,
    error_event,
    logprobs_of,
    result_chunks,
    usage_of,
)
from framewise.server.deps import check_model, check_parameters, require_api_key
from framewise.server.errors import APIError
from framewise.server.jobs.base import Job, QueueUnavailable, is_final_event
from framewise.server.schemas import ChatCompletionRequest
from framewise.server.tenants import Tenant

__all__ = ["ChatRun", "EngineFailure", "LongVideo", "check_model", "collect", "deadline", "job_pending", "queue",
           "queued_completion", "respond", "run_chat_job", "start", "stream", "stream_queued"]

log = logging.getLogger("framewise.chat")
Report = Callable[[dict], Awaitable[None]]
T = TypeVar("T")
STAGED_KEY = "_framewise_staged"  # in a queued completion's job request: bytes the gateway staged (server/chat/media.py)

# failures on the server's side: logged as errors; a job that meets one is retried
ENGINE_FAILURES = ("engine_dead", "engine_error", "request_aborted")


class EngineFailure(RuntimeError):
    """An engine-side failure in a job, raised past the job worker's client-error branch (which would end
    the job ``failed``) so that the worker retries the job."""

    def __init__(self, e: APIError):
        super().__init__(f"{e.code}: {e.message}")
        self.code, self.status = e.code, e.status


def deadline(settings) -> float:
    """The event-loop time by which a request arriving now must be answered."""
    return asyncio.get_running_loop().time() + settings.request_timeout_s


def timeout_error(settings) -> APIError:
    return APIError(504, "timeout", f"the request took longer than request_timeout_s "
                                    f"({settings.request_timeout_s:g} s); its engine request was aborted")


def sampling_params(body: ChatCompletionRequest):
    """vLLM sampling parameters; outputs always come as deltas (streamed, or accumulated by :func:`collect`)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return SamplingParams(
        n=body.n,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        stop=stop,
        seed=body.seed,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        top_k=body.top_k if body.top_k is not None else 0,
        min_tokens=body.min_tokens or 0,
        repetition_penalty=body.repetition_penalty or 1.0,
        ignore_eos=body.ignore_eos,
        logit_bias={int(token): bias for token, bias in body.logit_bias.items()} if body.logit_bias else None,
        output_kind=RequestOutputKind.DELTA,
    )


def _refused_input(e: Exception) -> APIError:
    msg = str(e)
    lowered = msg.lower()
    if "maximum model length" in lowered or "maximum context length" in lowered or "max_model_len" in lowered:
        return APIError(400, "context_length_exceeded", msg, "messages")
    return APIError(400, "invalid_request", msg, getattr(e, "parameter", None) or "messages")  # vLLM names some


@dataclass
class Choice:
    """One choice, accumulated from the engine's deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    finish_reason: str | None = None


class ChatRun:
    """One chat completion on the engine: its outputs accumulated per choice, one log line at its end."""

    def __init__(self, services, body: ChatCompletionRequest, prepared: Prepared, *, deadline: float | None,
                 started: float, request_prefix: str | None = None, cancelled: str = "client_disconnected"):
        self.services, self.body, self.prepared, self.deadline, self.started = (
            services, body, prepared, deadline, started)
        self.ids = CompletionIds(body.model)
        self.request_id = f"{request_prefix or self.ids.id}-{uuid.uuid4().hex[:8]}"  # the engine's request id
        self.params = sampling_params(body)
        self.top_k = body.top_logprobs or 0
        self.cancelled = cancelled  # the outcome logged when the caller cancels (client gone, job cancelled)
        self.prompt_tokens = 0
        self.prompt_token_ids: list[int] = []
        self.choices: dict[int, Choice] = {}
        self._ended = False

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices.values())

    def usage(self) -> dict:
        return usage_of(self.prompt_tokens, self.completion_tokens, self.prepared.video_frames)

    def completion(self) -> dict:
        """The OpenAI ``chat.completion`` object of what was generated."""
        ids = self.body.return_token_ids
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs_of(c.token_ids, c.logprobs, self.top_k), "finish_reason": c.finish_reason,
                    **({"token_ids": list(c.token_ids)} if ids else {})}
                   for c in sorted(self.choices.values(), key=lambda c: c.index)]
        return {"id": self.ids.id, "object": "chat.completion", "created": self.ids.created, "model": self.ids.model,
                "choices": choices, "usage": self.usage(), "framewise": {"media": self.prepared.media},
                **({"prompt_token_ids": self.prompt_token_ids} if ids else {})}

    async def outputs(self) -> AsyncIterator:
        """The engine's outputs (deltas), accumulated into :attr:`choices`; past the deadline the engine
        request is aborted and 504 raised; engine errors raised as :class:`APIError` (module doc)."""
        gen = self.services.engine.generate(self.prepared.prompt, self.params, self.request_id)
        begun, first = time.perf_counter(), True
        try:
            while True:
                timer = asyncio.timeout_at(self.deadline)
                try:
                    async with timer:  # never across a yield: the consumer's time is not ours to cancel
                        out = await anext(gen)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if not timer.expired():
                        raise
                    await self._abort()  # vLLM aborts a cancelled generate itself; this makes sure
                    raise timeout_error(self.services.settings) from None
                if first:
                    self.services.metrics.ttft.observe(time.perf_counter() - begun)
                    first = False
                self._add(out)
                yield out
        except (ValueError, VLLMClientError) as e:  # refused by vLLM's input processing (prompt too long...)
            raise _refused_input(e) from None
        except VLLMServerError as e:
            from vllm.v1.engine.exceptions import EngineDeadError  # loaded with the engine: cheap here

            if isinstance(e, EngineDeadError):
                self.services.check_engine("EngineDeadError")  # at once, not at the watcher's next look
                raise APIError(503, "engine_dead", "the inference engine died during the request; retry later"
                               ) from None
            raise APIError(500, "engine_error", f"the inference engine failed: {type(e).__name__}") from None
        finally:
            with contextlib.suppress(Exception):
                await gen.aclose()  # left early (cancelled, closed): vLLM aborts the request

    def _add(self, out) -> None:
        self.prompt_tokens = len(out.prompt_token_ids)
        if self.body.return_token_ids and not self.prompt_token_ids:
            self.prompt_token_ids = list(out.prompt_token_ids)
        for c in out.outputs:
            if c.finish_reason == "abort":
                raise APIError(503, "request_aborted", "the engine aborted the request before it finished; retry")
            if c.finish_reason == "error":
                raise APIError(500, "engine_error", "the engine failed while generating the request")
            acc = self.choices.setdefault(c.index, Choice(c.index))
            acc.text += c.text
            acc.token_ids.extend(c.token_ids)
            if c.logprobs is not None:
                acc.logprobs = acc.logprobs or []
                acc.logprobs.extend(c.logprobs)
            acc.finish_reason = c.finish_reason or acc.finish_reason

    async def _abort(self) -> None:
        try:
            await self.services.engine.abort(self.request_id)
        except Exception as e:  # a dead engine cannot abort
            log.warning("could not abort engine request %s: %s", self.request_id, e)

    def end(self, outcome: str, stream: bool = False) -> None:
        """Once: count the tokens of a success, free the engine request otherwise, log one line."""
        if self._ended:
            return
        self._ended = True
        if outcome == "ok":
            self.services.metrics.prompt_tokens.inc(self.prompt_tokens)
            self.services.metrics.completion_tokens.inc(self.completion_tokens)
        elif outcome != "engine_dead":
            with contextlib.suppress(RuntimeError):  # no running loop: the process is exiting
                asyncio.get_running_loop().create_task(self._abort())
        media = self.prepared.media
        videos = [m for m in media if m["type"] == "video"]
        level = logging.ERROR if outcome in ENGINE_FAILURES or outcome == "internal_error" else logging.INFO
        log.log(level, "chat completion %s", outcome, extra={
            "completion_id": self.ids.id, "engine_request_id": self.request_id, "model": self.ids.model,
            "stream": stream, "outcome": outcome, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reasons": [c.finish_reason for _, c in sorted(self.choices.items())],
            "videos": len(videos), "frames": self.prepared.video_frames,
            "fetch_ms": sum(m["fetch_ms"] for m in media), "decode_ms": sum(m.get("decode_ms", 0) for m in videos),
            "ms": round((time.perf_counter() - self.started) * 1000, 1)})


async def start(services, body: ChatCompletionRequest, *, deadline: float | None = None,
                media: MediaRun | None = None, request_prefix: str | None = None,
                cancelled: str = "client_disconnected") -> ChatRun | LongVideo:
    """Prepare the media (within ``deadline``, 504 past it): a run ready to generate, or -- with
    ``media.route_long`` -- the decision that a video is long enough to run as a job (:func:`queue`)."""
    started = time.perf_counter()
    timer = asyncio.timeout_at(deadline)
    try:
        async with timer:
            prepared = await prepare(services, body, media)
    except TimeoutError:
        if not timer.expired():
            raise
        raise timeout_error(services.settings) from None
    if isinstance(prepared, LongVideo):
        return prepared
    return ChatRun(services, body, prepared, deadline=deadline, started=started, request_prefix=request_prefix,
                   cancelled=cancelled)


async def collect(run: ChatRun, progress: Report | None = None) -> dict:
    """Generate to the end: the completion object. ``progress`` gets ``generating`` events (a job's)."""
    outcome, last = run.cancelled, 0.0
    try:
        async for _ in run.outputs():
            if progress is not None and time.monotonic() - last > 0.5:
                last = time.monotonic()
                await progress({"stage": "generating", "tokens": run.completion_tokens})
        if progress is not None:
            await progress({"stage": "generating", "tokens": run.completion_tokens})
        outcome = "ok"
        return run.completion()
    except APIError as e:
        outcome = e.code
        raise
    except Exception:
        outcome = "internal_error"
        raise
    finally:
        run.end(outcome)


async def stream(run: ChatRun, include_usage: bool, on_close: Callable[[], None] | None = None
                 ) -> AsyncIterator[str]:
    """Server-sent ``chat.completion.chunk`` events; ``on_close`` runs when the stream ends, however."""
    ids, begun, outcome = run.ids, set(), run.cancelled
    try:
        async for out in run.outputs():
            for c in out.outputs:
                if c.index not in begun:
                    begun.add(c.index)
                    first = {"framewise": {"media": run.prepared.media}} if c.index == 0 else {}
                    if c.index == 0 and run.body.return_token_ids:
                        first["prompt_token_ids"] = run.prompt_token_ids
                    yield chunk(ids, [delta_choice(c.index, {"role": "assistant", "content": ""})], extra=first)
                if c.text or c.token_ids:
                    choice = delta_choice(c.index, {"content": c.text},
                                          logprobs=logprobs_of(c.token_ids, c.logprobs, run.top_k))
                    if run.body.return_token_ids:
                        choice["token_ids"] = list(c.token_ids)
                    yield chunk(ids, [choice])
                if c.finish_reason is not None:
                    yield chunk(ids, [delta_choice(c.index, {}, finish_reason=c.finish_reason)])
        if include_usage:
            yield chunk(ids, [], usage=run.usage())
        outcome = "ok"
        yield "data: [DONE]\n\n"
    except APIError as e:
        outcome = e.code
        yield error_event(e)
    except Exception as e:
        outcome = "internal_error"
        log.exception("chat completion stream failed")
        yield error_event(APIError(500, "internal_error", f"internal error: {type(e).__name__}"))
    finally:
        run.end(outcome, stream=True)
        if on_close is not None:
            on_close()


# ---- the HTTP answer -----------------------------------------------------------------------------


async def respond(services, body: ChatCompletionRequest, request: Request, slot) -> Response:
    """The answer to ``POST /v1/chat/completions``: JSON, a stream, or a queued completion's. ``slot`` (the
    admission slot, server/admission.py) is released when the work allows: a long video's job queued (this
    connection only waits), a stream closed, the answer sent."""
    try:
        tenant = require_api_key(request, services)  # (authenticated already: the tenant the route saw)
        check_model(services, body.model)
        check_parameters(body)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        media = MediaRun(route_long=True, owner=tenant.scope, tenant=tenant.name)
        plan = await _unless_client_leaves(request, start(services, body, deadline=deadline(services.settings),
                                                          media=media))
    except BaseException:
        slot.release()
        raise
    if isinstance(plan, LongVideo):
        slot.release()  # the job queue does the work
        job = await queue(services, body, plan, tenant)
        until = asyncio.get_running_loop().time() + services.settings.queued_wait_s
        if body.stream:
            return _sse(stream_queued(services, job, until, include_usage))
        return JSONResponse(await _unless_client_leaves(request, queued_completion(services, job.id, until)))
    if body.stream:
        return _sse(stream(plan, include_usage, on_close=slot.release))
    try:
        return JSONResponse(await _unless_client_leaves(request, collect(plan)))
    finally:
        slot.release()


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _client_gone(request: Request) -> None:
    """Returns when the ASGI server reports the client disconnected."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result, unless the client disconnects first: then ``work`` is cancelled (a fetch, a decode,
    the engine request; a queued completion's job) and the answer is 499."""
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


# ---- a completion whose video is long runs as a job; the client still gets a completion -------------


async def queue(services, body: ChatCompletionRequest, decision: LongVideo | None = None,
                tenant: Tenant | None = None) -> Job:
    """Submit a completion as a job of ``tenant`` (counted against its job quota: 429 when it is full)."""
    request = body.model_dump(exclude_none=True)
    if decision is not None and decision.staged:
        request[STAGED_KEY] = decision.staged
    owner = tenant.name if tenant is not None else "default"
    try:
        job, _ = await services.jobs.submit(request, owner=owner, max_active=tenant.limits.jobs if tenant else 0)
    except BaseException:
        _unstage(services, request.get(STAGED_KEY) or {}, owner)
        raise
    log.info("long video: chat completion runs as a job", extra={
        "job_id": job.id, "stream": bool(body.stream), "reason": decision.reason if decision else None,
        "staged": bool(decision and decision.staged)})
    return job


async def _final(services, job_id: str) -> Job:
    async for _, event in services.jobs.events(job_id):
        if is_final_event(event):
            break
    return await services.jobs.get(job_id)


def job_result(job: Job) -> dict:
    """A finished job's completion object (with ``framewise.job_id``), or its error raised."""
    if job.status == "succeeded":
        return {**job.result, "framewise": {**job.result.get("framewise", {}), "job_id": job.id}}
    err = job.error or {"code": "cancelled", "status": 499, "message": "the job was cancelled"}
    raise APIError(err.get("status", 500), err["code"], err["message"], "messages", extra={"job_id": job.id})


_PENDING = {
    "gateway_shutdown": (503, "this gateway is shutting down"),
    "timeout": (504, "the completion took longer than queued_wait_s ({wait:g} s)"),
    "queue_unavailable": (503, "the job queue stopped answering"),
}


def job_pending(job_id: str, why: str, settings) -> APIError:
    """The end of a wait on a queued completion whose job runs on (module doc): names the job to poll."""
    status, what = _PENDING[why]
    headers = {"Location": f"/v1/jobs/{job_id}", "x-should-retry": "false"}
    if why == "queue_unavailable":
        headers["Retry-After"] = str(QueueUnavailable.RETRY_AFTER_S)
    return APIError(status, why, f"{what.format(wait=settings.queued_wait_s)}; the completion runs on as job "
                                 f"{job_id}: GET /v1/jobs/{job_id} for its result", extra={"job_id": job_id},
                    headers=headers)


@dataclass
class _JobWait:
    """Waiting for a queued completion's job, ``until`` (loop time) at most; ended early by this gateway's
    shutdown when the queue is shared (Redis: a worker elsewhere runs the job on). The in-process queue's jobs
    run in this process: the wait goes on through the drain (the job may finish in it)."""

    services: Any
    job_id: str
    until: float
    _tasks: list[asyncio.Future] = field(default_factory=list)

    def __post_init__(self):
        self.waiter = asyncio.ensure_future(_final(self.services, self.job_id))
        self._tasks = [self.waiter]
        self.stopping = None
        if self.services.settings.redis_url:
            self.stopping = asyncio.ensure_future(self.services.lifecycle.stopping.wait())
            self._tasks.append(self.stopping)

    async def next(self, tick: float | None = None) -> Job | APIError | None:
        """The finished job; or the error that ends the wait (:func:`job_pending`); or None after ``tick`` s."""
        loop = asyncio.get_running_loop()
        left = self.until - loop.time()
        if left > 0:
            await asyncio.wait(self._tasks, timeout=left if tick is None else min(left, tick),
                               return_when=asyncio.FIRST_COMPLETED)
        if self.waiter.done():
            try:
                return self.waiter.result()
            except QueueUnavailable:
                return job_pending(self.job_id, "queue_unavailable", self.services.settings)
        if self.stopping is not None and self.stopping.done():
            return job_pending(self.job_id, "gateway_shutdown", self.services.settings)
        if loop.time() >= self.until:
            return job_pending(self.job_id, "timeout", self.services.settings)
        return None

    async def end(self, cancelled: bool) -> None:
        """Stop waiting. ``cancelled`` (the waiting task was cancelled): the client left -- cancel the job --
        unless the gateway is shutting down (uvicorn cancelling what outlived the drain): jobs outlive gateways."""
        for t in self._tasks:
            t.cancel()
        if cancelled and not self.services.lifecycle.shutting_down:
            log.info("the client of a queued completion left: cancelling its job", extra={"job_id": self.job_id})
            # in a task of its own: this one is being cancelled, and a stream's is cancelled again at every await
            # (Starlette's cancel scope), which interrupted the queue call and left the job running
            task = asyncio.ensure_future(self.services.jobs.cancel(self.job_id))
            _CANCELLING.add(task)
            task.add_done_callback(_cancel_done)
            with contextlib.suppress(Exception):
                await asyncio.shield(task)


_CANCELLING: set[asyncio.Future] = set()  # job cancellations under way (held until done)


def _cancel_done(task: asyncio.Future) -> None:
    _CANCELLING.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not cancel a queued completion's job: %s", task.exception())


async def queued_completion(services, job_id: str, until: float) -> dict:
    """Wait for a queued completion's job: its completion object, or the error that ended the wait (module
    doc). Cancelled (the client left): the job is cancelled, which aborts its engine request."""
    wait = _JobWait(services, job_id, until)
    cancelled = False
    try:
        outcome = await wait.next()
    except asyncio.CancelledError:
        cancelled = True
        raise
    finally:
        await wait.end(cancelled)
    if isinstance(outcome, APIError):
        raise outcome
    return job_result(outcome)


async def stream_queued(services, job: Job, until: float, include_usage: bool) -> AsyncIterator[str]:
    """A queued completion as a stream: ``: queued`` keep-alive comments while the job waits or runs, then
    its result replayed as chunks, or an error event (module doc). The client leaving cancels the job."""
    keepalive = services.settings.queue_keepalive_s
    wait = _JobWait(services, job.id, until)
    cancelled = False
    try:
        yield f": queued as {job.id}, status {job.status}\n\n"  # at once: a client can follow the job's events
        while (outcome := await wait.next(keepalive)) is None:
            try:
                status = (await services.jobs.get(job.id)).status
            except QueueUnavailable:
                status = "unknown (the job queue does not answer)"
            yield f": queued as {job.id}, status {status}\n\n"
    except (asyncio.CancelledError, GeneratorExit):  # the client left (Starlette cancels, or closes us)
        cancelled = True
        raise
    finally:
        await wait.end(cancelled)
    if isinstance(outcome, APIError):
        yield error_event(outcome)
        return
    try:
        result = job_result(outcome)
    except APIError as e:
        yield error_event(e)
        return
    for line in result_chunks(result, include_usage):
        yield line


async def run_chat_job(services, job: Job, report: Report) -> dict:
    """A job (``POST /v1/jobs`` or a queued completion): the same pipeline, with progress events
    fetching -> decoding -> generating (tokens) (the queue adds done). A client error fails the job with
    the code the synchronous API gives; an engine failure is raised as :class:`EngineFailure` (retried).
    Media: a job-sized fetch timeout, transient fetch failures retried, bytes the gateway staged used as they
    are. Not bounded by ``request_timeout_s``."""
    body = ChatCompletionRequest.model_validate({**job.request, "stream": False})
    check_model(services, body.model)
    staged = dict(job.request.get(STAGED_KEY) or {})
    await report({"stage": "fetching"})
    try:
        media = MediaRun(job=True, staged=staged, owner=job.owner, tenant=job.owner)  # the owner's files only
        run = await start(services, body, media=media, request_prefix=job.id,
                          cancelled="cancelled")  # never re-routed
        frames = run.prepared.video_frames
        await report({"stage": "decoding", "frames_done": frames, "frames_total": frames})
        result = await collect(run, progress=report)
    except APIError as e:
        if e.code in ENGINE_FAILURES:
            raise EngineFailure(e) from e
        _unstage(services, staged, job.owner)  # the job ends failed
        raise
    _unstage(services, staged, job.owner)
    return result


def _unstage(services, staged: dict[str, str], owner: str) -> None:
    for file_id in staged.values():
        services.files.unstage(file_id, owner)
