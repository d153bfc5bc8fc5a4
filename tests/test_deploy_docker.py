"""The image, `docker compose up` and the Kubernetes container specs, run under a real Docker engine: a private
``dockerd`` with the images built from ``./Dockerfile`` and stand-ins (tests/docker_support.py; built in the
background from the session's start)."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT
from tests.docker_support import Docker, readme_deploy
from tests.gateway_support import free_port
from tests.test_deploy_k8s import _used_metric_names, by_kind, render

pytestmark = [pytest.mark.docker, pytest.mark.timeout(5400)]

@pytest.fixture(scope="module")
def docker(docker_build) -> Docker:
    return docker_build.result()[0]


@pytest.fixture(scope="module")
def image(docker_build) -> str:
    return docker_build.result()[1]


@pytest.fixture(scope="module")
def standins(docker_build) -> dict[str, str]:
    return docker_build.result()[2]


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
    from framewise.server.video.synth import write_clip

    base = docker.root / "shared"
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(tc_llava_dir, base / "model")
    (base / "media").mkdir()
    write_clip(str(base / "media" / "clip.mp4"), frames=24, fps=8, width=96, height=72)
    for name, frames in (("followup.mp4", 20), ("other.mp4", 16)):  # asked about only by the affinity test
        write_clip(str(base / "media" / name), frames=frames, fps=8, width=96, height=72)
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
    shipped = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]
    override.write_text(yaml.safe_dump({"services": {
        "redis": {"image": standins["redis"]},
        "prometheus": {"image": standins["prometheus"]},
        "envoy": {"image": standins["envoy"]},
        # the shipped commands, engines without torch.compile: three engines warm up at once on two cores
        "gateway": {"environment": {"FRAMEWISE_ALLOWED_MEDIA_HOSTS": "media"},
                    "command": [*shipped["gateway"]["command"], "--enforce-eager"]},
        "worker": {"environment": {"FRAMEWISE_JOB_VISIBILITY_TIMEOUT_S": "10", "FRAMEWISE_ALLOWED_MEDIA_HOSTS": "media"},
                   "command": [*shipped["worker"]["command"], "--enforce-eager"]},
        # the test's video, served from inside the compose network
        "media": {"image": image, "entrypoint": ["python3", "/media/serve.py"],
                  "volumes": [f"{shared['media']}:/media:ro"], "healthcheck": {"disable": True}},
    }}))
    # the README's command: `VAR=... docker compose -f deploy/compose.yaml up -d --scale gateway=2`, spelled for
    # docker-compose v1, with this test's model dir, project name, override file and ports, and every service
    # but grafana (no image here): two gateways behind Envoy (the published port) and a worker, three engines
    # loading at once (a worker killed mid-job is shown with processes: tests/test_jobs_api.py)
    words = readme_deploy()["docker compose"]
    env = dict(w.split("=", 1) for w in words[:words.index("docker")])
    args = words[words.index("docker") + 2:]
    files = [ROOT / args[i + 1] for i, w in enumerate(args[:args.index("up")]) if w == "-f"]
    assert set(env) == {"FRAMEWISE_MODEL_DIR"} and files == [ROOT / "deploy" / "compose.yaml"], words
    up = args[args.index("up"):]
    assert up[:2] == ["up", "-d"] and "gateway=2" in up, words
    project = f"fwtest{uuid.uuid4().hex[:6]}"
    s = Stack(docker, project, [*files, override], {
        "FRAMEWISE_IMAGE": image, "FRAMEWISE_MODEL_DIR": str(shared["model"]), "FRAMEWISE_PORT": str(free_port()),
        "PROMETHEUS_PORT": str(free_port()), "FRAMEWISE_KVCACHE_GB": "1", "FRAMEWISE_API_KEYS": "test-key"})
    try:
        s.compose(*up, "--no-build", *sorted(set(shipped) - {"grafana"}), "media", timeout=600)
        base = f"http://127.0.0.1:{s.env['FRAMEWISE_PORT']}"
        for service, n in (("gateway", 2), ("worker", 1)):
            _wait(f"{n} healthy {service}", lambda service=service, n=n: [
                docker.inspect(c)["State"]["Health"]["Status"] for c in s.containers(service)] == ["healthy"] * n,
                1800, 3)
        _wait("the API through envoy", lambda: httpx.get(f"{base}/ready", timeout=5).status_code == 200, 120, 1)
        _wait("a healthy envoy", lambda: [docker.inspect(c)["State"]["Health"]["Status"]
                                          for c in s.containers("envoy")] == ["healthy"], 60, 2)
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
        # (the series exists at 0 from the worker's start: wait for a scrape taken after the job)
        done = _wait("worker job counter scraped at >= 1", lambda: [d for d in stack.query(
            'sum(framewise_jobs_total{job="framewise-worker",outcome="succeeded"})') if float(d["value"][1]) >= 1], 60)
        assert float(done[0]["value"][1]) >= 1
        gw = stack.query('sum(framewise_jobs_total{job="framewise-gateway"}) or vector(0)')
        assert float(gw[0]["value"][1]) == 0

    def test_prometheus_scraped_every_target(self, stack: Stack):
        def targets():
            active = stack.prom("/api/v1/targets")["activeTargets"]
            up = [t for t in active if t["health"] == "up"]
            jobs = [t["labels"]["job"] for t in up]
            return (jobs.count("framewise-gateway") == 2 and jobs.count("framewise-worker") == 1
                    and jobs.count("framewise-envoy") == 1 and len(up) == len(active) and up)
        up = _wait("2 gateways + worker + envoy scraped", targets, 90)
        assert len({t["labels"]["instance"] for t in up}) == 4

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


    def test_follow_ups_stay_on_one_gateway_and_move_when_it_stops(self, stack: Stack, docker: Docker):
        """Through Envoy: questions about one video all reach one gateway (its frame-cache counters show the
        follow-ups as memory hits); once that gateway is stopped, the video moves to the other, which finds
        the frames in the shared frame cache and gives the same greedy answer. Last in the class: it stops a
        gateway."""
        gateways = stack.containers("gateway")
        assert len(gateways) == 2

        def lookups(cid: str) -> dict[str, float]:
            [net] = docker.inspect(cid)["NetworkSettings"]["Networks"].values()
            text = httpx.get(f"http://{net['IPAddress']}:8000/metrics", timeout=10).text
            return {r: float(v) for r, v in re.findall(
                r'^framewise_frame_cache_lookups_total\{result="(\w+)"\} (\S+)$', text, re.M)}

        def ask(url: str) -> str:
            r = httpx.post(f"{stack.base_url}/v1/chat/completions", headers=H, json=_chat_body(url), timeout=300)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        before = {c: lookups(c) for c in gateways}
        answers = {ask("http://media:8080/followup.mp4") for _ in range(3)}
        after = {c: lookups(c) for c in gateways}
        changed = [c for c in gateways if after[c] != before[c]]
        assert len(changed) == 1, (before, after)  # all three on one replica
        [home] = changed
        assert after[home]["miss"] - before[home]["miss"] == 1 and after[home]["memory"] - before[home]["memory"] == 2
        assert len(answers) == 1 and answers != {""}  # greedy: the same answer each time
        ask("http://media:8080/other.mp4")  # a second video: on either replica (its key decides)

        [other] = [c for c in gateways if c != home]
        was = lookups(other)
        docker.run("stop", "-t", "45", home)
        assert {ask("http://media:8080/followup.mp4") for _ in range(2)} == answers  # moved, still answered alike
        now = lookups(other)
        assert now["shared"] - was["shared"] == 1  # the stopped replica's decode, found in the shared cache
        assert now["memory"] - was["memory"] == 1 and now["miss"] == was["miss"]


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
            # the manifest's args, the engine without torch.compile (two engines warm up at once on two cores)
            cid = docker.run(*cmd, c["image"], *c.get("command", [])[1:], *c["args"], "--enforce-eager").strip()
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
