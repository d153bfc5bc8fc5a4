"""Session-wide processes shared by every test module, each started on first use and only once.

- ``media_origin``: one loopback origin for every test's clips; a module writes into its own folder
  (``media_origin.folder("gateway")``), which serves the same routes (``slow``, ``big``, ``redirect``).
- ``gateway``: ``framewise serve`` on the TC-LLaVA demo checkpoint with the in-process job queue (the
  default configuration), small media limits, a 5 s queue threshold and the media folder as its local path.
- ``jobs_gateway``: ``framewise serve`` on a private Redis with a short request timeout; its jobs run on
  ``worker`` (a ``framewise worker`` on that Redis). The two gateways share one files directory: two
  replicas of one deployment.

Engine starts dominate the suite's time (20-60 s each on this 2-core machine), so a test that needs a
gateway takes one of these instead of starting its own; only tests that end a process (engine death,
SIGTERM) start their own. Tests leave the shared processes as they found them: idle (:func:`quiesce`).
Under ``make test``'s two lanes (tests/lanes.py) every test that takes one of them runs on lane 0, which alone
starts them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loadtests.servers import server_cpu
from tests.conftest import ROOT, shared_processes_starting
from tests.gateway_support import Gateway, MediaServer, free_port
from tests.redis_support import RedisServer

MODEL = "tc-llava"
KEY = "sk-test-framewise"
QUEUE_ABOVE_S = 5  # a clip longer than this runs as a job
REQUEST_TIMEOUT_S = 15.0  # jobs_gateway: small, yet far above what short requests take on a loaded 2-core VM


class MediaFolder:
    """One module's view of the session's media origin: files under ``root``, URLs under its folder."""

    def __init__(self, server: MediaServer, name: str):
        self.server, self.name = server, name
        self.root = server.root / name
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = server.port

    def url(self, name: str) -> str:
        return self.server.url(f"{self.name}/{name}")


class Media(MediaServer):
    def folder(self, name: str) -> MediaFolder:
        return MediaFolder(self, name)


@pytest.fixture(scope="session")
def media_origin(tmp_path_factory) -> Media:
    server = Media(tmp_path_factory.mktemp("media"))
    yield server
    server.close()


@pytest.fixture(scope="session")
def loadtest_clip_port() -> int:
    """The port the locust run's clip server will listen on (tests/test_loadtest.py): allowed by ``gateway``."""
    return free_port()


@pytest.fixture(scope="session")
def shared_files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared-files")


# engines that only carry the gateway's behaviour skip torch.compile (~10 s a start here); the session's
# `gateway`, the parity engines and the STAVE released engine keep vLLM's default compiled path, as served
EAGER = ("--enforce-eager",)


def gateway_args(media: Media, files: Path, *extra: str) -> tuple[str, ...]:
    return ("--served-model-name", MODEL, "--files-dir", str(files), "--max-video-mb", "4", "--max-upload-mb", "1",
            "--fetch-timeout-s", "5", "--decode-timeout-s", "20", "--max-duration-s", "3600",
            "--queue-above-s", str(QUEUE_ABOVE_S), "--allowed-local-media-path", str(media.root),
            "--range-reads-above-mb", "1", *extra)


@pytest.fixture(scope="session")
def _gateway(tc_llava_dir, media_origin, shared_files, loadtest_clip_port, tmp_path_factory) -> Gateway:
    media = media_origin
    gw = Gateway(tc_llava_dir, tmp_path_factory.mktemp("gateway"), api_key=KEY,
                 allowed_hosts=f"127.0.0.1:{media.port},127.0.0.1:{loadtest_clip_port}",
                 env={"FRAMEWISE_QUEUE_KEEPALIVE_S": "0.05"}, args=gateway_args(media, shared_files), pin=True,
                 ready_s=900, wait=False)
    gw.files_dir = shared_files
    yield gw
    gw.close()


@pytest.fixture(scope="session")
def gateway(_gateway) -> Gateway:
    return _gateway.wait_ready()


@pytest.fixture(scope="session")
def session_redis(tmp_path_factory) -> RedisServer:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.close()


class Worker:
    """``framewise worker`` processes on the session's Redis (engine pinned like the gateways)."""

    def __init__(self, model: Path, redis_url: str, media: Media, workdir: Path, files: Path):
        self.model, self.redis_url, self.media, self.workdir, self.files = model, redis_url, media, workdir, files
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str) -> tuple[subprocess.Popen, Path]:
        log_path = self.workdir / f"worker-{name}.log"
        cpu = ["taskset", "-c", str(server_cpu())]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [*cpu, sys.executable, "-m", "framewise.server.cli", "worker", "--model", str(self.model), "--served-model-name",
                 MODEL, "--redis-url", self.redis_url, "--files-dir", str(self.files), "--visibility-timeout-s", "10", "--heartbeat-s", "1",
                 "--concurrency", "2", "--allowed-media-hosts", f"127.0.0.1:{self.media.port}", "--grace-s", "2",
                 *EAGER],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "FRAMEWISE_FETCH_TIMEOUT_S": "5",
                     "FRAMEWISE_ALLOWED_LOCAL_MEDIA_PATH": str(self.media.root)})
        self.procs.append(proc)
        return proc, log_path

    def wait_ready(self, log_path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}; log: {log_path}")
            if "framewise worker ready" in log_path.read_text():
                return
            time.sleep(0.5)
        raise RuntimeError(f"worker not ready after {timeout:.0f} s; log: {log_path}")

    @staticmethod
    def stop(proc: subprocess.Popen) -> None:
        """SIGTERM (graceful), then nothing of its process group (engine core, helpers) is left."""
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def close(self) -> None:
        for proc in self.procs:
            self.stop(proc)


