"""The chat pipeline: prepare media -> generate -> stream or collect -> OpenAI JSON.

The HTTP route (:mod:`server.routers.chat`, a thin adapter) and the job worker (:func:`run_chat_job`)
run every chat completion through here, so both give the same completion object (``n`` choices,
logprobs, usage, ``framewise.media``), the same error codes and the same timeout:

- ``request_timeout_s`` bounds a request from its arrival: media fetch, a decode waiting for a pool
  worker, decoding, generation, and a completion queued as a job. Past it: 504 ``timeout``, and the
  engine request is aborted (a queued completion's job is cancelled, which aborts it).
- what the engine reports is classified, never passed off as a finished choice: ``finish_reason``
  "abort" (the engine aborted the request; the client and the timeout are handled before) -> 503
  ``request_aborted``; "error" or a failed generate -> 500 ``engine_error``; a dead engine core
  -> 503 ``engine_dead``; vLLM refusing the input -> 400.
- once a stream has begun, an error is one ``data: {"error": ...}`` event and the stream ends
  without ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from vllm.exceptions import VLLMClientError, VLLMServerError

from server.chat.media import LongVideo, Prepared, prepare
from server.chat.responses import (
    CompletionIds,
    chunk,
    delta_choice,
    error_event,
    logprobs_of,
    result_chunks,
    usage_of,
)
from server.errors import APIError
from server.jobs.base import Job
from server.schemas import ChatCompletionRequest

__all__ = ["ChatRun", "EngineFailure", "LongVideo", "check_model", "collect", "deadline", "queue",
           "queued_completion", "run_chat_job", "start", "stream", "stream_queued"]

log = logging.getLogger("framewise.chat")
Report = Callable[[dict], Awaitable[None]]

# failures on the server's side: logged as errors; a job that meets one is retried
ENGINE_FAILURES = ("engine_dead", "engine_error", "request_aborted")


class EngineFailure(RuntimeError):
    """An engine-side failure in a job, raised past the job worker's client-error branch (which would end
    the job ``failed``) so that the worker retries the job."""

    def __init__(self, e: APIError):
        super().__init__(f"{e.code}: {e.message}")
        self.code, self.status = e.code, e.status


def check_model(services, body: ChatCompletionRequest) -> None:
    if body.model != services.settings.model_name:
        raise APIError(404, "model_not_found", f"the model {body.model!r} does not exist", "model")


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
        output_kind=RequestOutputKind.DELTA,
    )


def _refused_input(e: Exception) -> APIError:
    msg = str(e)
    lowered = msg.lower()
    if "maximum model length" in lowered or "maximum context length" in lowered or "max_model_len" in lowered:
        return APIError(400, "context_length_exceeded", msg, "messages")
    return APIError(400, "invalid_request", msg, "messages")


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
        self.choices: dict[int, Choice] = {}
        self._ended = False

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices.values())

    def usage(self) -> dict:
        return usage_of(self.prompt_tokens, self.completion_tokens, self.prepared.video_frames)

    def completion(self) -> dict:
        """The OpenAI ``chat.completion`` object of what was generated."""
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs_of(c.token_ids, c.logprobs, self.top_k), "finish_reason": c.finish_reason}
                   for c in sorted(self.choices.values(), key=lambda c: c.index)]
        return {"id": self.ids.id, "object": "chat.completion", "created": self.ids.created, "model": self.ids.model,
                "choices": choices, "usage": self.usage(), "framewise": {"media": self.prepared.media}}

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
                raise APIError(503, "engine_dead", "the inference engine died during the request; retry later"
                               ) from None
            raise APIError(500, "engine_error", f"the inference engine failed: {type(e).__name__}") from None
        finally:
            with contextlib.suppress(Exception):
                await gen.aclose()  # left early (cancelled, closed): vLLM aborts the request

    def _add(self, out) -> None:
        self.prompt_tokens = len(out.prompt_token_ids)
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


async def start(services, body: ChatCompletionRequest, *, deadline: float | None = None, route_long: bool = False,
                request_prefix: str | None = None, cancelled: str = "client_disconnected") -> ChatRun:
    """Prepare the media (within ``deadline``, 504 past it): a run ready to generate. With ``route_long``,
    raises :class:`LongVideo` for a video long enough to run as a job (:func:`queue`)."""
    started = time.perf_counter()
    timer = asyncio.timeout_at(deadline)
    try:
        async with timer:
            prepared = await prepare(services, body, route_long=route_long)
    except TimeoutError:
        if not timer.expired():
            raise
        raise timeout_error(services.settings) from None
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
                    yield chunk(ids, [delta_choice(c.index, {"role": "assistant", "content": ""})],
                                extra={"framewise": {"media": run.prepared.media}} if c.index == 0 else None)
                if c.text or c.token_ids:
                    yield chunk(ids, [delta_choice(c.index, {"content": c.text},
                                                   logprobs=logprobs_of(c.token_ids, c.logprobs, run.top_k))])
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


# ---- a completion whose video is long runs as a job; the client still gets a completion -------------


async def queue(services, body: ChatCompletionRequest) -> Job:
    job, _ = await services.jobs.submit(body.model_dump(exclude_none=True))
    log.info("long video: chat completion runs as a job", extra={"job_id": job.id, "stream": bool(body.stream)})
    return job


async def _final(services, job_id: str) -> Job:
    async for _, event in services.jobs.events(job_id):
        if event.get("stage") in ("done", "failed", "cancelled"):
            break
    return await services.jobs.get(job_id)


def job_result(job: Job) -> dict:
    """A finished job's completion object (with ``framewise.job_id``), or its error raised."""
    if job.status == "succeeded":
        return {**job.result, "framewise": {**job.result.get("framewise", {}), "job_id": job.id}}
    err = job.error or {"code": "cancelled", "status": 499, "message": "the job was cancelled"}
    raise APIError(err.get("status", 500), err["code"], err["message"], "messages")


