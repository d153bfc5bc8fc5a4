"""Decoding in isolated worker processes.

Each worker is a spawned process that runs one decode at a time. A decode that
crashes (segfault in a codec) or hangs past its timeout kills only its worker,
which is replaced; the request gets a clear error and the gateway keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import threading
from collections.abc import Callable
from typing import Any

from framewise.server.video.decode import MediaError


def _worker_main(conn) -> None:
    while True:
        try:
            fn, args, kwargs = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except MediaError as e:
            conn.send(("media_error", e))
        except Exception as e:  # report, keep the worker
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="framewise-decode")
        self.proc.start()
        child.close()

    def call(self, fn: Callable, args: tuple, kwargs: dict, timeout: float):
        self.conn.send((fn, args, kwargs))
        if not self.conn.poll(timeout):
            raise TimeoutError
        return self.conn.recv()  # EOFError if the process died

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
            self.proc.join(5)
            self.conn.close()


class DecodePool:
    """``await pool.run(fn, *args, timeout=...)`` runs ``fn`` in a worker process."""

    def __init__(self, workers: int = 2):
        self._ctx = mp.get_context("spawn")  # never fork a process that holds an engine
        self._size = workers
        self._idle: asyncio.Queue[_Worker] | None = None
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self.restarts = 0

    async def start(self) -> None:
        self._idle = asyncio.Queue()
        workers = await asyncio.gather(*[asyncio.to_thread(_Worker, self._ctx) for _ in range(self._size)])
        for w in workers:
            self._all.append(w)
            self._idle.put_nowait(w)

    async def run(self, fn: Callable, *args: Any, timeout: float, **kwargs: Any) -> Any:
        assert self._idle is not None, "DecodePool.start() was not awaited"
        worker = await self._idle.get()
        replace = False
        try:
            status, payload = await asyncio.to_thread(worker.call, fn, args, kwargs, timeout)
        except TimeoutError:
            replace = True
            raise MediaError("decode_timeout", f"decoding took longer than {timeout:.0f}s", status=400) from None
        except (EOFError, OSError, BrokenPipeError):
            replace = True
            raise MediaError("decode_failed", "the decoder crashed on this video", status=400) from None
        except asyncio.CancelledError:
            replace = True  # the worker may still be busy with an abandoned job
            raise
        finally:
            if replace:
                worker = await asyncio.to_thread(self._replace, worker)
            self._idle.put_nowait(worker)
        if status == "media_error":
            raise payload
        if status == "error":
            raise MediaError("decode_failed", f"the video could not be decoded: {payload}")
        return payload

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker(self._ctx)
        with self._lock:
            self._all = [w for w in self._all if w is not worker] + [fresh]
            self.restarts += 1
        return fresh

    async def close(self) -> None:
        for w in self._all:
            await asyncio.to_thread(w.kill)
        self._all.clear()
