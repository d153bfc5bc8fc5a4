"""The image, `docker compose up` and the Kubernetes container specs, run under a real Docker engine.

Everything happens under one temp dir: a private ``dockerd`` (its own data-root, exec-root, pidfile, socket and
bridge, started and stopped by PID through ``scripts/docker_env.sh``), a Debian bookworm base image made with
debootstrap (no registry is reachable), the image built from ``./Dockerfile``, stand-in ``redis`` and
``prometheus`` images built FROM that base with Debian's real ``redis-server`` / ``prometheus``. Teardown
removes the containers, volumes, images and build cache, stops that ``dockerd`` and deletes the dir.

``FRAMEWISE_DOCKER_DIR=/some/dir`` (development only) keeps the engine, images and cache there between runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT
from tests.gateway_support import free_port
from tests.test_deploy_k8s import _used_metric_names, by_kind, render

pytestmark = [pytest.mark.docker, pytest.mark.timeout(5400)]

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

    def build(self, tag: str, context: Path, *extra: str, timeout: float = 2400) -> None:
        log = self.root / f"build-{tag.replace('/', '_').replace(':', '_')}.log"
        with open(log, "w") as f:
            rc = subprocess.run(["nice", "-n", "10", DOCKER, "build", "--progress=plain", "-t", tag, *extra,
                                 str(context)], env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        assert rc == 0, f"docker build {tag} failed; tail of {log}:\n" + log.read_text()[-4000:]
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


def _ca_bundle() -> str | None:
    for path in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if path and Path(path).is_file():
            return path
    return None


@pytest.fixture(scope="module")
def docker():
    keep_dir = os.environ.get("FRAMEWISE_DOCKER_DIR")
    root = Path(keep_dir) if keep_dir else Path(tempfile.mkdtemp(prefix="fwdock-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["bash", SCRIPT, "install"], check=True, timeout=900)
    d = Docker(root, keep=bool(keep_dir))
    if subprocess.run([DOCKER, "version"], env=d.env, capture_output=True).returncode != 0:
        subprocess.run(["bash", SCRIPT, "start", str(root)], check=True, timeout=120)
    try:
        subprocess.run(["nice", "-n", "10", "bash", SCRIPT, "base", str(root), BASE], check=True, timeout=900)
        yield d
    finally:
        if not d.keep:
            for image in d.images:
                d.run("rmi", "-f", image, check=False)
            d.run("rmi", "-f", BASE, check=False)
            d.run("builder", "prune", "-af", check=False, timeout=600)
            d.run("system", "prune", "-af", "--volumes", check=False, timeout=600)
            subprocess.run(["bash", SCRIPT, "stop", str(root)], timeout=120)
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def image(docker: Docker) -> str:
    ctx = docker.root / "context"
    shutil.rmtree(ctx, ignore_errors=True)
    ctx.mkdir()
    _stage_context(ctx)
    tag = "framewise:test"
    args = ["--build-arg", f"BASE_IMAGE={BASE}"]
    if (ctx / "wheelhouse").is_dir():
        args += ["--build-arg", "TORCH_INDEX="]
    if _ca_bundle():
        args += ["--secret", f"id=ca_bundle,src={_ca_bundle()}"]
    docker.build(tag, ctx, *args)
    return tag


@pytest.fixture(scope="module")
def standins(docker: Docker) -> dict[str, str]:
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
    return out


SLOW_MEDIA_SERVER = """
import http.server, time
class H(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **kw):
        super().__init__(*a, directory="/media", **kw)
    def do_GET(self):
        if self.path.startswith("/slow/"):  # /slow/NAME answers NAME after 20 s: a job that stays running
            time.sleep(20)
            self.path = self.path[len("/slow"):]
        return super().do_GET()
http.server.ThreadingHTTPServer(("", 8080), H).serve_forever()
"""


@pytest.fixture(scope="module")
def shared(docker: Docker, tc_llava_dir: Path) -> dict[str, Path]:
    """The demo checkpoint and a clip, readable by the image's non-root user."""
    from server.video.synth import write_clip

    base = docker.root / "shared"
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(tc_llava_dir, base / "model")
    (base / "media").mkdir()
    write_clip(str(base / "media" / "clip.mp4"), frames=24, fps=8, width=96, height=72)
    (base / "media" / "serve.py").write_text(SLOW_MEDIA_SERVER)
    for p in [base, *base.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return {"model": base / "model", "media": base / "media", "clip": base / "media" / "clip.mp4"}


def _wait(what: str, fn, timeout: float, interval: float = 2.0):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - reported on timeout
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} ({last!r})")


