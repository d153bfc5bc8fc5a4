"""FastAPI application factory: routers per resource, services in ``app.state``."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.datastructures import Headers
from vllm.exceptions import VLLMClientError

from server import logs
from server.chat.pipeline import run_chat_job
from server.engine import Engine
from server.errors import error_response, install_error_handlers
from server.http_limits import BodyLimitMiddleware, BodyLimits
from server.jobs import make_queue
from server.jobs.worker import JobWorker
from server.media.fetch import MediaFetcher
from server.media.files import FileStore
from server.media.sources import MediaResolver
from server.metrics import Metrics
from server.openapi import ERROR_RESPONSES
from server.routers import chat, files, health, jobs, models, playground
from server.settings import Settings
from server.video.decode import DecodeLimits
from server.video.pool import DecodePool
from server.video.service import FrameCache, VideoService

MB = 1 << 20
access_log = logging.getLogger("framewise.access")


@dataclass
class Services:
    settings: Settings
    engine: Engine
    metrics: Metrics
    files: FileStore
    media: MediaResolver
    video: VideoService
    pool: DecodePool
    fetcher: MediaFetcher
    jobs: object
    inflight: int = 0

    async def start(self) -> None:
        await self.pool.start()
        await self.fetcher.start()
        await self.engine.start()

    async def stop(self) -> None:
        self.engine.shutdown()
        await self.fetcher.close()
        await self.pool.close()
        await self.jobs.close()

    def worker(self) -> JobWorker:
        s = self.settings
        return JobWorker(self.jobs, lambda job, report: run_chat_job(self, job, report),
                         concurrency=s.worker_concurrency, heartbeat_s=s.job_heartbeat_s, metrics=self.metrics)


def build_services(settings: Settings, engine: Engine | None = None) -> Services:
    spool = os.path.join(settings.files_dir, ".spool")
    os.makedirs(spool, exist_ok=True)
    pool = DecodePool(settings.decode_workers)
    fetcher = MediaFetcher(settings.allowed_media_hosts, timeout_s=settings.fetch_timeout_s,
                           max_redirects=settings.max_redirects, spool_dir=spool)
    store = FileStore(settings.files_dir, int(settings.max_upload_mb * MB))
    services = Services(
        settings=settings,
        engine=engine or Engine(settings),
        metrics=Metrics(),
        files=store,
        media=MediaResolver(fetcher, store, spool, settings.allowed_local_media_path),
        video=VideoService(pool, FrameCache(int(settings.frame_cache_mb * MB)),
                           DecodeLimits(settings.max_duration_s, settings.max_pixels, settings.decode_threads),
                           settings.decode_timeout_s),
        pool=pool,
        fetcher=fetcher,
        jobs=make_queue(settings),
    )
    return services


class RecordMiddleware:
    """Request id (``X-Request-ID``, the log context, ``request.state.request_id``), request metrics and the access
    log line, as a pure ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (what ``@app.middleware("http")``
    makes) runs the app in a task of its own and passes every message through a memory stream, which cost ~1 ms
    of TTFT p50 and more under load (``bench/gateway_stages.py``, modes ``gateway`` vs ``pure-record``).
    A streamed response is logged when its headers go out (the completion logs its end)."""

    def __init__(self, app, services: Services):
        self.app, self.services = app, services

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        rid = logs.new_request_id(Headers(scope=scope).get("x-request-id"))
        scope.setdefault("state", {})["request_id"] = rid  # request.state.request_id (read by the 500 handler)
        token = logs.request_id.set(rid)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
                route = getattr(scope.get("route"), "path", "unmatched")
                elapsed = time.perf_counter() - start
                self.services.metrics.requests.labels(route, str(status)).inc()
                self.services.metrics.request_seconds.labels(route).observe(elapsed)
                client = scope.get("client")
                access_log.info("%s %s %d", scope["method"], scope["path"], status,
                                extra={"request_id": rid, "route": route, "status": status,
                                       "ms": round(elapsed * 1000, 1), "client": client[0] if client else None})
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logs.request_id.reset(token)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    services = build_services(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await services.start()
        stop = asyncio.Event()
        # the in-process queue has no other consumer; with Redis, `--consume` makes one process a whole system
        consume = settings.consume or not settings.redis_url
        # in-process jobs get 10 s to finish at shutdown, then are handed back (the wait below covers that)
        worker = asyncio.create_task(services.worker().run(stop, grace_s=10.0)) if consume else None
        try:
            yield
        finally:
            stop.set()
            if worker is not None:
                await asyncio.wait({worker}, timeout=15)
            await services.stop()

    app = FastAPI(title="Framewise", version="0.1.0", lifespan=lifespan)
    app.state.services = services
    install_error_handlers(app)
    # a request vLLM refuses (its SamplingParams checks, found by schemathesis as 500s) is the client's error
    app.add_exception_handler(VLLMClientError, lambda request, exc: error_response(400, "invalid_request", str(exc)))
    for router in (chat.router, files.router, models.router, jobs.router, health.router):
        app.include_router(router, responses=ERROR_RESPONSES)
    app.include_router(playground.router)  # the page; not in the OpenAPI document
    # added before `record` so that middleware (outside this one) logs and counts the 413s too
    app.add_middleware(BodyLimitMiddleware, limits=BodyLimits.from_settings(settings), api_keys=settings.api_keys)

    app.add_middleware(RecordMiddleware, services=services)
    return app
