"""A real ``framewise serve`` subprocess and a local media HTTP server for gateway tests.

Every address used is on the loopback interface.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import httpx

from loadtests.servers import server_cpu
from tests.conftest import ROOT


def stop_process_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group started for ``proc`` (``start_new_session``), SIGKILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MediaServer:
    """Serves files from ``root`` plus test routes, under any folder (``/slow``, ``/gateway/slow``):
    ``slow/NAME`` (NAME after 30 s), ``big`` (an endless body), ``redirect?to=URL``, ``ranged/NAME`` (NAME with
    byte ranges, a strong ``ETag`` (weak with ``?weak=1``) and ``If-Match``, in 4 KiB writes with ``?trickle=1``; the body bytes written per name are
    counted in ``served``, the ``Range`` headers asked recorded in ``ranges``)."""

    def __init__(self, root: Path, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"):
        self.root, self.host, self.scheme = root, host, "https" if tls is not None else "http"
        self.served: dict[str, int] = {}
        self.ranges: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(outer.root), **kw)

            def log_message(self, *a):
                pass

            def do_GET(self):
                folder, route, rest = _route(self.path)
                if route == "slow":
                    time.sleep(30)
                    self.path = folder + rest
                    return super().do_GET()
                if route == "big":
                    self.send_response(200)
                    self.send_header("Content-Type", "video/mp4")
                    self.end_headers()
                    try:
                        for _ in range(4096):  # 256 MiB at most
                            self.wfile.write(b"\0" * 65536)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return None
                if route == "redirect":
                    self.send_response(302)
                    self.send_header("Location", rest.split("=", 1)[1])
                    self.end_headers()
                    return None
                if route == "ranged":
                    return self.ranged(folder + rest)
                return super().do_GET()

            def ranged(self, target: str) -> None:
                name, _, query = target.partition("?")
                path = outer.root / unquote(name.lstrip("/"))
                if not path.is_file():
                    self.send_error(404)
                    return
                st = path.stat()
                size, etag = st.st_size, f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
                if "weak=1" in query:
                    etag = "W/" + etag
                asked = self.headers.get("Range")
                with outer.lock:
                    outer.ranges.setdefault(name, []).append(asked or "")
                if self.headers.get("If-Match") not in (None, etag):
                    self.send_response(412)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, end = 0, size - 1
                if self.headers.get("If-Range") not in (None, etag):
                    asked = None  # another version than the client has: all of this one
                if asked:
                    first, _, last = asked.removeprefix("bytes=").partition("-")
                    start, end = int(first), min(size - 1, int(last)) if last else size - 1
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", etag)
                self.send_header("Content-Type", "video/mp4")
                self.end_headers()
                with open(path, "rb") as f:
                    f.seek(start)
                    left = end - start + 1
                    step = 4096 if "trickle=1" in query else 65536  # trickle: small writes, each flushed
                    try:
                        while left > 0:
                            piece = f.read(min(left, step))
                            self.wfile.write(piece)
                            if step < 65536:
                                self.wfile.flush()
                                time.sleep(0.002)
                            left -= len(piece)
                            with outer.lock:
                                outer.served[name] = outer.served.get(name, 0) + len(piece)
                    except (BrokenPipeError, ConnectionResetError):
                        pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        if tls is not None:  # HTTPS: every accepted connection does the TLS handshake first
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/{name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _route(path: str) -> tuple[str, str | None, str]:
    """(folder prefix, test route or None, the rest): ``/f/slow/a.mp4`` -> ``("/f", "slow", "/a.mp4")``."""
    head, _, query = path.partition("?")
    parts = head.split("/")
    for i in (1, 2):
        if i < len(parts) and parts[i] in ("slow", "big", "redirect", "ranged"):
            rest = "/" + "/".join(parts[i + 1:]) + (f"?{query}" if query else "")
            if parts[i] == "redirect":
                rest = "?" + query
            return "/".join(parts[:i]), parts[i], rest
    return "", None, path


class RecordingServer:
    """A loopback HTTP server that records every request and serves ``files`` (name -> bytes);
    ``/to?u=URL`` redirects to URL."""

    def __init__(self, files: dict[str, bytes] | None = None):
        self.hits: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits.append(self.path)
                if self.path.startswith("/to?u="):
                    self.send_response(302)
                    self.send_header("Location", unquote(self.path.split("=", 1)[1]))
                    self.end_headers()
                    return
                body = (files or {}).get(self.path.lstrip("/"))
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            do_HEAD = do_POST = do_GET

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Gateway:
    def __init__(self, model: Path, workdir: Path, *, api_key: str, allowed_hosts: str, env: dict | None = None,
                 args: tuple[str, ...] = (), pin: bool = False, ready_s: float = 240, wait: bool = True,
                 port: int | None = None, make_serve: bool = False):
        """``pin``: the server and its engine processes get one CPU, the test process the others. Measured on
        the 2-core CI VM: an engine spread over both cores, streaming a long generation, starved every other
        process (the test included) for up to 9 s, so a client could not disconnect before the end.
        ``wait=False``: return at once; :meth:`wait_ready` waits (tests/stack.py starts gateways early)."""
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.ready_s = ready_s
        self.log_path = workdir / "gateway.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the server
        cpu = ["taskset", "-c", str(server_cpu())] if pin else []
        flags = ["--port", str(self.port), "--api-key", api_key, "--files-dir", str(workdir / "files"),
                 "--log-level", "info", *args]
        cmd = [*cpu, sys.executable, "-m", "framewise.server.cli", "serve", "--model", str(model), *flags]
        if make_serve:  # the README's `make serve` (set-up check, self-check, then serve) on this model
            cmd = [*cpu, "make", "-s", "serve", f"DEMO_MODEL={model}", f"SERVE_ARGS={shlex.join(flags)}"]
        self.started = time.time()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "FRAMEWISE_ALLOWED_MEDIA_HOSTS": allowed_hosts, "VLLM_CPU_KVCACHE_SPACE": "1",
                 **(env or {})},
        )
        self.ready = False
        if wait:
            self.wait_ready()

    def wait_ready(self) -> Gateway:
        """Until ``/ready`` answers 200, at most ``ready_s`` from the start (always asked once: a gateway started
        early may have been ready long before the first test that waits for it)."""
        deadline = self.started + self.ready_s
        while not self.ready:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=2).status_code == 200:
                    self.ready = True
                    return self
            except httpx.HTTPError:
                pass
            if time.time() >= deadline:
                break
            time.sleep(0.5)
        if self.ready:
            return self
        self.close()
        raise RuntimeError(f"gateway not ready after {self.ready_s:.0f} s; log: {self.log_path}")

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"}

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def close(self) -> None:
        stop_process_group(self.proc)
        self.log.close()