class Stack:
    def __init__(self, docker: Docker, project: str, files: list[Path], env: dict):
        self.docker, self.project, self.files = docker, project, files
        self.env = {**docker.env, **env}

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        cmd = ["docker-compose", "-p", self.project]
        for f in self.files:
            cmd += ["-f", str(f)]
        out = subprocess.run([*cmd, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed:\n{out.stderr[-4000:]}")
        return out.stdout

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).split()

    def prom(self, path: str, **params) -> dict:
        r = httpx.get(f"http://127.0.0.1:{self.env['PROMETHEUS_PORT']}{path}", params=params, timeout=10)
        r.raise_for_status()
        return r.json()["data"]

    def query(self, q: str) -> list[dict]:
        return self.prom("/api/v1/query", query=q)["result"]


@pytest.fixture(scope="class")
def stack(docker: Docker, image: str, standins: dict, shared: dict, tmp_path_factory):
    work = tmp_path_factory.mktemp("compose")
    override = work / "compose.test.yaml"
    override.write_text(yaml.safe_dump({"services": {
        "redis": {"image": standins["redis"]},
        "prometheus": {"image": standins["prometheus"]},
        "gateway": {"environment": {"FRAMEWISE_ALLOWED_MEDIA_HOSTS": "media"}},
        "worker": {"environment": {"FRAMEWISE_JOB_VISIBILITY_TIMEOUT_S": "10", "FRAMEWISE_ALLOWED_MEDIA_HOSTS": "media"}},
        # the test's video, served from inside the compose network
        "media": {"image": image, "entrypoint": ["python3", "/media/serve.py"],
                  "volumes": [f"{shared['media']}:/media:ro"], "healthcheck": {"disable": True}},
    }}))
    project = f"fwtest{uuid.uuid4().hex[:6]}"
    s = Stack(docker, project, [ROOT / "deploy" / "compose.yaml", override], {
        "FRAMEWISE_IMAGE": image, "FRAMEWISE_MODEL_DIR": str(shared["model"]), "FRAMEWISE_PORT": str(free_port()),
        "PROMETHEUS_PORT": str(free_port()), "FRAMEWISE_KVCACHE_GB": "1", "FRAMEWISE_API_KEYS": "test-key"})
    try:
        s.compose("up", "-d", "--no-build", "--scale", "worker=2", "redis", "media", "gateway", "worker",
                  "prometheus", timeout=600)
        base = f"http://127.0.0.1:{s.env['FRAMEWISE_PORT']}"
        # three engines load at once: on a loaded 2-core machine that took over 10 minutes
        _wait("gateway /ready", lambda: httpx.get(f"{base}/ready", timeout=5).status_code == 200, 1800, 3)
        _wait("2 healthy workers", lambda: [docker.inspect(c)["State"]["Health"]["Status"]
                                            for c in s.containers("worker")] == ["healthy"] * 2, 900, 3)
        s.base_url = base
        yield s
    finally:
        with contextlib.suppress(Exception):
            (work / "compose.log").write_text(s.compose("logs", "--no-color", check=False, timeout=120))
        s.compose("down", "-v", "--remove-orphans", "-t", "20", check=False, timeout=300)


H = {"Authorization": "Bearer test-key"}


def _chat_body(url: str, max_tokens: int = 8) -> dict:
    return {"model": "model", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                      {"type": "text", "text": "What happens?"}]}]}


def _job(stack: Stack, job_id: str) -> dict:
    return httpx.get(f"{stack.base_url}/v1/jobs/{job_id}", headers=H, timeout=10).json()


def test_image_contract(docker: Docker, image: str):
    cfg = docker.inspect(image)["Config"]
    assert cfg["User"] == "10001:0"
    assert "8000/tcp" in cfg["ExposedPorts"]
    assert "/health" in " ".join(cfg["Healthcheck"]["Test"])
    assert cfg["Entrypoint"] == ["tini", "--", "framewise"]
    assert cfg["Cmd"] == ["serve", "--host", "0.0.0.0", "--model", "/models/model"]
    assert "/data" in cfg["Volumes"]
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["FRAMEWISE_FILES_DIR"].startswith("/data/") and env["XDG_CACHE_HOME"].startswith("/data/")
    probe = ("import importlib.util as u, os, torch, vllm; "
             "print([m for m in ('torchvision','torchaudio','torchcodec') if u.find_spec(m)], torch.__version__, "
             "os.path.isfile('/usr/share/doc/framewise/THIRD_PARTY.md'))")
    out = docker.run("run", "--rm", "--entrypoint", "python3", image, "-c", probe, timeout=300).split()
    assert out[0] == "[]" and out[1].endswith("+cpu") and out[2] == "True", out


