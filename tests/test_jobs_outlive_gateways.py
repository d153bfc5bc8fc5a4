"""Jobs outlive gateways (issue 21, item 3): shutting a gateway down never cancels the jobs workers run.

``framewise serve``'s server (tests/live_support.py: the stand-in engine, a real SIGTERM) on a real Redis; the
queued completions' jobs run on a job worker in this process. A client waiting on a queued completion:

- gateway SIGTERM: the client gets, at once, 503 ``gateway_shutdown`` naming the job (``job_id``,
  ``Location``, ``x-should-retry: false``; a stream: the same error object as its final event); the job runs
  on, succeeds once, and its result is read through a new gateway;
- ``queued_wait_s`` passed: 504 ``timeout`` naming the job, which runs on;
- the client leaving (a JSON request's connection closed, a stream dropped): the job is cancelled.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from framewise.server.jobs.redis_queue import RedisJobQueue
from framewise.server.jobs.worker import JobWorker
from framewise.server.video.synth import write_clip
from tests.live_support import MODEL, LiveGateway, data_url, video_message, wait_for

JOB_S = 8.0  # how long the worker takes per job


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clip") / "long.mp4"
    write_clip(str(path), frames=72, fps=24)  # 3 s: above queue_above_s
    return data_url(path.read_bytes())


class ThreadWorker:
    """A job worker on its own event loop thread: each job takes JOB_S, then a completion object."""

    def __init__(self, url: str):
        self.url, self.runs = url, []
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)
        self.thread.start()

    async def _execute(self, job, report):
        self.runs.append(job.id)
        await report({"stage": "generating", "tokens": 0})
        await asyncio.sleep(JOB_S)
        return {"id": f"chatcmpl-{job.id}", "object": "chat.completion", "created": 0, "model": MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "done"}, "logprobs": None,
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2, "video_frames": 2},
                "framewise": {"media": []}}

    async def _main(self):
        queue = RedisJobQueue(self.url, visibility_timeout_s=30)
        await JobWorker(queue, self._execute, consumer="test-worker", concurrency=4, heartbeat_s=0.5).run(self.stop)
        await queue.close()

    def close(self):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


@pytest.fixture(scope="module")
def worker(module_redis_server):
    w = ThreadWorker(module_redis_server.url)
    yield w
    w.close()


def _gateway(tmp_path, tc_llava_dir, module_redis_server, **settings) -> LiveGateway:
    return LiveGateway(tmp_path, tc_llava_dir, redis_url=module_redis_server.url, queue_above_s=1.0,
                       queue_keepalive_s=0.5, drain_s=20, **settings)


def _job(redis_url: str, job_id: str):
    async def get():
        q = RedisJobQueue(redis_url)
        try:
            return await q.get(job_id), await q.completions(job_id)
        finally:
            await q.close()

    return asyncio.run(get())


def _latest_job_id(redis_url: str) -> str | None:
    async def latest():
        q = RedisJobQueue(redis_url)
        try:
            jobs = await q.list(None, 1, None)
            return jobs[0].id if jobs else None
        finally:
            await q.close()

    return asyncio.run(latest())


def _running(redis_url: str, known: set) -> str | None:
    job_id = _latest_job_id(redis_url)
    if job_id is None or job_id in known:
        return None
    return job_id if _job(redis_url, job_id)[0].status == "running" else None


def test_a_gateway_shut_down_leaves_the_job_running_and_names_it(tc_llava_dir, tmp_path, module_redis_server, worker,
                                                                 long_clip):
    gw = _gateway(tmp_path, tc_llava_dir, module_redis_server)
    known = {_latest_job_id(module_redis_server.url)}
    answers: dict = {}

    def plain():
        answers["plain"] = httpx.post(gw.url("/v1/chat/completions"), headers=gw.headers, timeout=60, json={
            "model": MODEL, "max_tokens": 2, "messages": video_message(long_clip, num_frames=2)})

    def streamed():
        with httpx.stream("POST", gw.url("/v1/chat/completions"), headers=gw.headers, timeout=60, json={
                "model": MODEL, "max_tokens": 2, "stream": True,
                "messages": video_message(long_clip, num_frames=2)}) as s:
            answers["stream"] = list(s.iter_lines())

    try:
        threads = [threading.Thread(target=f) for f in (plain, streamed)]
        for t in threads:
            t.start()
            first = wait_for(lambda: _running(module_redis_server.url, known), 60, "the job to run on the worker")
            known.add(first)
        gw.sigterm()
        stopped = time.monotonic()
        for t in threads:
            t.join(30)
        assert time.monotonic() - stopped < 10  # at once, not after the job (8 s) or the drain (20 s)
        r = answers["plain"]
        error = r.json()["error"]
        assert (r.status_code, error["code"]) == (503, "gateway_shutdown"), r.text
        job_ids = {error["job_id"]}
        assert r.headers["Location"] == f"/v1/jobs/{error['job_id']}" and r.headers["x-should-retry"] == "false"
        events = [json.loads(line[6:]) for line in answers["stream"] if line.startswith("data: ")]
        assert answers["stream"][0].startswith(": queued as job-")
        assert events[-1]["error"]["code"] == "gateway_shutdown" and "[DONE]" not in answers["stream"]
        job_ids.add(events[-1]["error"]["job_id"])
        assert job_ids == known - {None}
        assert gw.wait_exit(60) in (0, -15)  # SIGTERM re-raised after a clean shutdown (143 in a container)
    finally:
        gw.close()
    # the jobs were not cancelled: they succeed, once each, and a new gateway has their results
    for job_id in job_ids:
        wait_for(lambda job_id=job_id: _job(module_redis_server.url, job_id)[0].status == "succeeded", 60, "the job")
        assert _job(module_redis_server.url, job_id)[1] == 1
    new = _gateway(tmp_path, tc_llava_dir, module_redis_server)
    try:
        for job_id in job_ids:
            job = httpx.get(new.url(f"/v1/jobs/{job_id}"), headers=new.headers, timeout=10).json()
            assert job["status"] == "succeeded" and job["result"]["choices"][0]["message"]["content"] == "done"
            assert job["attempts"] == 1
    finally:
        new.close()


def test_the_wait_bound_names_the_job_and_the_client_leaving_cancels_it(tc_llava_dir, tmp_path, module_redis_server,
                                                                        worker, long_clip):
    gw = _gateway(tmp_path, tc_llava_dir, module_redis_server, queued_wait_s=2.0)
    try:
        body = {"model": MODEL, "max_tokens": 2, "messages": video_message(long_clip, num_frames=2)}
        r = httpx.post(gw.url("/v1/chat/completions"), headers=gw.headers, timeout=60, json=body)
        error = r.json()["error"]
        assert (r.status_code, error["code"]) == (504, "timeout") and "queued_wait_s" in error["message"]
        wait_for(lambda: _job(module_redis_server.url, error["job_id"])[0].status == "succeeded", 60,
                 "the job to run on after the wait ended")
        # a client that leaves: its job is cancelled (JSON: the connection closed; a stream: dropped)
        known = {_latest_job_id(module_redis_server.url)}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gw.url("/v1/chat/completions"), headers=gw.headers, timeout=1.5,
                       json={**body, "max_tokens": 3})
        left = wait_for(lambda: (j := _latest_job_id(module_redis_server.url)) not in known and j, 30, "the job")
        wait_for(lambda: _job(module_redis_server.url, left)[0].status == "cancelled", 30, "the job to be cancelled")
        known.add(left)
        with httpx.stream("POST", gw.url("/v1/chat/completions"), headers=gw.headers, timeout=60,
                          json={**body, "stream": True}) as s:
            assert next(s.iter_lines()).startswith(": queued as job-")
        dropped = wait_for(lambda: (j := _latest_job_id(module_redis_server.url)) not in known and j, 30, "the job")
        wait_for(lambda: _job(module_redis_server.url, dropped)[0].status == "cancelled", 30, "the job to be cancelled")
    finally:
        gw.close()


def test_a_client_leaving_cancels_its_job_even_when_cancelled_again_at_every_await():
    """A dropped stream is cancelled by Starlette's cancel scope, which cancels the task again at each await: the
    job's cancellation must still reach the queue (it was interrupted there, and the job ran on)."""
    import anyio

    from framewise.server.chat.pipeline import _JobWait

    cancelled_jobs = []

    class Jobs:
        async def events(self, job_id):  # the job runs on: no final event
            await asyncio.sleep(3600)
            yield "0", {}

        async def cancel(self, job_id):
            await asyncio.sleep(0.05)  # a round trip to Redis
            cancelled_jobs.append(job_id)

    services = SimpleNamespace(jobs=Jobs(), settings=SimpleNamespace(redis_url=None),
                               lifecycle=SimpleNamespace(shutting_down=False))

    async def main():
        wait = _JobWait(services, "job-1", asyncio.get_running_loop().time() + 60)
        with anyio.CancelScope() as scope:
            scope.cancel()  # level-triggered: every await inside raises
            await wait.end(cancelled=True)
        await asyncio.sleep(0.2)

    asyncio.run(main())
    assert cancelled_jobs == ["job-1"]