async def queued_completion(services, job_id: str, deadline: float | None) -> dict:
    """Wait for a queued completion's job: its completion object. The job is cancelled (which aborts its
    engine request) when the wait ends early: the deadline (504) or the caller cancelling."""
    timer = asyncio.timeout_at(deadline)
    try:
        async with timer:
            job = await _final(services, job_id)
    except BaseException as e:
        with contextlib.suppress(Exception):
            await services.jobs.cancel(job_id)
        if isinstance(e, TimeoutError) and timer.expired():
            raise timeout_error(services.settings) from None
        raise
    return job_result(job)


async def stream_queued(services, job: Job, deadline: float | None, include_usage: bool) -> AsyncIterator[str]:
    """A queued completion as a stream: ``: queued`` keep-alive comments while the job waits or runs, then
    its result replayed as chunks (or an error event). Leaving early cancels the job."""
    loop, keepalive = asyncio.get_running_loop(), services.settings.queue_keepalive_s
    waiter = asyncio.create_task(_final(services, job.id))
    final = None
    try:
        yield f": queued as {job.id}, status {job.status}\n\n"  # at once: a client can follow the job's events
        while not waiter.done():
            left = keepalive if deadline is None else deadline - loop.time()
            if left <= 0:
                break
            done, _ = await asyncio.wait({waiter}, timeout=min(keepalive, left))
            if not done:
                yield f": queued as {job.id}, status {(await services.jobs.get(job.id)).status}\n\n"
        if waiter.done():
            final = waiter.result()
    finally:
        if final is None:
            waiter.cancel()
            with contextlib.suppress(Exception):
                await services.jobs.cancel(job.id)
    if final is None:
        yield error_event(timeout_error(services.settings))
        return
    try:
        result = job_result(final)
    except APIError as e:
        yield error_event(e)
        return
    for line in result_chunks(result, include_usage):
        yield line


async def run_chat_job(services, job: Job, report: Report) -> dict:
    """A job (``POST /v1/jobs`` or a queued completion): the same pipeline, with progress events
    fetching -> decoding -> generating (tokens) (the queue adds done). A client error fails the job with
    the code the synchronous API gives; an engine failure is raised as :class:`EngineFailure` (retried).
    Not bounded by ``request_timeout_s``: a queued completion's wait is, and cancels the job."""
    body = ChatCompletionRequest.model_validate({**job.request, "stream": False})
    check_model(services, body)
    await report({"stage": "fetching"})
    try:
        run = await start(services, body, request_prefix=job.id, cancelled="cancelled")  # never re-routed
        frames = run.prepared.video_frames
        await report({"stage": "decoding", "frames_done": frames, "frames_total": frames})
        return await collect(run, progress=report)
    except APIError as e:
        if e.code in ENGINE_FAILURES:
            raise EngineFailure(e) from e
        raise
