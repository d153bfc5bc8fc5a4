"""deploy/: Kubernetes overlays rendered and schema-validated, their cross-object invariants, hadolint on both
Dockerfiles, the compose file against Compose v1 and the compose-spec schema (no Docker engine needed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
OVERLAYS = ("cpu", "gpu")
K8S_VERSIONS = ("1.30", "1.34")  # oldest with preStop `sleep` on by default, and a recent one


def tool(name: str) -> str:
    exe = BIN / name if (BIN / name).exists() else shutil.which(name)
    assert exe, f"{name} is installed by `pip install -e .[dev]`"
    return str(exe)


def render(overlay: str) -> list[dict]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strict(overlay, tmp_path):
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(render(overlay)))
    cmd = [tool("kubernetes-validate"), "--strict"]
    for v in K8S_VERSIONS:
        cmd += ["-k", v]
    out = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ERROR" not in out.stdout + out.stderr, out.stdout + out.stderr
    # only the CRDs (KEDA) lack a schema; they are checked by the invariants below
    unknown = set(re.findall(r"schema for kind (\w+)", out.stdout + out.stderr))
    assert unknown <= {"ScaledObject", "TriggerAuthentication"}, unknown


def _pod_containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_invariants(overlay):
    from framewise.server.jobs.redis_queue import state_keys
    from framewise.server.routers.health import router as health_router
    from framewise.server.settings import Settings
    from framewise.server.worker_http import make_app

    docs = render(overlay)
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    workloads = {**deployments, **by_kind(docs, "StatefulSet")}
    assert {"framewise-gateway", "framewise-worker"} <= set(deployments)
    assert by_kind(docs, "Namespace") and all(d["metadata"].get("namespace") == "framewise"
                                              for d in docs if d["kind"] != "Namespace")

    # labels and selectors
    for w in workloads.values():
        sel = w["spec"]["selector"]["matchLabels"]
        assert sel.items() <= w["spec"]["template"]["metadata"]["labels"].items(), w["metadata"]["name"]
    for s in services.values():
        pods = [w for w in workloads.values()
                if s["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, s["metadata"]["name"]
        names = {p["name"] for c in _pod_containers(pods[0]) for p in c.get("ports", [])}
        assert {p["targetPort"] for p in s["spec"]["ports"]} <= names, s["metadata"]["name"]
    for pdb in by_kind(docs, "PodDisruptionBudget").values():
        assert any(pdb["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
                   for w in workloads.values())
    for hpa in by_kind(docs, "HorizontalPodAutoscaler").values():
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments

    # probes hit paths the app serves, on ports the container declares and the process listens on
    gateway_paths = {r.path for r in health_router.routes}
    worker_paths = {r.resource.canonical for r in make_app(object()).router.routes()}
    gw, wk = _pod_containers(deployments["framewise-gateway"])[0], _pod_containers(deployments["framewise-worker"])[0]
    for c, paths, listen in ((gw, gateway_paths, flag(gw["args"], "--port")),
                             (wk, worker_paths, flag(wk["args"], "--metrics-port"))):
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("startupProbe", "livenessProbe"):
            assert probe in c, (c["name"], probe)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in c:
                get = c[probe]["httpGet"]
                assert get["path"] in paths, (c["name"], probe, get["path"])
                assert ports[get["port"]] == int(listen), (c["name"], probe)
    assert gw["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gw["livenessProbe"]["httpGet"]["path"] == "/health"
    # the startup probe covers an engine load of several minutes
    assert gw["startupProbe"]["periodSeconds"] * gw["startupProbe"]["failureThreshold"] >= 300

    # graceful shutdown: grace >= preStop + drain (gateway), >= job grace (worker), with a margin
    gspec = deployments["framewise-gateway"]["spec"]["template"]["spec"]
    pre = gw["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert gspec["terminationGracePeriodSeconds"] >= pre + float(flag(gw["args"], "--drain-timeout-s")) + 5
    wspec = deployments["framewise-worker"]["spec"]["template"]["spec"]
    assert wspec["terminationGracePeriodSeconds"] >= float(flag(wk["args"], "--grace-s")) + 5

    # Envoy in front: the ConfigMap holds the files tests/test_envoy_routing.py runs, the container mounts it
    # where video_key.lua is looked for, and the headless Service it resolves lists ready gateway pods only
    [envoy_cm] = [cm for name, cm in by_kind(docs, "ConfigMap").items() if name.startswith("framewise-envoy")]
    for name in ("envoy.yaml", "video_key.lua"):
        assert envoy_cm["data"][name] == (DEPLOY / "envoy" / name).read_text()
    espec = deployments["framewise-envoy"]["spec"]["template"]["spec"]
    [ec] = espec["containers"]
    assert ec["args"][:2] == ["-c", "/etc/envoy/envoy.yaml"] and ec["readinessProbe"]["httpGet"]["port"] == "admin"
    assert {"name": "config", "mountPath": "/etc/envoy", "readOnly": True} in ec["volumeMounts"]
    assert [v["configMap"]["name"] for v in espec["volumes"]] == [envoy_cm["metadata"]["name"]]
    pods = services["framewise-gateway-pods"]["spec"]
    assert pods["clusterIP"] == "None" and not pods["publishNotReadyAddresses"]
    assert "framewise-gateway-pods" in envoy_cm["data"]["envoy.yaml"]

    # KEDA scales the workers on the queued and running sets the code keeps (their SCARD)
    [so] = by_kind(docs, "ScaledObject").values()
    assert so["spec"]["scaleTargetRef"]["name"] == "framewise-worker"
    triggers = so["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"redis"}
    for t in triggers:
        assert t["authenticationRef"]["name"] in by_kind(docs, "TriggerAuthentication")
    assert {t["metadata"]["listName"] for t in triggers} == set(state_keys(Settings().redis_prefix).values())

    # images pinned, everything non-root
    for w in workloads.values():
        spec = w["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        for c in spec["containers"]:
            name, _, tag = c["image"].rpartition(":")
            assert name and tag and tag != "latest" and "/" not in tag, c["image"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert "resources" in c and "requests" in c["resources"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_args_are_valid_framewise_command_lines(overlay):
    """The args the manifests pass parse with the real CLI; the GPU overlay's vLLM options reach the engine."""
    from framewise.server.cli import build_parser, engine_overrides

    deployments = by_kind(render(overlay), "Deployment")
    parser = build_parser(engine_options=True)
    for name in ("framewise-gateway", "framewise-worker"):
        c = _pod_containers(deployments[name])[0]
        args = parser.parse_args(c["args"])
        given = engine_overrides(args)
        spec = deployments[name]["spec"]["template"]["spec"]
        # vLLM needs more /dev/shm than a runtime's 64 MiB default (160 MiB measured): memory-backed emptyDir
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        if overlay == "gpu":
            assert given["tensor_parallel_size"] == 1 and given["gpu_memory_utilization"] == 0.9
            assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert shm["emptyDir"]["sizeLimit"] == "8Gi"
        else:
            assert given == {} and "nvidia.com/gpu" not in c["resources"].get("limits", {})


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu", "deploy/envoy/Dockerfile"])
def test_hadolint(dockerfile):
    out = subprocess.run([tool("hadolint"), str(ROOT / dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_file_valid_for_compose_v1_and_spec():
    compose = DEPLOY / "compose.yaml"
    spec = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose)],
                          capture_output=True, text=True, timeout=120)
    assert spec.returncode == 0, spec.stdout + spec.stderr
    subprocess.run(["bash", str(ROOT / "scripts" / "docker_env.sh"), "install"], check=True, timeout=600)
    v1 = subprocess.run(["docker-compose", "-f", str(compose), "config"], capture_output=True, text=True,
                        timeout=120, env={"PATH": "/usr/bin:/bin", "DOCKER_HOST": "unix:///nonexistent"})
    assert v1.returncode == 0, v1.stderr
    cfg = yaml.safe_load(v1.stdout)
    assert set(cfg["services"]) == {"redis", "gateway", "worker", "envoy", "prometheus", "grafana"}
    raw = yaml.safe_load(compose.read_text())
    assert "name" not in raw  # Compose v1 rejects it
    gw, wk = cfg["services"]["gateway"], cfg["services"]["worker"]
    envoy = cfg["services"]["envoy"]
    # the API through envoy, on loopback unless FRAMEWISE_BIND says; gateways scale (no host port) and envoy
    # finds every replica under the name its config uses
    assert [str(p) for p in envoy["ports"]] == ["127.0.0.1:8000:8080/tcp"]
    assert "ports" not in gw and "framewise-gateway-pods" in gw["networks"]["default"]["aliases"]
    envoy_cfg = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
    assert {c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"]
            for c in envoy_cfg["static_resources"]["clusters"]} == {"framewise-gateway-pods"}
    assert gw["environment"]["FRAMEWISE_SHARED_FRAME_CACHE_MB"] == wk["environment"]["FRAMEWISE_SHARED_FRAME_CACHE_MB"]
    assert any(str(v).endswith(":/models/model:ro") for v in gw["volumes"])
    assert any(str(v) == "files:/data/files:rw" for v in gw["volumes"] + wk["volumes"])
    assert "ports" not in wk  # scalable: --scale worker=N
    # Compose's stop grace covers the drain / job grace the commands ask for
    for svc, opt in ((gw, "--drain-timeout-s"), (wk, "--grace-s")):
        grace = float(svc["stop_grace_period"].rstrip("s"))
        assert grace >= float(flag(svc["command"], opt)) + 5
    assert cfg["services"]["redis"]["command"][1:3] == ["--appendonly", "yes"]
    assert gw["shm_size"] == wk["shm_size"] == "1gb"  # vLLM needs more than Docker's 64 MB /dev/shm


