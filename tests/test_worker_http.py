"""`framewise worker --metrics-port`: /health follows the engine and Redis; /metrics renders job counters,
durations and queue gauges (the engine's vllm:* series come from the same registry as the gateway's)."""

from __future__ import annotations

import asyncio

import httpx

from framewise.server.metrics import Metrics
from framewise.server.worker_http import WorkerHTTP
from tests.gateway_support import free_port


class FakeEngine:
    ready = False


class FakeJobs:
    def __init__(self):
        self.redis_up = True
        self.reclaims = 3

    async def ping(self) -> bool:
        if not self.redis_up:
            raise ConnectionError("redis down")
        return True

    async def depth(self) -> int:
        return 5

    async def oldest_age(self) -> float:
        return 42.5

    async def dead_letters(self) -> int:
        return 2


class FakePool:
    restarts = 1


class FakeServices:
    def __init__(self):
        self.engine, self.jobs, self.pool, self.metrics = FakeEngine(), FakeJobs(), FakePool(), Metrics()


def test_worker_health_and_metrics():
    async def run():
        services = FakeServices()
        port = free_port()
        http = WorkerHTTP(services, "127.0.0.1", port)
        await http.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
                r = await c.get("/health")  # engine still loading
                assert r.status_code == 503 and r.json() == {"status": "unhealthy", "engine": False, "redis": True}
                services.engine.ready = True
                r = await c.get("/health")
                assert r.status_code == 200 and r.json()["status"] == "ok"
                services.jobs.redis_up = False
                r = await c.get("/health")
                assert r.status_code == 503 and r.json()["redis"] is False
                services.jobs.redis_up = True

                services.metrics.jobs.labels("succeeded").inc()
                services.metrics.job_seconds.observe(1.5)
                text = (await c.get("/metrics")).text
        finally:
            await http.stop()
        lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        assert float(lines['framewise_jobs_total{outcome="succeeded"}']) == 1
        assert float(lines["framewise_job_seconds_count"]) == 1
        assert float(lines["framewise_job_queue_depth"]) == 5
        assert float(lines["framewise_job_oldest_age_seconds"]) == 42.5
        assert float(lines["framewise_job_dead_letters"]) == 2
        assert float(lines["framewise_engine_ready"]) == 1

    asyncio.run(run())