@pytest.fixture(scope="session")
def _workers(tc_llava_dir, session_redis, media_origin, shared_files, tmp_path_factory) -> Worker:
    w = Worker(tc_llava_dir, session_redis.url, media_origin, tmp_path_factory.mktemp("workers"), shared_files)
    w.start("main")
    yield w
    w.close()


@pytest.fixture(scope="session")
def workers(_workers) -> Worker:
    """The session's job workers: one started (``workers.procs[0]``); a test may start more."""
    proc = _workers.procs[0]
    _workers.wait_ready(_workers.workdir / "worker-main.log", proc, timeout=900)
    return _workers


@pytest.fixture(scope="session")
def _jobs_gateway(tc_llava_dir, media_origin, session_redis, shared_files, tmp_path_factory) -> Gateway:
    media = media_origin
    gw = Gateway(tc_llava_dir, tmp_path_factory.mktemp("jobs-gateway"), api_key=KEY,
                 allowed_hosts=f"127.0.0.1:{media.port}",
                 env={"REDIS_URL": session_redis.url, "FRAMEWISE_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
                      "FRAMEWISE_QUEUED_WAIT_S": str(REQUEST_TIMEOUT_S), "FRAMEWISE_QUEUE_KEEPALIVE_S": "0.5"},
                 # its fetch timeout above the request timeout: a slow origin meets the request's deadline
                 args=gateway_args(media, shared_files, *EAGER, "--fetch-timeout-s", str(4 * REQUEST_TIMEOUT_S)),
                 pin=True, ready_s=900, wait=False)
    gw.files_dir = shared_files
    yield gw
    gw.close()


@pytest.fixture(scope="session")
def jobs_gateway(_jobs_gateway) -> Gateway:
    """Jobs go to Redis (a worker runs them); requests, and waits on queued completions, end after
    ``REQUEST_TIMEOUT_S``."""
    return _jobs_gateway.wait_ready()


SHARED = {"gateway": "_gateway", "jobs_gateway": "_jobs_gateway", "workers": "_workers"}


@pytest.fixture(scope="session")
def docker_build():
    """The private Docker engine and the images (tests/docker_support.py), built in a background thread."""
    from tests.docker_support import DockerBuild

    build = DockerBuild()
    yield build
    with shared_processes_starting():
        build.close()


@pytest.fixture(scope="session", autouse=True)
def _start_shared_processes_early(request):
    """The shared processes the selected tests will use start before the first test, pinned to one CPU: their
    engines load (30-60 s each) while the tests that need none run on the other CPU. The Docker build
    (downloads, mostly) starts too when Docker tests are selected; they run last (under lanes: after the
    shared processes' tests, on lane 0)."""
    from tests.lanes import group_of, runs_here

    items = [item for item in request.session.items if runs_here(group_of(item), request.config)]  # this lane's
    if any(item.get_closest_marker("docker") for item in items):
        request.getfixturevalue("docker_build")
    needed = {name for item in items for name in SHARED if SHARED[name] in item.fixturenames}
    with shared_processes_starting():
        for name in SHARED:
            if name in needed:
                request.getfixturevalue(SHARED[name])


def metric(gw: Gateway, prefix: str) -> float:
    return sum(v for k, v in gw.metrics().items() if k.startswith(prefix))


def quiesce(gw: Gateway, timeout: float = 120) -> None:
    """Waits until the gateway's engine runs and queues nothing, no chat request is in flight and no job waits:
    what one module leaves running must not count in the next one's numbers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = gw.metrics()
        busy = [name for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                                  "framewise_requests_in_flight", "framewise_job_queue_depth")
                if sum(v for k, v in m.items() if k.startswith(name))]
        if not busy:
            return
        time.sleep(0.2)
    raise AssertionError(f"{gw.base_url} still busy after {timeout:.0f} s")


def chat(gw: Gateway, body: dict, timeout: float = 120, **headers) -> httpx.Response:
    return httpx.post(f"{gw.base_url}/v1/chat/completions", json={"model": MODEL, **body},
                      headers={**gw.headers, **headers}, timeout=timeout)


@pytest.fixture(autouse=True)
def _leave_shared_gateways_idle(request):
    """After each test that used a shared gateway: it is idle again (nothing of this test counts in the next)."""
    used = [request.getfixturevalue(n) for n in ("_gateway", "_jobs_gateway") if n in request.fixturenames]
    yield
    for gw in used:
        if gw.ready and gw.proc.poll() is None:
            quiesce(gw)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A test that takes a shared engine process must be marked ``engine`` (the marker guard cannot see it:
    the process was started early, outside the test)."""
    used = [name for name in SHARED if SHARED[name] in item.fixturenames]
    if used and item.get_closest_marker("engine") is None:
        pytest.fail(f"{item.nodeid} uses {used} (a vLLM engine) without @pytest.mark.engine", pytrace=False)