@pytest.mark.usefixtures("stack")
class TestCompose:
    def test_streamed_answer_for_a_video_url_inside_the_network(self, stack: Stack):
        from openai import OpenAI

        client = OpenAI(base_url=f"{stack.base_url}/v1", api_key="test-key", timeout=300)
        body = _chat_body("http://media:8080/clip.mp4", max_tokens=12)
        stream = client.chat.completions.create(model=body["model"], messages=body["messages"], max_tokens=12,
                                                temperature=0, stream=True)
        chunks = [c for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(chunks) >= 3 and text

    def test_uploaded_file_is_answered_by_a_worker_job(self, stack: Stack, shared):
        with open(shared["clip"], "rb") as f:
            r = httpx.post(f"{stack.base_url}/v1/files", headers=H, files={"file": ("clip.mp4", f, "video/mp4")},
                           data={"purpose": "vision"}, timeout=60)
        assert r.status_code == 200, r.text
        file_id = r.json()["id"]
        r = httpx.post(f"{stack.base_url}/v1/jobs", headers=H, json=_chat_body(file_id), timeout=30)
        assert r.status_code in (200, 202), r.text
        job = _wait("job done", lambda: (j := _job(stack, r.json()["id"]))["status"] in
                    ("succeeded", "failed") and j, 300)
        assert job["status"] == "succeeded", job
        assert job["result"]["choices"][0]["message"]["content"]
        # the gateway runs no consumer (REDIS_URL set, no --consume): a worker ran it
        done = _wait("worker job counter scraped", lambda: stack.query(
            'sum(framewise_jobs_total{job="framewise-worker",outcome="succeeded"})'), 60)
        assert float(done[0]["value"][1]) >= 1
        gw = stack.query('sum(framewise_jobs_total{job="framewise-gateway"}) or vector(0)')
        assert float(gw[0]["value"][1]) == 0

    def test_prometheus_scraped_every_target(self, stack: Stack):
        def targets():
            active = stack.prom("/api/v1/targets")["activeTargets"]
            up = [t for t in active if t["health"] == "up"]
            jobs = [t["labels"]["job"] for t in up]
            return (jobs.count("framewise-gateway") == 1 and jobs.count("framewise-worker") == 2
                    and len(up) == len(active) and up)
        up = _wait("gateway + 2 workers scraped", targets, 90)
        assert len({t["labels"]["instance"] for t in up}) == 3

    def test_every_dashboard_and_alert_metric_was_scraped(self, stack: Stack, docker: Docker):
        used = _used_metric_names()
        assert any(n.startswith("vllm:") for n in used) and any(n.startswith("framewise_") for n in used)

        def missing():
            names = set(stack.prom("/api/v1/label/__name__/values"))
            gone = used - names
            return gone if gone else None
        # allow one more scrape for series that appeared with the last requests
        deadline = time.time() + 30
        gone = missing()
        while gone and time.time() < deadline:
            time.sleep(5)
            gone = missing()
        assert not gone, f"panels/alerts on metrics Prometheus never scraped: {sorted(gone)}"
        [prom] = stack.containers("prometheus")
        out = docker.run("exec", prom, "promtool", "check", "rules", "/etc/prometheus/alerts.yml", check=False)
        n_rules = sum(len(g["rules"]) for g in yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())["groups"])
        assert "SUCCESS" in out and f"{n_rules} rules found" in out, out

    def test_worker_killed_mid_job_the_job_completes_once(self, stack: Stack, docker: Docker):
        # the video answers after 20 s, so the job is still running (fetching) when its worker is killed
        r = httpx.post(f"{stack.base_url}/v1/jobs", headers=H, json=_chat_body("http://media:8080/slow/clip.mp4", 12),
                       timeout=30)
        assert r.status_code in (200, 202), r.text
        job_id = r.json()["id"]
        owner = None
        with httpx.stream("GET", f"{stack.base_url}/v1/jobs/{job_id}/events", headers=H, timeout=120) as events:
            for line in events.iter_lines():
                if line.startswith("data:") and (ev := json.loads(line[5:])).get("stage") == "running":
                    owner = ev["worker"]  # consumer name: <container hostname>-<pid>-<random>
                    break
        assert owner, "no running event"
        hosts = {docker.inspect(c)["Config"]["Hostname"]: c for c in stack.containers("worker")}
        victim = next(c for h, c in hosts.items() if owner.startswith(f"{h}-"))
        survivor = next(c for c in stack.containers("worker") if c != victim)
        docker.run("kill", victim)  # SIGKILL: no hand-back, the visibility timeout must bring it back
        job = _wait("job finished", lambda: (j := _job(stack, job_id))["status"] in ("succeeded", "failed") and j,
                    600, 2)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2, job  # one lost delivery, one that finished
        assert job["result"]["usage"]["completion_tokens"] > 0
        text = docker.run("exec", survivor, "python3", "-c", "import urllib.request as u; print(u.urlopen("
                          "'http://127.0.0.1:9100/metrics', timeout=5).read().decode())")
        assert re.search(r"^framewise_job_reclaims ([1-9][0-9.]*)$", text, re.M), "the survivor reclaimed it"


