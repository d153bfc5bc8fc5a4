"""Job workers: take jobs from a queue, run them through the chat pipeline, store results.

- concurrency limit, heartbeats (refresh the visibility timeout, notice cancellation);
- a failure the client caused (bad video, invalid request) ends the job ``failed`` with the same
  error the synchronous API gives; anything else is retried up to the queue's limit, then
  dead-lettered;
- graceful shutdown: stop taking jobs, let running ones finish for ``grace_s``, hand the rest back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

from server import logs
from server.errors import APIError
from server.jobs.base import Claim, Job
from server.video.decode import MediaError

log = logging.getLogger("framewise.jobs")

Report = Callable[[dict], Awaitable[None]]
Execute = Callable[[Job, Report], Awaitable[dict]]


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def run_chat_job(services, job: Job, report: Report) -> dict:
    """The synchronous chat pipeline with progress events: fetching -> decoding -> generating -> done."""
    from server.completions import CompletionIds, completion_body, prepare, sampling_params
    from server.schemas import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate({**job.request, "stream": False})
    if body.model != services.settings.model_name:
        raise APIError(404, "model_not_found", f"the model {body.model!r} does not exist", "model")
    await report({"stage": "fetching"})
    prepared = await prepare(services, body)  # never re-routed: this is the job
    frames = prepared.video_frames
    await report({"stage": "decoding", "frames_done": frames, "frames_total": frames})
    params = sampling_params(body, stream=True)  # deltas: count tokens as they come
    request_id = f"{job.id}-{uuid.uuid4().hex[:8]}"
    tokens, last_report, final_ids, texts = 0, 0.0, None, {}
    try:
        async for out in services.engine.generate(prepared.prompt, params, request_id):
            final_ids = out
            for c in out.outputs:
                texts[c.index] = texts.get(c.index, "") + c.text
                tokens += len(c.token_ids)
            if time.monotonic() - last_report > 0.5:
                last_report = time.monotonic()
                await report({"stage": "generating", "tokens": tokens})
    except asyncio.CancelledError:
        await services.engine.abort(request_id)
        raise
    except ValueError as e:
        raise APIError(400, "invalid_request", str(e), "messages") from None
    await report({"stage": "generating", "tokens": tokens})
    ids = CompletionIds(body.model)
    result = completion_body(ids, _Final(final_ids, texts), prepared, body.top_logprobs or 0)
    result["usage"]["completion_tokens"] = tokens
    result["usage"]["total_tokens"] = result["usage"]["prompt_tokens"] + tokens
    return result


class _Final:
    """The last delta output, with the accumulated text of each choice."""

    def __init__(self, out, texts: dict[int, str]):
        self.prompt_token_ids = out.prompt_token_ids
        self.outputs = [_Choice(c, texts[c.index]) for c in out.outputs]


class _Choice:
    def __init__(self, c, text: str):
        self.index, self.text, self.finish_reason = c.index, text, c.finish_reason
        self.token_ids, self.logprobs = [], None


class JobWorker:
    def __init__(self, queue, execute: Execute, *, consumer: str | None = None, concurrency: int = 2,
                 heartbeat_s: float = 2.0, metrics=None):
        self.queue, self.execute = queue, execute
        self.consumer = consumer or consumer_name()
        self.concurrency, self.heartbeat_s, self.metrics = concurrency, heartbeat_s, metrics
        self.running: dict[str, tuple[Claim, asyncio.Task]] = {}

    async def run(self, stop: asyncio.Event, grace_s: float = 30.0) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        while not stop.is_set():
            await slots.acquire()
            if stop.is_set():
                slots.release()
                break
            try:
                claim = await self.queue.claim(self.consumer, block_s=1.0)
            except Exception as e:  # Redis restarting: keep trying
                slots.release()
                log.warning("job queue unavailable (%s); retrying", e)
                await asyncio.sleep(0.5)
                continue
            if claim is None:
                slots.release()
                continue
            task = asyncio.create_task(self._run_one(claim))
            self.running[claim.job.id] = (claim, task)
            task.add_done_callback(lambda _t, job_id=claim.job.id: (self.running.pop(job_id, None), slots.release()))
        await self._drain(grace_s)

    async def _drain(self, grace_s: float) -> None:
        if self.running:
            await asyncio.wait([t for _, t in self.running.values()], timeout=grace_s)
        for claim, task in list(self.running.values()):  # still running: hand back
            task.cancel()
            with contextlib.suppress(Exception):
                await self.queue.release(claim)

    async def _run_one(self, claim: Claim) -> None:
        job = claim.job
        logs.job_id.set(job.id)  # this task's context only: every line logged for the job carries it
        log.info("job started", extra={"attempt": job.attempts, "worker": self.consumer})
        start = time.perf_counter()
        work = asyncio.create_task(self.execute(job, lambda ev: self.queue.progress(claim, ev)))
        beat = asyncio.create_task(self._heartbeat(claim, work))
        outcome = "failed"
        try:
            result = await work
            await self._retrying(self.queue.complete, claim, result)
            outcome = "succeeded"
        except asyncio.CancelledError:
            if not await self.queue.is_cancelled(job.id):
                raise  # shutdown: _drain hands the job back
            outcome = "cancelled"  # the client cancelled it: acknowledge, keep its status
            await self._retrying(self.queue.fail, claim, {"code": "cancelled", "status": 499,
                                                         "message": "cancelled by the client"}, False)
        except (APIError, MediaError) as e:  # the client's fault: same error as the sync API
            status = getattr(e, "status", 400)
            error = {"code": e.code, "message": e.message, "status": status}
            await self._retrying(self.queue.fail, claim, error, False)
        except Exception as e:
            log.exception("job %s failed", job.id)
            await self._retrying(self.queue.fail, claim, {"code": "internal_error", "status": 500,
                                                         "message": f"{type(e).__name__}: {e}"}, True)
        finally:
            beat.cancel()
            log.info("job %s", outcome, extra={"outcome": outcome,
                                                "ms": round((time.perf_counter() - start) * 1000, 1)})
            if self.metrics is not None:
                self.metrics.jobs.labels(outcome).inc()
                self.metrics.job_seconds.observe(time.perf_counter() - start)

    async def _heartbeat(self, claim: Claim, work: asyncio.Task) -> None:
        while not work.done():
            await asyncio.sleep(self.heartbeat_s)
            try:
                if await self.queue.is_cancelled(claim.job.id):
                    work.cancel()
                    return
                await self.queue.heartbeat(claim, self.consumer)
            except Exception as e:
                log.warning("heartbeat for %s failed: %s", claim.job.id, e)

    async def _retrying(self, fn, *args, attempts: int = 60) -> object:
        """Store outcomes through a Redis restart (connection errors) without losing them."""
        for i in range(attempts):
            try:
                return await fn(*args)
            except (ConnectionError, OSError, TimeoutError) + _redis_errors() as e:
                if i == attempts - 1:
                    raise
                log.warning("job store unavailable (%s); retrying", e)
                await asyncio.sleep(0.5)
        return None


def _redis_errors() -> tuple[type[BaseException], ...]:
    try:
        from redis.exceptions import ConnectionError as RConnErr
        from redis.exceptions import TimeoutError as RTimeout

        return (RConnErr, RTimeout)
    except ImportError:
        return ()