def _used_metric_names() -> set[str]:
    exprs = [r["expr"] for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
             for r in g["rules"]]
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "framewise.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = set()
    for e in exprs:
        e = re.sub(r"\b(by|without)\s*\([^)]*\)|\{[^}]*\}", "", e)  # label names and matchers are not metrics
        names |= set(re.findall(r"\b(framewise_[a-z_]+|vllm:[a-z_:]+|envoy_[a-z_]+|up)\b", e))
    return names


def test_dashboard_and_alerts_use_metrics_the_code_exports():
    """Static half of the check (the Docker test compares with what Prometheus really scraped)."""
    from prometheus_client.parser import text_string_to_metric_families

    from framewise.server.metrics import Metrics

    m = Metrics()
    m.requests.labels("/x", "200").inc()
    m.jobs.labels("succeeded").inc()
    exported = {s.name for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}
    used = _used_metric_names()
    assert used and {n for n in used if n.startswith("framewise_")} <= exported, \
        {n for n in used if n.startswith("framewise_")} - exported
    assert {"vllm:kv_cache_usage_perc", "vllm:num_requests_waiting"} <= used
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    uid = ds["datasources"][0]["uid"]
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "framewise.json").read_text())
    assert all(p["datasource"]["uid"] == uid for p in dash["panels"])


