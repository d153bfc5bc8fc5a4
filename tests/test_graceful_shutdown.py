"""Gateway shutdown (SIGTERM, as Kubernetes and Compose send it, in a rolling deploy), with a real engine and the
session's Redis and worker:

- the listening socket closes at once; an in-flight stream runs to its end within ``--drain-timeout-s``;
- a client waiting on a queued completion (its job runs on a worker) is told the job's id at once, and the job
  is not cancelled: it succeeds once and its result is read through another gateway (``jobs_gateway``, the
  replica that replaces this one);
- the process then exits cleanly and no process it started (engine core, decode workers) survives it.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import psutil
import pytest

from framewise.server.video.synth import write_clip
from tests.gateway_support import Gateway
from tests.live_support import wait_for
from tests.stack import EAGER, KEY, MODEL, gateway_args

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]


def test_sigterm_drains_streams_keeps_jobs_then_exits(tc_llava_dir, media_origin, session_redis, shared_files, workers,
                                                      jobs_gateway, tmp_path):
    media = media_origin
    folder = media.folder("shutdown")
    write_clip(str(folder.root / "long.mp4"), frames=150, fps=24)  # 6.25 s: above --queue-above-s
    gw = Gateway(tc_llava_dir, tmp_path, api_key=KEY, allowed_hosts=f"127.0.0.1:{media.port}",
                 env={"REDIS_URL": session_redis.url, "FRAMEWISE_QUEUE_KEEPALIVE_S": "0.5"},
                 args=gateway_args(media, shared_files, "--drain-timeout-s", "60", *EAGER), pin=True, ready_s=900)
    try:
        first = threading.Event()
        events: list[dict] = []
        done: list[bool] = []
        answer: dict = {}

        def stream():
            body = {"model": MODEL, "stream": True, "max_tokens": 400, "ignore_eos": True, "temperature": 0,
                    "messages": [{"role": "user", "content": "Count."}]}
            with httpx.stream("POST", f"{gw.base_url}/v1/chat/completions", json=body, headers=gw.headers,
                              timeout=120) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done.append(True)
                    elif line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                        first.set()

        def queued():
            answer["r"] = httpx.post(f"{gw.base_url}/v1/chat/completions", headers=gw.headers, timeout=300, json={
                "model": MODEL, "max_tokens": 1500, "ignore_eos": True,
                "messages": [{"role": "user", "content": [
                    {"type": "video_url", "video_url": {"url": folder.url("long.mp4"), "num_frames": 2}},
                    {"type": "text", "text": "What happens?"}]}]})

        before = {j["id"] for j in httpx.get(f"{jobs_gateway.base_url}/v1/jobs?limit=100",
                                              headers=jobs_gateway.headers, timeout=10).json()["data"]}
        waiter = threading.Thread(target=queued)
        waiter.start()

        def generating() -> str | None:
            for j in httpx.get(f"{jobs_gateway.base_url}/v1/jobs?limit=5", headers=jobs_gateway.headers,
                               timeout=10).json()["data"]:
                if j["id"] not in before and j["progress"].get("stage") == "generating":
                    return j["id"]
            return None

        job_id = wait_for(generating, 300, "the queued completion's job to generate on the worker", every=0.2)
        streamer = threading.Thread(target=stream)
        streamer.start()
        assert first.wait(120), "no first chunk"
        family = [gw.proc.pid] + [c.pid for c in psutil.Process(gw.proc.pid).children(recursive=True)]
        assert len(family) >= 4  # the engine core and the decode workers at least
        gw.proc.send_signal(signal.SIGTERM)  # the main process only, as tini/kubelet do
        stopped = time.monotonic()

        # stop accepting: a new connection is refused while the stream still runs
        refused = False
        for _ in range(50):
            try:
                httpx.get(f"{gw.base_url}/health", timeout=2)
            except httpx.ConnectError:
                refused = True
                break
            time.sleep(0.1)
        assert refused, "the gateway still accepted connections after SIGTERM"
        # the waiting client is answered at once with the job to poll; the job goes on
        waiter.join(60)
        r = answer["r"]
        assert time.monotonic() - stopped < 30
        error = r.json()["error"]
        assert (r.status_code, error["code"], error["job_id"]) == (503, "gateway_shutdown", job_id), r.text
        assert r.headers["Location"] == f"/v1/jobs/{job_id}"
        assert streamer.is_alive(), "the stream ended before the listener closed: make it longer"
        streamer.join(600)
        assert done == [True], "the in-flight stream was cut"
        tokens = sum(1 for e in events if e.get("choices") and e["choices"][0]["delta"].get("content"))
        finish = [e["choices"][0]["finish_reason"] for e in events if e.get("choices")
                  and e["choices"][0].get("finish_reason")]
        assert finish == ["length"] and tokens >= 100, (finish, tokens)
        # uvicorn re-raises the SIGTERM it handled once shutdown is complete: exit status -15 (143 in a container)
        assert gw.proc.wait(90) in (0, -signal.SIGTERM)
        gw.log.flush()
        assert "Application shutdown complete" in gw.log_path.read_text()
        _, alive = psutil.wait_procs([psutil.Process(p) for p in family if psutil.pid_exists(p)], timeout=20)
        assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []

        # the job was not cancelled: it succeeds once, and the other gateway has its result
        final = wait_for(lambda: (j := httpx.get(f"{jobs_gateway.base_url}/v1/jobs/{job_id}",
                                                 headers=jobs_gateway.headers, timeout=10).json())["status"]
                         in ("succeeded", "failed", "cancelled") and j, 600, "the job to end", every=0.5)
        assert final["status"] == "succeeded" and final["error"] is None, final
        assert final["result"]["usage"]["completion_tokens"] == 1500
        assert final["attempts"] == 1
    finally:
        gw.close()
