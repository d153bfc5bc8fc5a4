"""The process as a whole: serving, shutting down (SIGTERM: drain), or dying (its engine died).

**Shutdown is told apart from a client leaving** by :attr:`Lifecycle.stopping`, set by the signal handler
of the HTTP server (:func:`run_server`: uvicorn's own handler, extended) the moment SIGTERM/SIGINT
arrives, *before* uvicorn starts draining and long before it cancels what is left after
``--drain-timeout-s``. So:

- a request that waits on a queued completion (a long video run as a job on a shared queue) answers at once
  with the job's id (``gateway_shutdown``: GET ``/v1/jobs/{id}`` has the result; the job is *not* cancelled)
  and its connection closes, so the drain is not spent on it (with the in-process queue the job runs here:
  the wait goes on through the drain);
- a cancellation that arrives while :attr:`Lifecycle.stopping` is set (uvicorn cancelling requests past the
  drain, a second Ctrl-C) never cancels a job; before it, a cancelled wait is the client leaving
  (Starlette cancels a stream whose client disconnected; a JSON request notices the disconnect itself),
  and the job is cancelled, which aborts its engine request.

**Engine death is fatal**: :meth:`Lifecycle.engine_died` (the engine watcher of ``Services``, or the
pipeline meeting ``EngineDeadError``) marks the process dead at once -- ``/health`` and ``/ready`` answer
503 ``engine_dead``, new chat requests 503 ``engine_dead``, in-flight ones end with ``engine_dead`` -- then,
:data:`DEATH_LINGER_S` later (time for probes and load balancers to see the 503), shuts the server down
with a drain of at most :data:`DEATH_DRAIN_S`; the process exits with status 1 so the orchestrator
restarts it. A job worker stops claiming at once and hands back what it holds (server/jobs/worker.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("framewise.lifecycle")

DEATH_LINGER_S = 2.0  # between the engine's death and the shutdown: /health answers 503 meanwhile
DEATH_DRAIN_S = 10.0  # the drain after an engine death (requests on the dead engine have already failed)
EXIT_ENGINE_DEAD = 1


class Lifecycle:
    def __init__(self, drain_s: float = 30.0):
        self.drain_s = drain_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = asyncio.Event()  # shutdown began: queued waits answer with their job id
        self.dead = asyncio.Event()  # the engine died: the process is going away with exit_code
        self.stopping_reason: str | None = None
        self.exit_code = 0
        self._exit: Callable[[float], None] | None = None
        self._linger: asyncio.TimerHandle | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def on_exit(self, fn: Callable[[float], None]) -> None:
        """``fn(drain_s)`` asks the HTTP server to shut down (set by :func:`run_server`)."""
        self._exit = fn

    @property
    def engine_dead(self) -> bool:
        return self.dead.is_set()

    @property
    def shutting_down(self) -> bool:
        return self.stopping.is_set()

    def begin_shutdown(self, reason: str = "signal") -> None:
        """From a signal handler (or any thread): shutdown begins on the event loop."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._stop, reason)

    def _stop(self, reason: str) -> None:
        if not self.stopping.is_set():
            self.stopping_reason = reason
            self.stopping.set()
            log.info("shutting down (%s): jobs keep running; waiting clients get their job ids", reason)

    def engine_died(self, detail: str = "") -> None:
        """On the event loop, once: mark dead, then shut down (exit status 1)."""
        if self.dead.is_set():
            return
        self.dead.set()
        self.exit_code = EXIT_ENGINE_DEAD
        log.error("the inference engine died%s; /health answers 503 and the process exits with status %d",
                  f" ({detail})" if detail else "", EXIT_ENGINE_DEAD, extra={"code": "engine_dead"})
        if self.loop is not None and self._exit is not None:
            self._linger = self.loop.call_later(DEATH_LINGER_S, self._exit_now)
        else:
            self._stop("engine_dead")

    def _exit_now(self) -> None:
        self._stop("engine_dead")
        if self._exit is not None:
            self._exit(min(self.drain_s, DEATH_DRAIN_S))


def run_server(app, lifecycle: Lifecycle, **config) -> int:
    """Serve ``app`` with uvicorn (as ``uvicorn.run`` does), its signal handler extended to begin
    :class:`Lifecycle` shutdown first; :meth:`Lifecycle.engine_died` can stop it too. Returns the exit
    status: 0 after a signal or a normal end (uvicorn then re-raises the signal it handled: the process
    ends as that signal), 1 after an engine death, 3 when startup failed (as uvicorn)."""
    import uvicorn

    cfg = uvicorn.Config(app, **config)
    lifecycle.drain_s = cfg.timeout_graceful_shutdown if cfg.timeout_graceful_shutdown is not None else 30.0

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            lifecycle.begin_shutdown(f"signal {sig}")
            super().handle_exit(sig, frame)

    server = Server(cfg)

    def exit_soon(drain_s: float) -> None:
        current = cfg.timeout_graceful_shutdown
        cfg.timeout_graceful_shutdown = drain_s if current is None else min(current, drain_s)
        server.should_exit = True

    lifecycle.on_exit(exit_soon)
    server.run()
    if lifecycle.exit_code:
        return lifecycle.exit_code
    return 0 if server.started else 3
