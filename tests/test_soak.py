"""Soak: 1,000 mixed requests through one gateway do not leak memory or file descriptors.

Videos by URL, images, uploads (then a question about the uploaded file) and media that cannot be
decoded, four at a time, through the session's ``framewise serve`` (tests/stack.py: demo model,
``max_tokens`` 1, frame cache on). After a warm-up, the resident memory of the gateway and its decode workers (``/proc/PID/status``)
may grow by less than 10 %, and once the clients have gone the gateway's open file descriptors
(``/proc/PID/fd``) return to their warm baseline.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from framewise.server.video.synth import write_clip
from tests.stack import MODEL

pytestmark = pytest.mark.engine

TOTAL, WARMUP, CONCURRENCY = 1000, 150, 4


@pytest.fixture(scope="module")
def media(media_origin):
    folder = media_origin.folder("soak")
    d = folder.root
    write_clip(str(d / "a.mp4"), frames=24, fps=24, width=96, height=64)
    write_clip(str(d / "b.webm"), frames=12, fps=12, width=64, height=64, codec="libvpx-vp9")
    write_clip(str(d / "c.mp4"), frames=8, fps=8, width=64, height=48)
    from PIL import Image

    Image.new("RGB", (64, 48), (10, 200, 10)).save(d / "p.png")
    full = (d / "a.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(full[: len(full) // 3])
    (d / "noise.mp4").write_bytes(random.Random(0).randbytes(8000))
    return folder


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _decode_workers(pid: int) -> list[int]:
    """The gateway's spawned decode processes (vLLM's processes rename themselves ``VLLM::...``)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"spawn_main" in cmd and not cmd.startswith(b"VLLM"):
                out.append(int(child))
    return out


def _rss_kb(pid: int) -> int:
    return _status_kb(pid, "VmRSS") + sum(_status_kb(w, "VmRSS") for w in _decode_workers(pid))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _requests(media, n: int, seed: int) -> list[tuple[str, object]]:
    rng = random.Random(seed)
    kinds = ["video"] * 4 + ["image"] * 2 + ["upload"] * 2 + ["bad"] * 2
    out = []
    for _ in range(n):
        kind = rng.choice(kinds)
        if kind == "video":
            out.append((kind, (media.url(rng.choice(["a.mp4", "b.webm", "c.mp4"])), rng.choice([1, 2, 4]))))
        elif kind == "bad":
            out.append((kind, media.url(rng.choice(["truncated.mp4", "noise.mp4"]))))
        elif kind == "upload":
            out.append((kind, rng.choice(["a.mp4", "c.mp4"])))
        else:
            out.append((kind, media.url("p.png")))
    return out


class Driver:
    def __init__(self, gateway, media):
        self.gw, self.root = gateway, media.root
        self.local = threading.local()
        self.clients: list[httpx.Client] = []
        self.lock = threading.Lock()

    def client(self) -> httpx.Client:
        if not hasattr(self.local, "client"):
            self.local.client = httpx.Client(base_url=self.gw.base_url, headers=self.gw.headers, timeout=120)
            with self.lock:
                self.clients.append(self.local.client)
        return self.local.client

    def chat(self, part: dict) -> httpx.Response:
        return self.client().post("/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}]})

    def one(self, req) -> tuple[str, int]:
        kind, arg = req
        if kind == "video":
            url, frames = arg
            r = self.chat({"type": "video_url", "video_url": {"url": url, "num_frames": frames}})
        elif kind == "image":
            r = self.chat({"type": "image_url", "image_url": {"url": arg}})
        elif kind == "bad":
            r = self.chat({"type": "video_url", "video_url": {"url": arg}})
        else:
            up = self.client().post("/v1/files", files={"file": (arg, (self.root / arg).read_bytes(), "video/mp4")})
            if up.status_code != 200:
                return kind, up.status_code
            r = self.chat({"type": "video_url", "video_url": {"url": up.json()["id"], "num_frames": 2}})
        return kind, r.status_code

    def run(self, reqs) -> list[tuple[str, int]]:
        with cf.ThreadPoolExecutor(CONCURRENCY) as ex:
            return list(ex.map(self.one, reqs))

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.clients.clear()
        self.local = threading.local()


def _check(results: list[tuple[str, int]]) -> None:
    for kind, status in results:
        if kind == "bad":
            assert 400 <= status < 500, (kind, status)
        else:
            assert status == 200, (kind, status)


def _open_server_connections(port: int) -> int:
    """Sockets of the gateway's port still holding a descriptor (all states but LISTEN and TIME_WAIT)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if int(local.rsplit(":", 1)[1], 16) == port and state not in ("0A", "06"):
                n += 1
    return n


def _quiet_fds(gateway, timeout: float = 30.0) -> int:
    """The gateway's descriptor count once it has closed every connection of the departed clients."""
    deadline = time.time() + timeout
    while _open_server_connections(gateway.port) and time.time() < deadline:
        time.sleep(0.1)
    assert not _open_server_connections(gateway.port), "the gateway kept client connections open"
    return _fds(gateway.proc.pid)


def test_soak_memory_and_descriptors_stay_flat(gateway, media):
    pid = gateway.proc.pid
    reqs = _requests(media, TOTAL, seed=7)
    driver = Driver(gateway, media)
    started = time.perf_counter()
    _check(driver.run(reqs[:WARMUP]))
    driver.close()
    fds0 = _quiet_fds(gateway)
    rss0 = _rss_kb(pid)
    results = driver.run(reqs[WARMUP:])
    driver.close()
    _check(results)
    elapsed = time.perf_counter() - started
    rss1 = _rss_kb(pid)
    fds1 = _quiet_fds(gateway)
    kinds = {k: sum(1 for kk, _ in results if kk == k) for k in ("video", "image", "upload", "bad")}
    print(f"soak: {TOTAL} requests in {elapsed:.0f} s {kinds}; RSS {rss0} -> {rss1} kB; fds {fds0} -> {fds1}")
    assert min(kinds.values()) > 100
    assert rss1 < rss0 * 1.10, f"RSS grew from {rss0} to {rss1} kB"
    assert fds1 <= fds0, f"open descriptors {fds0} -> {fds1}"
    spool = gateway.files_dir / ".spool"
    assert not list(spool.iterdir())  # every downloaded or decoded temporary file was removed
