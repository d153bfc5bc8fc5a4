"""Jobs through Redis: the session's Redis-backed gateway submits, real ``framewise worker`` processes (vLLM
engine) consume; a worker is SIGKILLed while it holds a job and another completes it once.

(200 jobs through 3 workers is shown without engines in tests/test_jobs_queue.py: the property is the queue's.)"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest
import redis

from framewise.server.video.synth import write_clip
from tests.stack import MODEL

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def media(media_origin):
    folder = media_origin.folder("jobs")
    write_clip(str(folder.root / "clip.mp4"), frames=48)
    return folder


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def job(gw, job_id):
    return httpx.get(f"{gw.base_url}/v1/jobs/{job_id}", headers=gw.headers, timeout=10).json()


def test_worker_killed_mid_job_another_completes_it_once(jobs_gateway, workers, session_redis, media):
    gw = jobs_gateway
    body = {"model": MODEL, "max_tokens": 3000, "ignore_eos": True,
            "messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": media.url("clip.mp4"), "num_frames": 2}},
                {"type": "text", "text": "Describe it."}]}]}
    r = httpx.post(f"{gw.base_url}/v1/jobs", json=body, headers={**gw.headers, "Idempotency-Key": "jobs-api-once"})
    assert r.status_code == 202
    job_id = r.json()["id"]
    again = httpx.post(f"{gw.base_url}/v1/jobs", json=body, headers={**gw.headers, "Idempotency-Key": "jobs-api-once"})
    assert again.status_code == 200 and again.json()["id"] == job_id

    # the session's worker takes it; once it generates, it dies with everything it started
    [a] = [p for p in workers.procs if p.poll() is None]
    wait_for(lambda: job(gw, job_id)["progress"].get("stage") == "generating", 180, "the worker to generate")
    os.killpg(a.pid, signal.SIGKILL)
    a.wait(30)
    assert job(gw, job_id)["status"] == "running"
    b, log_b = workers.start("b")  # the session's worker from now on
    done = wait_for(lambda: (j := job(gw, job_id))["status"] in ("succeeded", "failed") and j, 300,
                    "worker B to finish the job")
    assert done["status"] == "succeeded" and done["attempts"] == 2
    assert done["result"]["usage"]["completion_tokens"] == 3000
    r = redis.Redis.from_url(session_redis.url, decode_responses=True)
    assert r.hget(f"fw:job:{job_id}", "completions") == "1"  # stored exactly once
    # the worker's JSON log lines name the job: its start (2nd attempt) and its outcome
    entries = [json.loads(line) for line in log_b.read_text().splitlines() if line.startswith("{")]
    mine = [e for e in entries if e.get("job_id") == job_id and e["logger"] == "framewise.jobs"]
    assert [(e["msg"], e.get("attempt"), e.get("outcome")) for e in mine] == [
        ("job started", 2, None), ("job succeeded", None, "succeeded")]

    # cancel a running job (held up in a 30 s fetch): the worker drops it and moves on
    slow = {**body, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": media.url("slow")}}]}]}
    long = httpx.post(f"{gw.base_url}/v1/jobs", json=slow, headers=gw.headers).json()["id"]
    wait_for(lambda: job(gw, long)["progress"].get("stage") == "fetching", 60, "the second job to run")
    assert httpx.delete(f"{gw.base_url}/v1/jobs/{long}", headers=gw.headers).json()["status"] == "cancelled"
    events = []
    with httpx.stream("GET", f"{gw.base_url}/v1/jobs/{long}/events", headers=gw.headers, timeout=60) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1]["stage"] == "cancelled"
    wait_for(lambda: gw.metrics().get("framewise_job_queue_depth") == 0, 30, "an empty queue")
    assert job(gw, long)["result"] is None
    short = httpx.post(f"{gw.base_url}/v1/jobs", json={**body, "max_tokens": 4}, headers=gw.headers)
    assert wait_for(lambda: job(gw, short.json()["id"])["status"] == "succeeded", 60, "the next job")
