"""Support for tests of faults without a vLLM engine: a stand-in engine that can die, the real application
in-process or behind ``framewise serve``'s HTTP server (:func:`framewise.server.lifecycle.run_server`) in a subprocess,
a media origin whose every request is recorded (bytes sent, whether the client left early), and clips.

The subprocess gateway is what ``framewise serve`` runs (uvicorn with the extended signal handler, the exit
status of :func:`~framewise.server.lifecycle.run_server`), on the stand-in engine: SIGTERM, an engine death and the
process's exit are real, and no engine start is paid for (these tests are fast).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np

from framewise.server.engine import ModelDefaults
from tests.conftest import ROOT
from tests.gateway_support import free_port, stop_process_group

MODEL = "tc-llava"
KEY = "sk-test-framewise"


class StandInEngine:
    """The engine interface without vLLM: the checkpoint's real tokenizer and chat template; ``generate``
    yields ``steps`` vLLM ``RequestOutput`` deltas ``step_s`` apart. ``dead`` (the engine core died): set it,
    create ``death_file``, or let it die by itself after ``die_after`` steps of a request; a dead engine's
    ``generate`` raises vLLM's ``EngineDeadError``."""

    def __init__(self, model_dir, *, steps: int = 3, step_s: float = 0.0, death_file: str | None = None,
                 die_after: int | None = None):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.defaults = ModelDefaults(num_frames=4, max_frames=16, shortest_edge=None, max_model_len=2048)
        self.steps, self.step_s, self.death_file, self.die_after = steps, step_s, death_file, die_after
        self._dead = False
        self.generated: list[str] = []
        self.aborted: list[str] = []

    @property
    def dead(self) -> bool:
        return self._dead or (self.death_file is not None and os.path.exists(self.death_file))

    @dead.setter
    def dead(self, value: bool) -> None:
        self._dead = value

    @property
    def ready(self) -> bool:
        return not self.dead

    async def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    async def generate(self, prompt: dict, params, request_id: str):
        from vllm.outputs import CompletionOutput, RequestOutput
        from vllm.v1.engine.exceptions import EngineDeadError

        self.generated.append(request_id)
        for step in range(self.steps):
            await asyncio.sleep(self.step_s)
            if self.die_after is not None and step >= self.die_after:
                self._dead = True
            if self.dead:
                raise EngineDeadError()
            last = step == self.steps - 1
            outs = [CompletionOutput(index=i, text=f" t{step}", token_ids=[10 + step], cumulative_logprob=None,
                                     logprobs=None, finish_reason="length" if last else None)
                    for i in range(params.n)]
            yield RequestOutput(request_id, None, [1, 2, 3], None, outs, finished=last)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


SERVER = """
import json, os, sys
from framewise.server.app import create_app
from framewise.server.http_edges import uvicorn_options
from framewise.server.lifecycle import run_server
from framewise.server.logs import configure_logging
from framewise.server.settings import Settings
from tests.live_support import StandInEngine

settings = Settings(**json.loads(sys.argv[2]))
configure_logging("info", "json")
engine = StandInEngine(settings.model, **json.loads(sys.argv[3]))
app = create_app(settings, engine=engine)
code = run_server(app, app.state.services.lifecycle, host="127.0.0.1", port=int(sys.argv[1]), log_config=None,
                  log_level="info", timeout_graceful_shutdown=float(sys.argv[4]), **uvicorn_options(settings))
sys.stdout.flush()
os._exit(code)  # as `framewise serve` (cmd_serve: _exit_without_engine_teardown)
"""