def _k8s_env(container: dict, docs: list[dict], extra: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom, then env with valueFrom and $(VAR)."""
    cms, secrets = by_kind(docs, "ConfigMap"), by_kind(docs, "Secret")
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env.update(cms[src["configMapRef"]["name"]]["data"])
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]]["stringData"][ref["key"]]
        else:
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = cms[ref["name"]]["data"][ref["key"]]
    env.update(extra)
    return env


def test_k8s_container_specs_run_under_docker(docker: Docker, image: str, standins: dict, shared: dict):
    """The gateway and worker containers of the rendered CPU overlay (image, args, env, ports, volumes,
    security context) run from the built image, and answer their probes on the manifest's paths and ports."""
    docs = render("cpu")
    deployments = by_kind(docs, "Deployment")
    net = f"fwk8s{uuid.uuid4().hex[:6]}"
    docker.run("network", "create", net)
    started: list[str] = []
    try:
        secret = by_kind(docs, "Secret")["framewise-secrets"]["stringData"]
        started.append(docker.run("run", "-d", "--network", net, "--network-alias", "framewise-redis",
                                  standins["redis"], "redis-server", "--requirepass", secret["REDIS_PASSWORD"],
                                  "--protected-mode", "no").strip())
        files_vol = f"{net}-files"
        probes: list[tuple[str, str, str, dict]] = []
        for name in ("framewise-gateway", "framewise-worker"):
            spec = deployments[name]["spec"]["template"]["spec"]
            [c] = spec["containers"]
            docker.run("tag", image, c["image"])  # the manifest's image name is the built image
            env = _k8s_env(c, docs, {"VLLM_CPU_KVCACHE_SPACE": "1"})
            sc, psc = c["securityContext"], spec["securityContext"]
            cmd = ["run", "-d", "--network", net, "--user", f"{psc['runAsUser']}:{psc['runAsGroup']}",
                   "--group-add", str(psc["fsGroup"]), "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
            if sc.get("readOnlyRootFilesystem"):
                cmd.append("--read-only")
            vols = {v["name"]: v for v in spec["volumes"]}
            for m in c["volumeMounts"]:
                v = vols[m["name"]]
                if m["mountPath"] == "/dev/shm":  # memory-backed emptyDir: Docker's own /dev/shm, sized
                    cmd += ["--shm-size", v["emptyDir"]["sizeLimit"].replace("Gi", "g").replace("Mi", "m")]
                elif m["name"] == "models":
                    cmd += ["-v", f"{shared['model']}:{m['mountPath']}/model:ro"]
                elif "persistentVolumeClaim" in v:
                    cmd += ["-v", f"{files_vol}:{m['mountPath']}"]
                else:
                    cmd += ["--tmpfs", f"{m['mountPath']}:rw,exec,uid={psc['runAsUser']},gid={psc['fsGroup']}"]
            for k, v in env.items():
                cmd += ["-e", f"{k}={v}"]
            if "command" in c:
                cmd += ["--entrypoint", c["command"][0]]
            cid = docker.run(*cmd, c["image"], *c.get("command", [])[1:], *c["args"]).strip()
            started.append(cid)
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    probes.append((name, cid, probe, {**c[probe]["httpGet"], "port": ports[c[probe]["httpGet"]["port"]]}))
        for name, cid, probe, get in probes:
            ip = docker.inspect(cid)["NetworkSettings"]["Networks"][net]["IPAddress"]
            url = f"http://{ip}:{get['port']}{get['path']}"

            def answered(url=url, cid=cid):
                state = docker.inspect(cid)["State"]
                assert state["Running"], f"{cid[:12]} exited: " + docker.run("logs", "--tail", "40", cid, check=False)
                return httpx.get(url, timeout=5).status_code == 200
            _wait(f"{name} {probe} {url}", answered, 1500, 3)
    finally:
        for cid in started:
            with contextlib.suppress(Exception):
                docker.run("rm", "-f", "-v", cid, check=False)
        docker.run("network", "rm", net, check=False)
        docker.run("volume", "rm", "-f", f"{net}-files", check=False)
