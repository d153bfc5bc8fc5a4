"""The job worker's own small HTTP server (``framewise worker --metrics-port``): ``/metrics`` for
Prometheus (job counters and durations, queue gauges, the engine's ``vllm:*`` series) and ``/health``
(200 only while the engine is alive and Redis answers) for liveness probes."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from framewise.server.metrics import refresh_queue_gauges

log = logging.getLogger("framewise.worker")


async def health_status(services) -> tuple[int, dict]:
    engine = bool(services.engine.ready)
    try:
        redis_ok = bool(await asyncio.wait_for(services.jobs.ping(), 3))
    except Exception:
        redis_ok = False
    body = {"status": "ok" if engine and redis_ok else "unhealthy", "engine": engine, "redis": redis_ok}
    return (200 if engine and redis_ok else 503), body


def make_app(services) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        await refresh_queue_gauges(services)
        return web.Response(body=services.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def health(_: web.Request) -> web.Response:
        code, body = await health_status(services)
        return web.json_response(body, status=code)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    return app


class WorkerHTTP:
    """Started before the engine loads (``/health`` says 503 until it is up), stopped last."""

    def __init__(self, services, host: str, port: int):
        self.services, self.host, self.port = services, host, port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(make_app(self.services), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        log.info("worker metrics and health on http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
