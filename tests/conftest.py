"""Shared fixtures (tiny checkpoints, session-wide engines and gateways: tests/stack.py) and the marker guard.

The guard: every subprocess a test starts is classified (a vLLM engine, a gateway or a worker: ``engine``;
the Docker client or daemon: ``docker``) and refused, failing the test, unless the test that caused it
(its own code or a fixture it requested) carries that marker. ``make test-fast`` (``-m "not engine and not
docker"``) therefore never starts an engine, and a new test cannot silently make it slow.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Listener
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ["tests.stack"]

# ---- the marker guard ----------------------------------------------------------------------------------

_running: list[pytest.Item | None] = [None]  # the test whose setup, call or teardown runs now
ENGINE_COMMANDS = ("serve", "worker", "demo")  # `framewise <command>` that starts a vLLM engine
MAKE_ENGINE_TARGETS = ("serve", "demo", "loadtest", "chaos")  # `make <target>` that starts an engine
ENGINE_SCRIPTS = ("engine_server.py", "serve_e2e.py", "gateway_stages.py", "loadtests.run", "loadtests.chaos")


def process_kind(argv) -> str | None:
    """``engine`` / ``docker`` for a command line that starts one, else None."""
    words = [str(a) for a in ([argv] if isinstance(argv, str | bytes | os.PathLike) else argv)]
    if len(words) == 1:
        words = words[0].split()
    names = [os.path.basename(w) for w in words]
    if "--help" in names or "-h" in names:
        return None
    if any(n in ("docker", "dockerd", "containerd") for n in names):
        return "docker"
    if "docker-compose" in names and "config" not in names:  # `config` only validates the file
        return "docker"
    if "docker_env.sh" in names and ("start" in names or "base" in names):  # a private dockerd
        return "docker"
    if any(n in ENGINE_SCRIPTS or w in ENGINE_SCRIPTS for n, w in zip(names, words, strict=True)):
        return "engine"
    if "make" in names and any(n in MAKE_ENGINE_TARGETS for n in names[names.index("make") + 1:]):
        return "engine"
    for i, n in enumerate(names):
        if n == "framewise.server.cli" or n == "framewise" or (n == "vllm" and i + 1 < len(names) and names[i + 1] == "serve"):
            rest = [w for w in names[i + 1:] if not w.startswith("-")]
            if rest and rest[0] in ENGINE_COMMANDS:
                return "engine"
        if n == "vllm.entrypoints.openai.api_server":
            return "engine"
    return None


_starting = threading.local()


@contextlib.contextmanager
def shared_processes_starting():
    """For tests/stack.py only: the session's shared processes start early, in this thread (before the first
    test that needs them, which carries the marker, or in a background thread); the guard does not hold them
    against the test running meanwhile."""
    _starting.on = True
    try:
        yield
    finally:
        _starting.on = False


def _guard(event: str, args: tuple) -> None:
    if event != "subprocess.Popen":
        return
    item = _running[0]
    if getattr(_starting, "on", False):
        return
    kind = process_kind(args[1] if args[1] is not None else args[0])
    if item is None or kind is None or item.get_closest_marker(kind) is not None:
        return
    raise RuntimeError(f"{item.nodeid} starts a {kind} process ({args[1]!r}) without @pytest.mark.{kind}: "
                       f"mark it (make test-fast must never start one)")


sys.addaudithook(_guard)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    """Tests without an engine first, then engine tests, then those that end a shared process (``ends_shared``),
    Docker last (each group in file order): the shared engines (tests/stack.py) load on one CPU while the fast
    tests run on the other, and no test finds a shared process another test ended. Under ``-n`` each test also
    gets its lane group (tests/lanes.py): ``stack``, ``docker`` or its module."""
    def group(item) -> int:
        if item.get_closest_marker("docker"):
            return 3
        if item.get_closest_marker("ends_shared"):
            return 2
        return 1 if item.get_closest_marker("engine") else 0

    items[:] = sorted(items, key=group)  # stable
    if hasattr(config, "workerinput") and os.environ.get("FRAMEWISE_LANE_GROUPS"):
        from tests.lanes import write_groups

        write_groups(items, config)


def pytest_configure(config):
    """Under ``-n`` (tests/lanes.py): the controller names the file where workers leave each test's group; a
    worker puts its lane's engines on the lane's CPU (``FRAMEWISE_SERVER_CPU``, read by every helper that pins a
    server: tests/gateway_support.py, tests/stack.py, EngineHandle, loadtests/servers.py)."""
    from tests.lanes import engine_cpu, this_lane

    lane = this_lane(config)
    if lane is not None:
        os.environ["FRAMEWISE_SERVER_CPU"] = str(engine_cpu(lane[0], sorted(os.sched_getaffinity(0))))
    elif getattr(config.option, "numprocesses", None):  # the controller
        fd, path = tempfile.mkstemp(prefix="framewise-lanes-", suffix=".json")
        os.close(fd)
        os.environ["FRAMEWISE_LANE_GROUPS"] = config._lane_groups = path


def pytest_unconfigure(config):
    if getattr(config, "_lane_groups", None):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config._lane_groups)


def pytest_xdist_make_scheduler(config, log):
    from tests.lanes import LaneScheduling

    return LaneScheduling(config, log)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running[0] = item
    yield
    _running[0] = None


class EngineError(RuntimeError):
    def __init__(self, type_name: str, message: str):
        super().__init__(f"{type_name}: {message}")
        self.type_name, self.message = type_name, message


class EngineHandle:
    """A vLLM engine in a subprocess (tests/engine_server.py)."""

    def __init__(self, model: str, log_path: Path, **engine_args):
        self._dir = tempfile.mkdtemp(prefix="fw-engine-")
        address = os.path.join(self._dir, "sock")
        key = secrets.token_bytes(16)
        listener = Listener(address, authkey=key)
        self.log = open(log_path, "w")  # noqa: SIM115 - lives as long as the engine
        # under lanes (tests/lanes.py) on the lane's CPU; else vLLM binds it to a core of its choosing
        pin = ["taskset", "-c", os.environ["FRAMEWISE_SERVER_CPU"]] if "FRAMEWISE_SERVER_CPU" in os.environ else []
        self.proc = subprocess.Popen(
            [*pin, sys.executable, str(ROOT / "tests" / "engine_server.py"), "--address", address,
             "--authkey", key.hex(), "--model", model, "--engine-args", json.dumps(engine_args)],
            cwd=self._dir,  # never a directory holding a folder named like the package
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.conn = listener.accept()
        listener.close()
        msg = self.conn.recv()
        if msg[0] != "ready":
            self.close()
            raise EngineError(msg[1], f"{msg[2]} (log: {log_path})")

    def generate(self, prompts: list[dict], params: list[dict] | dict) -> list[dict]:
        if isinstance(params, dict):
            params = [params] * len(prompts)
        self.conn.send(("generate", prompts, params))
        msg = self.conn.recv()
        if msg[0] == "error":
            raise EngineError(msg[1], msg[2])
        return msg[1]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(("stop",))
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        # the whole process group: engine core and multiprocessing helpers included
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def cli(*args: str) -> subprocess.CompletedProcess:
    """``framewise ARGS`` in this process (``server.cli.main``; no interpreter start, ~7 s here): its exit status,
    stdout and stderr. For commands that start no engine; the installed console script itself is run by
    tests/test_cli_and_convert.py::test_selfcheck_cli."""
    import io

    from framewise.server.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's refusals
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["framewise", *args], code, out.getvalue(), err.getvalue())


def variant_checkpoint(base: Path, out: Path, **config_changes) -> Path:
    """The same weights and tokenizer with some config.json values changed."""
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.name != "config.json":
            os.link(f, out / f.name)
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(config_changes)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


@pytest.fixture(scope="session")
def tc_llava_dir(tmp_path_factory) -> Path:
    from framewise.model_plugins.reference.demo_checkpoint import write_demo_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tc-llava"
    write_demo_checkpoint("tc-llava", str(out))
    return out


@pytest.fixture(scope="session")
def plain_llava_dir(tc_llava_dir, tmp_path_factory) -> Path:
    """gamma = 0, frame mask off: LLaVA-1.5 semantics on the same weights."""
    return variant_checkpoint(tc_llava_dir, tmp_path_factory.mktemp("ckpt") / "plain",
                              temporal_rope_gamma=0.0, frame_block_mask=False)


@pytest.fixture(scope="session")
def tokenizer(tc_llava_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tc_llava_dir)


@pytest.fixture(scope="session")
def reference(tc_llava_dir):
    from framewise.model_plugins.reference.tc_llava import TCLlavaReference

    return TCLlavaReference.from_pretrained(str(tc_llava_dir))


def _engine(model: Path, tmp_path_factory, name: str, **kw):
    log = tmp_path_factory.mktemp("logs") / f"{name}.log"
    handle = EngineHandle(str(model), log, max_model_len=2048, seed=0, **kw)
    yield handle
    handle.close()


def _redis(root: Path):
    from tests.redis_support import RedisServer

    server = RedisServer(root)
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.proc.send_signal(signal.SIGCONT)  # a test may leave it stopped (SIGSTOP: a hung Redis)
    server.close()


@pytest.fixture
def redis_server(tmp_path_factory):
    """A private ``redis-server`` for this test (its own port and dir: the test may kill, stop or restart it)."""
    yield from _redis(tmp_path_factory.mktemp("redis"))


@pytest.fixture(scope="module")
def module_redis_server(tmp_path_factory):
    """A private ``redis-server`` shared by one module's tests."""
    yield from _redis(tmp_path_factory.mktemp("redis"))


@pytest.fixture(scope="module")
def tc_engine(tc_llava_dir, tmp_path_factory):
    """TC-LLaVA (gamma 1, frame mask on) with prefix caching on, compiled as served (the other test engines are
    eager: torch.compile costs ~10 s a start here and is exercised by this one and the session gateway)."""
    yield from _engine(tc_llava_dir, tmp_path_factory, "tc", enable_prefix_caching=True)


@pytest.fixture(scope="module")
def plain_engine(plain_llava_dir, tmp_path_factory):
    yield from _engine(plain_llava_dir, tmp_path_factory, "plain", enable_prefix_caching=False, enforce_eager=True)


def random_video(num_frames: int, seed: int, size: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8)
