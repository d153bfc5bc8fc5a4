"""Redis off the synchronous path (issue 21, item 2): a real ``redis-server`` (AOF, fsync always) killed and
restarted while the gateway (in-process, the stand-in engine, consuming its own jobs) serves short chats,
job submissions, an events stream and a running job.

- ``/ready`` and ``/health`` never ask Redis; ``framewise_queue_up`` says whether it answers.
- during the outage: short chats 200; job routes and queue-bound completions 503 ``queue_unavailable`` with
  ``Retry-After`` within 2 s (Redis killed, or hung: SIGSTOP); an open events stream ends with an ``error``
  event naming the job and the last event id, from which it resumes afterwards.
- after the restart: nothing accepted is lost, the running job completes exactly once without a stale error,
  promptly (its worker kept it: not after the visibility timeout), and polls never read a request back.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
import redis
from fastapi.testclient import TestClient

from framewise.server.app import create_app
from framewise.server.jobs.redis_queue import RedisJobQueue
from framewise.server.settings import Settings
from framewise.server.video.synth import write_clip
from tests.live_support import KEY, MODEL, StandInEngine, data_url, sse, video_message, wait_for

HI = [{"role": "user", "content": "hi"}]
VISIBILITY_S = 30.0  # a job resumed "promptly" is done well before this


@pytest.fixture
def clips(tmp_path):
    short, long = tmp_path / "short.mp4", tmp_path / "long.mp4"
    write_clip(str(short), frames=12, fps=24)  # 0.5 s
    write_clip(str(long), frames=72, fps=24)  # 3 s: above queue_above_s
    return data_url(short.read_bytes()), data_url(long.read_bytes())


@pytest.fixture
def inproc(tc_llava_dir, tmp_path, redis_server):
    engine = StandInEngine(tc_llava_dir, steps=60, step_s=0.1)  # a job generates for ~6 s
    settings = Settings(model=str(tc_llava_dir), served_model_name=MODEL, api_keys=[KEY], decode_workers=1,
                        files_dir=str(tmp_path / "files"), redis_url=redis_server.url, consume=True,
                        job_heartbeat_s=0.5, job_visibility_timeout_s=VISIBILITY_S, queue_above_s=1.0,
                        queue_keepalive_s=0.2)
    app = create_app(settings, engine=engine)
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client, app.state.services, engine


def _queue_up(client) -> float:
    line = next(line for line in client.get("/metrics").text.splitlines() if line.startswith("framewise_queue_up "))
    return float(line.split()[1])


def _timed(fn):
    t0 = time.monotonic()
    r = fn()
    return r, time.monotonic() - t0


def _unavailable(r, elapsed: float) -> None:
    assert (r.status_code, r.json()["error"]["code"]) == (503, "queue_unavailable"), r.text
    assert int(r.headers["Retry-After"]) > 0
    assert elapsed < 2.0, elapsed


def test_a_redis_outage_spares_short_chats_and_loses_nothing(inproc, redis_server, clips):
    client, services, engine = inproc
    short, long = clips
    assert _queue_up(client) == 1
    running = client.post("/v1/jobs", json={"model": MODEL, "messages": HI, "max_tokens": 5}).json()["id"]
    wait_for(lambda: client.get(f"/v1/jobs/{running}").json()["progress"].get("stage") == "generating", 30,
             "the job to generate")
    follow: dict = {}

    def events():  # a client following the running job's events (TestClient returns it when it ends)
        follow["response"] = client.get(f"/v1/jobs/{running}/events")

    follower = threading.Thread(target=events)
    follower.start()
    time.sleep(1.0)  # it has read some events and blocks for more

    redis_server.kill()
    # short chats never touch Redis
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 2})
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2,
                                                  "messages": video_message(short, num_frames=2)})
    assert r.status_code == 200 and "job_id" not in r.json()["framewise"], r.text
    # the probes do not ask Redis
    assert client.get("/ready").status_code == 200 and client.get("/health").status_code == 200
    # job routes and a completion that would be queued: 503 queue_unavailable + Retry-After, within 2 s
    _unavailable(*_timed(lambda: client.post("/v1/jobs", json={"model": MODEL, "messages": HI})))
    _unavailable(*_timed(lambda: client.get(f"/v1/jobs/{running}")))
    _unavailable(*_timed(lambda: client.get("/v1/jobs")))
    _unavailable(*_timed(lambda: client.post("/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 2, "messages": video_message(long, num_frames=2)})))
    assert _queue_up(client) == 0
    # the events stream ended with an error event naming the job and where to resume
    follower.join(30)
    assert not follower.is_alive()
    got = sse(follow["response"].text)
    assert got[-1]["event"] == "error", got
    error = got[-1]["data"]
    assert error["error"]["code"] == "queue_unavailable" and error["job_id"] == running
    assert error["last_event_id"] == got[-2]["id"] and got[-2]["event"] in ("running", "generating")
    time.sleep(engine.steps * engine.step_s)  # the job's generation ends during the outage: its result waits

    redis_server.start()  # the same AOF
    restarted = time.monotonic()
    done = wait_for(lambda: (j := client.get(f"/v1/jobs/{running}").json()).get("status") == "succeeded" and j,
                    VISIBILITY_S, "the interrupted job to complete")
    assert time.monotonic() - restarted < VISIBILITY_S / 2  # its worker kept it: no visibility timeout waited
    assert done["attempts"] == 1 and done["error"] is None and done["result"]["choices"]
    q = services.jobs
    assert client.portal.call(q.completions, running) == 1
    # the follower resumes from the last event it got: the rest, then the end
    rest = sse(client.get(f"/v1/jobs/{running}/events", headers={"Last-Event-ID": error["last_event_id"]}).text)
    assert rest and rest[-1]["event"] == "done" and all(e["id"] > error["last_event_id"] for e in rest)
    assert _queue_up(client) == 1
    # and the queue works again: a job submitted now completes
    again = client.post("/v1/jobs", json={"model": MODEL, "messages": HI, "max_tokens": 2})
    assert again.status_code == 202
    wait_for(lambda: client.get(f"/v1/jobs/{again.json()['id']}").json()["status"] == "succeeded", 60,
             "a new job to complete")


def test_a_hung_redis_is_reported_within_2_s(inproc, redis_server):
    client, _, _ = inproc
    assert client.post("/v1/jobs", json={"model": MODEL, "messages": HI, "max_tokens": 2}).status_code == 202
    redis_server.proc.send_signal(signal.SIGSTOP)  # accepts connections (the kernel does), answers nothing
    try:
        _unavailable(*_timed(lambda: client.post("/v1/jobs", json={"model": MODEL, "messages": HI})))
        _unavailable(*_timed(lambda: client.get("/v1/jobs?limit=1")))
        assert client.get("/ready").status_code == 200
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 2})
        assert r.status_code == 200
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: client.post("/v1/jobs", json={"model": MODEL, "messages": HI}).status_code == 202, 30,
             "Redis to answer again")


def test_polls_never_read_the_request_back(inproc, redis_server, clips):
    """A job's request may hold a base64 video: GET /v1/jobs/{id} and listings read the public fields only."""
    client, _, _ = inproc
    _, long = clips
    job = client.post("/v1/jobs", json={"model": MODEL, "max_tokens": 2,
                                        "messages": video_message(long, num_frames=2)}).json()
    r = redis.Redis(port=redis_server.port, decode_responses=True)
    # done first: the worker (which reads the request, and heart-beats with HGETs) is idle while polls are counted
    wait_for(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded", 60, "the job")

    def request_reads() -> int:
        stats = r.info("commandstats")
        return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("hgetall", "hget"))

    before = request_reads()
    for _ in range(10):
        poll = client.get(f"/v1/jobs/{job['id']}").json()
        assert poll["id"] == job["id"] and poll["model"] == MODEL and "request" not in poll
    listed = client.get("/v1/jobs?limit=5").json()["data"]
    assert [j["model"] for j in listed if j["id"] == job["id"]] == [MODEL]
    assert request_reads() == before  # HMGET of the public fields: never the request
    assert len(r.hget(f"fw:job:{job['id']}", "request")) > 5_000  # (it is there, and big)


def test_a_success_drops_the_error_of_an_earlier_attempt(redis_server):
    import asyncio

    async def main():
        q = RedisJobQueue(redis_server.url, visibility_timeout_s=0.2)
        job, _ = await q.submit({"model": MODEL, "messages": HI})
        first = await q.claim("w1", block_s=1)
        assert await q.fail(first, {"code": "internal_error", "status": 500, "message": "boom"}, retry=True)
        assert (await q.get(job.id)).error["message"] == "boom"  # visible while it is retried
        await asyncio.sleep(0.4)
        second = await q.claim("w2", block_s=1)
        assert second.job.id == job.id and second.job.request["messages"] == HI  # a worker gets the request
        assert await q.complete(second, {"ok": True})
        done = await q.get(job.id)
        assert (done.status, done.error, done.attempts) == ("succeeded", None, 2)
        stages = [e["stage"] async for _, e in q.events(job.id)]
        assert stages[0] == "queued" and stages[-1] == "done" and stages.count("running") == 2
        await q.close()

    asyncio.run(main())
