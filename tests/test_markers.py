"""The marker guard (tests/conftest.py): a test that starts an engine, a gateway, a worker or Docker
without its marker fails before the process exists."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, process_kind


@pytest.mark.parametrize("argv, kind", [
    ([sys.executable, "-m", "framewise.server.cli", "serve", "--model", "m"], "engine"),
    (["taskset", "-c", "1", sys.executable, "-m", "framewise.server.cli", "worker", "--redis-url", "r"], "engine"),
    (["framewise", "demo", "--model", "m"], "engine"),
    ([sys.executable, "tests/engine_server.py", "--model", "m"], "engine"),
    ([sys.executable, "bench/serve_e2e.py", "--quick"], "engine"),
    ([sys.executable, "-m", "loadtests.run", "--host", "h"], "engine"),
    (["vllm", "serve", "m"], "engine"),
    (["taskset", "-c", "1", "make", "-s", "serve", "DEMO_MODEL=m", "SERVE_ARGS=--port 1"], "engine"),
    (["make", "setup"], None),
    (["/usr/bin/docker", "compose", "up"], "docker"),
    (["docker-compose", "-f", "c.yaml", "up", "-d"], "docker"),
    (["bash", "scripts/docker_env.sh", "start", "/tmp/d"], "docker"),
    ([sys.executable, "-m", "framewise.server.cli", "demo-model", "--arch", "tc-llava"], None),
    ([sys.executable, "-m", "framewise.server.cli", "worker", "--help"], None),
    (["docker-compose", "-f", "c.yaml", "config"], None),
    (["bash", "scripts/docker_env.sh", "install"], None),
    (["redis-server", "--port", "1"], None),
    (["ffmpeg", "-i", "x.mp4"], None),
])
def test_commands_are_classified(argv, kind):
    assert process_kind(argv) == kind


def test_an_unmarked_test_cannot_start_an_engine():
    # harmless if it ran (`python -c pass`), but it names the test engine server: refused before spawning
    with pytest.raises(RuntimeError, match=r"without @pytest.mark.engine"):
        subprocess.Popen([sys.executable, "-c", "pass", "engine_server.py"])
    with pytest.raises(RuntimeError, match=r"without @pytest.mark.docker"):
        subprocess.run(["docker", "version"], capture_output=True)
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0  # anything else runs


def test_a_test_taking_a_shared_engine_must_be_marked(pytester, monkeypatch):
    """tests/stack.py refuses an unmarked test that takes a shared gateway (started early, outside any test)."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeconftest("pytest_plugins = ['tests.stack']\n")
    pytester.makepyfile(test_x="""
import pytest

@pytest.fixture(scope="session")
def _gateway():  # a stand-in: no engine is started here
    yield object()

def test_unmarked(gateway):
    pass
""")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-m", "not engine")
    result.assert_outcomes(errors=1)
    assert "uses ['gateway'] (a vLLM engine) without @pytest.mark.engine" in result.stdout.str()
