"""Faults with real engines (issue 21; the mechanisms' fast tests: tests/test_engine_death.py,
tests/test_redis_outage.py, tests/test_jobs_outlive_gateways.py, tests/test_long_video_once.py).

- a worker whose engine core is SIGKILLed while it holds jobs: it hands them back without spending an
  attempt and exits with status 1; the session's worker completes each exactly once, in one attempt.
(A gateway SIGTERMed while a client waits on a queued completion whose job runs on a worker:
tests/test_graceful_shutdown.py.)

(A gateway's engine core SIGKILLed mid-stream: tests/test_pipeline.py::
test_engine_killed_mid_request_is_reported_as_engine_dead.)
"""

from __future__ import annotations

import asyncio
import json

import psutil
import pytest

from framewise.server.jobs.redis_queue import RedisJobQueue
from tests.live_support import wait_for
from tests.stack import MODEL

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]


def _engine_core(pid: int) -> psutil.Process:
    procs = psutil.Process(pid).children(recursive=True)
    core = [p for p in procs if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())]
    assert len(core) == 1, [(p.pid, p.name()) for p in procs]
    return core[0]


def _run(coro):
    return asyncio.run(coro)


async def _with_queue(url: str, fn):
    q = RedisJobQueue(url)
    try:
        return await fn(q)
    finally:
        await q.close()


def _runs_by(url: str, job_id: str) -> list[str]:
    """The workers that started the job, in order (its ``running`` events)."""

    async def read(q):
        entries = await q.r.xrange(f"fw:job:{job_id}:events")
        return [json.loads(d["data"]).get("worker") for _, d in entries
                if json.loads(d["data"]).get("stage") == "running"]

    return _run(_with_queue(url, read))


def _job(url: str, job_id: str):
    async def read(q):
        return await q.get(job_id), await q.completions(job_id)

    return _run(_with_queue(url, read))


def test_a_worker_whose_engine_dies_hands_its_jobs_back_without_spending_attempts(workers, session_redis):
    proc, log = workers.start("doomed")
    workers.wait_ready(log, proc)
    doomed = f"-{proc.pid}-"  # in its consumer name: <host>-<pid>-<suffix>
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count."}], "max_tokens": 3000,
            "ignore_eos": True}

    async def submit(q):
        return [(await q.submit(body))[0].id for _ in range(4)]

    ids = _run(_with_queue(session_redis.url, submit))

    def held_by_doomed() -> list[str]:
        held = []
        for job_id in ids:
            job, _ = _job(session_redis.url, job_id)
            runs = _runs_by(session_redis.url, job_id)
            if job.status == "running" and runs and doomed in runs[-1] and job.progress.get("stage") == "generating":
                held.append(job_id)
        return held

    held = wait_for(held_by_doomed, 300, "the doomed worker to generate a job", every=0.2)
    _engine_core(proc.pid).kill()
    assert proc.wait(120) == 1, log.read_text()[-3000:]
    text = log.read_text()
    assert "the inference engine died" in text and "handing back" in text
    for job_id in ids:
        wait_for(lambda job_id=job_id: _job(session_redis.url, job_id)[0].status in ("succeeded", "failed"), 600,
                 "the jobs to end on the other worker", every=0.5)
    for job_id in ids:
        job, completions = _job(session_redis.url, job_id)
        runs = _runs_by(session_redis.url, job_id)
        assert (job.status, completions, job.error) == ("succeeded", 1, None), job.public()
        assert job.attempts == 1, (job_id, job.attempts, runs)  # the doomed worker's start was not counted
        assert doomed not in runs[-1]
    for job_id in held:
        assert doomed in _runs_by(session_redis.url, job_id)[0]
