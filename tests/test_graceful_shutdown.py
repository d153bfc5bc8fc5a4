"""Gateway shutdown (SIGTERM, as Kubernetes and Compose send it): the listening socket closes at once, an
in-flight stream runs to its end within --drain-timeout-s, then the process exits cleanly."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import ROOT
from tests.gateway_support import free_port

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]

def _start_gateway(model, workdir):
    """A real `framewise serve` (own process group, pinned like tests.gateway_support.Gateway); engine start
    takes minutes on a loaded machine, hence the long readiness budget."""
    port = free_port()
    log = open(workdir / "gateway.log", "w")  # noqa: SIM115 - closed by the test
    cpu = ["taskset", "-c", str(max(os.sched_getaffinity(0)))]
    proc = subprocess.Popen(
        [*cpu, sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--port", str(port),
         "--served-model-name", "m", "--files-dir", str(workdir / "files"), "--drain-timeout-s", "60"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while time.time() < deadline:
        assert proc.poll() is None, f"gateway exited; log: {workdir / 'gateway.log'}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return proc, base, log
        time.sleep(1)
    raise AssertionError(f"gateway not ready; log: {workdir / 'gateway.log'}")


def test_sigterm_drains_in_flight_stream_then_exits(tc_llava_dir, tmp_path):
    proc, base, log = _start_gateway(tc_llava_dir, tmp_path)
    try:
        body = {"model": "m", "stream": True, "max_tokens": 400, "ignore_eos": True, "temperature": 0,
                "messages": [{"role": "user", "content": "Count."}]}
        first = threading.Event()
        events: list[dict] = []
        done: list[bool] = []

        def consume():
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body,
                              timeout=120) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done.append(True)
                    elif line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                        first.set()

        t = threading.Thread(target=consume)
        t.start()
        assert first.wait(120), "no first chunk"
        os.kill(proc.pid, signal.SIGTERM)  # the main process only, as tini/kubelet do
        # stop accepting: a new connection is refused while the stream still runs
        refused = False
        for _ in range(50):
            try:
                httpx.get(f"{base}/health", timeout=2)
            except httpx.ConnectError:
                refused = True
                break
            time.sleep(0.1)
        assert refused, "the gateway still accepted connections after SIGTERM"
        assert t.is_alive(), "the stream ended before the listener closed: make it longer"
        t.join(600)
        assert done == [True], "the in-flight stream was cut"
        tokens = sum(1 for e in events if e.get("choices") and e["choices"][0]["delta"].get("content"))
        finish = [e["choices"][0]["finish_reason"] for e in events if e.get("choices")
                  and e["choices"][0].get("finish_reason")]
        assert finish == ["length"] and tokens >= 100, (finish, tokens)
        # uvicorn re-raises the SIGTERM it handled once shutdown is complete: exit status -15 (143 in a container)
        assert proc.wait(90) in (0, -signal.SIGTERM)
        log.flush()
        assert "Application shutdown complete" in (tmp_path / "gateway.log").read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
