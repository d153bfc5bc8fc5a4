"""Every command in the README's shell blocks is run by a test: the cheap ``make`` ones here, exactly as written
(``make test-docker`` and ``make test-fast`` bare with ``--collect-only`` added: their tests run in ``make
test``, which is CI itself); the rest by the tests named in ``RUN_BY``, which take the command from the README:
``make serve`` with the ``framewise serve`` example's flags and the Python example (tests/test_real_shapes.py),
``docker build`` and ``docker compose up`` (tests/docker_support.py, tests/test_deploy_docker.py). ``kubectl
apply -k`` needs a cluster: its overlay is rendered with ``kubectl kustomize`` and validated
(tests/test_deploy_k8s.py), and its gateway/worker containers run under Docker (tests/test_deploy_docker.py)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import ROOT
from tests.docker_support import readme_deploy
from tests.test_deploy_k8s import OVERLAYS
from tests.test_real_shapes import readme_blocks

RUN_HERE = ("make lint", "make test-fast", "make test-docker")
RUN_BY = {  # command: (the file that runs it, a word it uses to)
    "make test": (".ci/run", "make test"),  # CI's entry point is this command
    "make serve": ("tests/test_real_shapes.py", "make_serve="),
    "framewise serve": ("tests/test_real_shapes.py", "readme_serve_args"),
    "docker build": ("tests/docker_support.py", 'readme_deploy()["docker build"]'),
    "docker compose": ("tests/test_deploy_docker.py", 'readme_deploy()["docker compose"]'),
    "kubectl apply": ("tests/test_deploy_k8s.py", '"kustomize"'),  # `apply -k` renders the same; no cluster
}


def readme_commands() -> list[list[str]]:
    """Each command line of the README's ``bash`` blocks as words (continuations joined, comments dropped)."""
    out = []
    for body in readme_blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            if words := shlex.split(line, comments=True):
                out.append(words)
    return out


def command_name(words: list[str]) -> str:
    return " ".join([w for w in words if not re.match(r"^\w+=", w)][:2])


def make(*words: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS", "PYTEST_"))}
    return subprocess.run(list(words), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def collected(out: str) -> set[str]:
    return {line for line in out.splitlines() if "::" in line and line.startswith("tests/")}


def test_every_readme_command_is_run_somewhere():
    commands = readme_commands()
    names = {command_name(w) for w in commands}
    assert {"make serve", "make test", "make lint", "docker build", "kubectl apply"} <= names  # the parse works
    unknown = names - set(RUN_HERE) - set(RUN_BY)
    assert not unknown, f"README commands no test runs: {sorted(unknown)} (add them to RUN_HERE or RUN_BY)"
    for name, (path, evidence) in RUN_BY.items():
        assert name in names, f"{name!r} is no longer in the README: drop it from RUN_BY"
        assert evidence in (ROOT / path).read_text(), (name, path)
    assert "make test" in (ROOT / ".ci" / "run").read_text().splitlines()
    deploy = readme_deploy()
    assert deploy["kubectl"][:3] == ["kubectl", "apply", "-k"]
    assert deploy["kubectl"][3] in {f"deploy/k8s/overlays/{o}" for o in OVERLAYS}


def test_the_make_commands_run_as_written():
    """``make lint`` and the README's ``make test-fast PYTEST_ARGS=...`` example, verbatim; ``make test-fast`` and
    ``make test-docker`` collect what the README says (on a Docker, an engine and a fast test file): the first
    no Docker and no engine test, the second only the Docker tests."""
    commands = [w for w in readme_commands() if command_name(w) in RUN_HERE]
    verbatim = [w for w in commands if w == ["make", "lint"] or any(x.startswith("PYTEST_ARGS=") for x in w)]
    assert len(verbatim) == 2, verbatim
    targets = sorted({w[1] for w in commands if len(w) == 2 and w[1] in ("test-fast", "test-docker")})
    assert targets == ["test-docker", "test-fast"], commands
    # the selection on three files (collecting the whole suite twice cost a minute): one Docker, one engine,
    # one fast; the test files' markers are what test_markers.py holds every test to
    sample = "tests/test_deploy_docker.py tests/test_vllm_tc_llava.py tests/test_sampling_rules.py"
    bare = [["make", "-s", t, f"PYTEST_ARGS=--collect-only -q -p no:cacheprovider {sample}"] for t in targets]
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda w: make(*w), verbatim + bare))
    for words, r in zip(verbatim + bare, runs, strict=True):
        assert r.returncode == 0, f"{shlex.join(words)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}"
    example = runs[[i for i, w in enumerate(verbatim) if w != ["make", "lint"]][0]]
    assert re.search(r"\b\d+ passed\b", example.stdout) and " failed" not in example.stdout, example.stdout[-2000:]
    docker, fast = (collected(r.stdout) for r in runs[2:])
    assert docker and all(t.startswith("tests/test_deploy_docker.py::") for t in docker), sorted(docker)[:5]
    assert fast and not fast & docker
    assert all(t.startswith("tests/test_sampling_rules.py::") for t in fast), sorted(fast)[:5]