def test_monitoring_component_matches_the_compose_prometheus(tmp_path):
    """With the optional monitoring component, the Operator scrapes the gateway and worker Services under the
    same job names the compose Prometheus uses (the alerts and dashboard select on them), and the
    PrometheusRule holds exactly the rules of deploy/prometheus/alerts.yml."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(DEPLOY / "k8s" / "overlays" / "cpu", tmp_path)],  # kustomize: no absolute roots
        "components": [os.path.relpath(DEPLOY / "k8s" / "components" / "monitoring", tmp_path)]}))
    out = subprocess.run([tool("kubectl"), "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    services = list(by_kind(docs, "Service").values())
    compose_jobs = {c["job_name"] for c in yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
                    ["scrape_configs"]}
    monitors = by_kind(docs, "ServiceMonitor")
    assert len(monitors) == 3
    jobs = set()
    for sm in monitors.values():
        want = sm["spec"]["selector"]["matchLabels"]
        [svc] = [s for s in services if want.items() <= s["metadata"]["labels"].items()]
        jobs.add(svc["metadata"]["labels"][sm["spec"]["jobLabel"]])
        port_names = {p["name"] for p in svc["spec"]["ports"]}
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= port_names
    assert jobs == {"framewise-gateway", "framewise-worker", "framewise-envoy"} <= compose_jobs
    [rule] = by_kind(docs, "PrometheusRule").values()
    assert rule["spec"]["groups"] == yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
