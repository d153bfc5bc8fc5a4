"""Jobs through Redis: the gateway submits, real ``framewise worker`` processes (vLLM engine)
consume; a worker is SIGKILLed while it holds a job."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import redis

from server.video.synth import write_clip
from tests.conftest import ROOT
from tests.gateway_support import Gateway, MediaServer
from tests.redis_support import RedisServer

pytestmark = pytest.mark.engine
MODEL = "tc-llava"
KEY = "sk-jobs"


@pytest.fixture(scope="module")
def system(tc_llava_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("jobs")
    (work / "media").mkdir()
    write_clip(str(work / "media" / "clip.mp4"), frames=48)
    media = MediaServer(work / "media")
    rs = RedisServer(work)
    env = {"REDIS_URL": rs.url}
    gw = Gateway(tc_llava_dir, work, api_key=KEY, allowed_hosts=f"127.0.0.1:{media.port}", env=env,
                 args=("--served-model-name", MODEL))
    yield gw, rs, media, work
    gw.close()
    rs.close()
    media.close()


def start_worker(model, rs: RedisServer, media: MediaServer, log, pin: bool = False) -> subprocess.Popen:
    """``pin``: the worker and the engine processes it spawns get one CPU, the gateway and the test the others.
    Measured on the 2-core CI VM: an engine spread over both cores generating the tiny model's tokens starved
    every other process for the whole generation (5-6 s without one wake-up), so a test polling for the
    generating stage saw the job only once it had finished."""
    cpu = ["taskset", "-c", str(max(os.sched_getaffinity(0)))] if pin else []
    proc = subprocess.Popen(
        [*cpu, sys.executable, "-m", "server.cli", "worker", "--model", str(model), "--served-model-name", MODEL,
         "--redis-url", rs.url, "--visibility-timeout-s", "10", "--heartbeat-s", "1", "--concurrency", "2",
         "--allowed-media-hosts", f"127.0.0.1:{media.port}", "--grace-s", "2"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    return proc


def stop_worker(proc: subprocess.Popen) -> None:
    """SIGTERM (graceful), then make sure nothing of its process group (engine core, workers) is left."""
    proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


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


def test_worker_killed_mid_job_another_completes_it_once(system, tc_llava_dir):
    gw, rs, media, work = system
    body = {"model": MODEL, "max_tokens": 3000, "ignore_eos": True,
            "messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": media.url("clip.mp4"), "num_frames": 2}},
                {"type": "text", "text": "Describe it."}]}]}
    r = httpx.post(f"{gw.base_url}/v1/jobs", json=body, headers={**gw.headers, "Idempotency-Key": "once"})
    assert r.status_code == 202
    job_id = r.json()["id"]
    again = httpx.post(f"{gw.base_url}/v1/jobs", json=body, headers={**gw.headers, "Idempotency-Key": "once"})
    assert again.status_code == 200 and again.json()["id"] == job_id

    with open(work / "worker-a.log", "w") as log_a:
        a = start_worker(tc_llava_dir, rs, media, log_a, pin=True)
        wait_for(lambda: job(gw, job_id)["progress"].get("stage") == "generating", 180, "worker A to generate")
        os.killpg(a.pid, signal.SIGKILL)
        a.wait(30)
    assert job(gw, job_id)["status"] == "running"
    with open(work / "worker-b.log", "w") as log_b:
        b = start_worker(tc_llava_dir, rs, media, log_b, pin=True)
        try:
            done = wait_for(lambda: (j := job(gw, job_id))["status"] in ("succeeded", "failed") and j, 240,
                            "worker B to finish the job")
            assert done["status"] == "succeeded" and done["attempts"] == 2
            assert done["result"]["usage"]["completion_tokens"] == 3000
            r = redis.Redis.from_url(rs.url, decode_responses=True)
            assert r.hget(f"fw:job:{job_id}", "completions") == "1"  # stored exactly once
            # the worker's JSON log lines name the job: its start (2nd attempt) and its outcome
            entries = [json.loads(line) for line in (work / "worker-b.log").read_text().splitlines()
                       if line.startswith("{")]
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
        finally:
            stop_worker(b)


def test_200_jobs_through_3_worker_processes(system, tc_llava_dir):
    gw, rs, media, work = system
    logs = [open(work / f"pool-{i}.log", "w") for i in range(3)]  # noqa: SIM115 - closed below
    workers = [start_worker(tc_llava_dir, rs, media, log) for log in logs]
    try:
        wait_for(lambda: all("framewise worker ready" in (work / f"pool-{i}.log").read_text() for i in range(3)),
                 300, "3 workers to start")
        body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Is it day or night?"}]}
        ids = [httpx.post(f"{gw.base_url}/v1/jobs", json={**body, "seed": i}, headers=gw.headers).json()["id"]
               for i in range(200)]
        r = redis.Redis.from_url(rs.url, decode_responses=True)

        def all_done():
            return all(r.hget(f"fw:job:{i}", "status") == "succeeded" for i in ids)

        wait_for(all_done, 600, "200 jobs")
        assert [r.hget(f"fw:job:{i}", "completions") for i in ids] == ["1"] * 200  # none twice
        runners = set()
        for i in ids:
            starts = [json.loads(d["data"]) for _, d in r.xrange(f"fw:job:{i}:events")]
            starts = [e for e in starts if e["stage"] == "running"]
            assert len(starts) == 1
            runners.add(starts[0]["worker"])
        assert len(runners) == 3  # every worker process took jobs
        wait_for(lambda: gw.metrics().get("framewise_job_queue_depth") == 0, 30, "queue depth 0")
    finally:
        for w in workers:
            stop_worker(w)
        for log in logs:
            log.close()