class LiveGateway:
    """``framewise serve``'s server (:func:`framewise.server.lifecycle.run_server`) on the stand-in engine, in a
    subprocess of its own process group. ``engine``: :class:`StandInEngine` options."""

    def __init__(self, workdir: Path, model: Path, *, engine: dict | None = None, drain_s: float = 5.0,
                 **settings):
        self.port, self.workdir = free_port(), workdir
        self.base = f"http://127.0.0.1:{self.port}"
        settings = {"model": str(model), "served_model_name": MODEL, "api_keys": [KEY], "decode_workers": 1,
                    "files_dir": str(workdir / "files"), **settings}
        self.log_path = workdir / f"gateway-{self.port}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the server
        argv = [sys.executable, "-c", SERVER, str(self.port), json.dumps(settings), json.dumps(engine or {}),
                str(drain_s)]
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, "TMPDIR": str(workdir)})
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base}/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        self.close()
        raise RuntimeError(f"gateway did not start; log: {self.log_path}")

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {KEY}"}

    def url(self, path: str) -> str:
        return self.base + path

    def sigterm(self) -> None:
        os.kill(self.proc.pid, signal.SIGTERM)  # the main process only, as tini/kubelet do

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def close(self) -> None:
        stop_process_group(self.proc, timeout=10)
        self.log.close()


class Origin:
    """A loopback media origin. ``files``: name -> bytes, served with ``Content-Length`` unless ``chunked`` (a
    name in that set), ``rate`` bytes per second at most (a name -> rate). ``fail``: name -> statuses to answer
    first, one per request (then the file). Every request is recorded: ``name``, ``sent`` (bytes), ``finished``
    (the whole body went out), ``aborted`` (the client closed the connection before the body's end)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.chunked: set[str] = set()
        self.rate: dict[str, float] = {}
        self.fail: dict[str, list[int]] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.lstrip("/").split("?")[0]
                rec = {"name": name, "sent": 0, "finished": False, "aborted": False, "status": 200}
                with outer.lock:
                    outer.requests.append(rec)
                    statuses = outer.fail.get(name) or []
                    status = statuses.pop(0) if statuses else None
                if status is not None or name not in outer.files:
                    rec["status"] = status or 404
                    self.send_response(rec["status"])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    rec["finished"] = True
                    return
                body = outer.files[name]
                self.send_response(200)
                self.send_header("Content-Type", "video/mp4")
                chunked = name in outer.chunked
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                rate = outer.rate.get(name)
                step = 16384
                try:
                    for i in range(0, len(body), step):
                        piece = body[i:i + step]
                        if chunked:
                            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                        else:
                            self.wfile.write(piece)
                        self.wfile.flush()
                        rec["sent"] += len(piece)
                        if rate:
                            time.sleep(len(piece) / rate)
                    if chunked:
                        self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                    rec["finished"] = True
                except (BrokenPipeError, ConnectionResetError):
                    rec["aborted"] = True  # the client closed the connection before the body's end
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://{self.host}/{name}"

    def requests_for(self, name: str) -> list[dict]:
        with self.lock:
            return [dict(r) for r in self.requests if r["name"] == name]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def write_video(path: Path, *, seconds: float, fps: int = 8, size: tuple[int, int] = (160, 120),
                noise: bool = False, faststart: bool = False) -> bytes:
    """An H.264 MP4 lasting ``seconds``; ``noise``: random frames (large: ~1 MB per few frames at 320x240);
    ``faststart``: its index (moov) before the data, as web video is published."""
    import av

    rng = np.random.default_rng(0)
    frames = int(seconds * fps)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"crf": "0", "preset": "ultrafast"} if noise else {}
        for i in range(frames):
            if noise:
                img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            else:
                img = np.full((size[1], size[0], 3), (i * 9) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.read_bytes()


def data_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def video_message(url: str, text: str = "What happens?", **sampling) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url, **sampling}},
                                         {"type": "text", "text": text}]}]


def wait_for(predicate, timeout: float, what: str, every: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def sse(text: str) -> list[dict]:
    """The events of an SSE body: ``{"event", "id", "data", "comment"}`` per block."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        ev: dict = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "":
                ev["comment"] = value
            elif key == "data":
                ev["data"] = value if value == "[DONE]" else json.loads(value)
            else:
                ev[key] = value
        events.append(ev)
    return events
