"""FastAPI application factory: routers per resource, services in ``app.state``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI
from starlette.datastructures import Headers
from vllm.exceptions import VLLMClientError

from framewise.server import logs
from framewise.server.admission import Admission, AdmissionMiddleware
from framewise.server.chat.pipeline import run_chat_job
from framewise.server.engine import Engine, EngineAPI
from framewise.server.errors import error_response, install_error_handlers
from framewise.server.http_edges import EdgeMiddleware
from framewise.server.http_limits import BodyLimitMiddleware, BodyLimits
from framewise.server.jobs import make_queue
from framewise.server.jobs.base import JobQueue
from framewise.server.jobs.worker import JobWorker
from framewise.server.lifecycle import Lifecycle
from framewise.server.media.fetch import MediaFetcher
from framewise.server.media.files import FileStore
from framewise.server.media.sources import MediaResolver
from framewise.server.metrics import Metrics
from framewise.server.openapi import ERROR_RESPONSES
from framewise.server.quotas import TenantLimiter
from framewise.server.routers import chat, files, health, jobs, models, playground
from framewise.server.settings import Settings
from framewise.server.tenants import KeyRing
from framewise.server.video.decode import DecodeLimits
from framewise.server.video.pool import DecodePool
from framewise.server.video.service import FrameCache, VideoService
from framewise.server.video.shared_cache import SharedFrameStore

MB = 1 << 20
ENGINE_WATCH_S = 1.0  # how often the engine watcher looks at the engine
access_log = logging.getLogger("framewise.access")
log = logging.getLogger("framewise.lifecycle")


@dataclass
class Services:
    settings: Settings
    engine: EngineAPI
    metrics: Metrics
    files: FileStore
    media: MediaResolver
    video: VideoService
    pool: DecodePool
    fetcher: MediaFetcher
    jobs: JobQueue
    tenants: KeyRing | None = None
    limiter: TenantLimiter | None = None
    inflight: int = 0
    admission: Admission | None = None
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    _watcher: asyncio.Task | None = field(default=None, repr=False)

    async def start(self) -> None:
        self.lifecycle.attach(asyncio.get_running_loop())
        await self.pool.start()
        await self.fetcher.start()
        await self.engine.start()
        self._watcher = asyncio.create_task(self._watch_engine())

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        self.engine.shutdown()
        await self.fetcher.close()
        await self.pool.close()
        await self.jobs.close()
        if self.limiter is not None:
            await self.limiter.close()

    def engine_is_dead(self) -> bool:
        dead = getattr(self.engine, "dead", None)  # a stand-in engine without `dead`: dead once not ready
        return bool(dead) if dead is not None else not self.engine.ready

    def check_engine(self, detail: str = "") -> bool:
        """Look at the engine now (the watcher does every ENGINE_WATCH_S; the pipeline when a request meets
        ``EngineDeadError``): a dead engine makes the process go away (server/lifecycle.py). True: dead."""
        if not self.lifecycle.engine_dead and self.engine_is_dead():
            self.lifecycle.engine_died(detail)
        return self.lifecycle.engine_dead

    async def _watch_engine(self) -> None:
        while not self.check_engine("engine watcher"):
            await asyncio.sleep(ENGINE_WATCH_S)

    def worker(self) -> JobWorker:
        s = self.settings
        return JobWorker(self.jobs, lambda job, report: run_chat_job(self, job, report),
                         concurrency=s.worker_concurrency, heartbeat_s=s.job_heartbeat_s, metrics=self.metrics,
                         fatal=self.lifecycle.dead)


def build_services(settings: Settings, engine: Engine | None = None) -> Services:
    spool = os.path.join(settings.files_dir, ".spool")
    os.makedirs(spool, exist_ok=True)
    pool = DecodePool(settings.decode_workers)
    fetcher = MediaFetcher(settings.allowed_media_hosts, timeout_s=settings.fetch_timeout_s,
                           max_redirects=settings.max_redirects, spool_dir=spool)
    # bytes a gateway downloaded for a job (a long video) live in the shared store until the job ends; those of
    # jobs that never ran (cancelled while queued) are swept after two result TTLs
    store = FileStore(settings.files_dir, int(settings.max_upload_mb * MB), staged_ttl_s=2 * settings.job_result_ttl_s)
    services = Services(
        settings=settings,
        engine=engine or Engine(settings),
        metrics=Metrics(),
        files=store,
        media=MediaResolver(fetcher, store, spool, settings.allowed_local_media_path,
                            ranged_from=None if settings.range_reads_above_mb is None
                            else int(settings.range_reads_above_mb * MB)),
        video=VideoService(pool, FrameCache(int(settings.frame_cache_mb * MB)),
                           DecodeLimits(settings.max_duration_s, settings.max_pixels, settings.decode_threads),
                           settings.decode_timeout_s,
                           SharedFrameStore(os.path.join(settings.files_dir, "frame-cache"),
                                            int(settings.shared_frame_cache_mb * MB))
                           if settings.shared_frame_cache_mb > 0 else None),
        pool=pool,
        fetcher=fetcher,
        jobs=make_queue(settings),
    )
    services.admission = Admission(services, int(settings.max_body_in_flight_mb * MB))
    return services


async def _sweep_files(services: Services, every_s: float) -> None:
    """Expired uploads (past their tenant's retention) and staged files of jobs that never ended, removed."""
    while True:
        await asyncio.sleep(every_s)
        try:
            removed = await asyncio.to_thread(services.files.sweep)
            if removed:
                log.info("files sweep: %d expired files removed", removed)
        except Exception as e:  # noqa: BLE001 - the next sweep tries again
            log.warning("files sweep failed: %s", e)


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
                tenant = scope["state"].get("tenant")
                if tenant is not None and self.services.tenants is not None:
                    self.services.metrics.tenant_requests.labels(self.services.tenants.label(tenant.name),
                                                                 str(status)).inc()
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
    # the gateway's tenants (the keys file read now: one that does not parse stops the start) and their limits
    services.tenants = KeyRing(settings)
    services.limiter = TenantLimiter(settings.redis_url, settings.redis_prefix)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await services.start()
        stop = asyncio.Event()
        # the in-process queue has no other consumer; with Redis, `--consume` makes one process a whole system
        consume = settings.consume or not settings.redis_url
        # in-process jobs get 10 s to finish at shutdown, then are handed back (the wait below covers that)
        worker = asyncio.create_task(services.worker().run(stop, grace_s=10.0)) if consume else None
        sweeper = asyncio.create_task(_sweep_files(services, settings.files_sweep_s))
        loop = asyncio.get_running_loop()
        hup = False
        if services.tenants is not None and services.tenants.path is not None:
            # SIGHUP re-reads the keys file (it is also re-read when it changes); only in the main thread
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.add_signal_handler(signal.SIGHUP, services.tenants.load)
                hup = True
        try:
            yield
        finally:
            sweeper.cancel()
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            stop.set()
            if worker is not None:
                await asyncio.wait({worker}, timeout=15)
            await services.stop()

    # no automatic trailing-slash redirects: Starlette builds their absolute Location from the Host header
    # (EdgeMiddleware routes `/v1/jobs/` as `/v1/jobs` instead)
    app = FastAPI(title="Framewise", version="0.1.0", lifespan=lifespan, redirect_slashes=False)
    app.state.services = services
    install_error_handlers(app)
    # a request vLLM refuses (its SamplingParams checks, found by schemathesis as 500s) is the client's error
    app.add_exception_handler(VLLMClientError, lambda request, exc: error_response(400, "invalid_request", str(exc)))
    for router in (chat.router, files.router, models.router, jobs.router, health.router):
        app.include_router(router, responses=ERROR_RESPONSES)
    app.include_router(playground.router)  # the page; not in the OpenAPI document
    # Outermost first: record (logs and counts every answer below) -> edges (header count, Host, trailing
    # slash) -> body limits and the API key (413/401 before reading) -> admission (chat slot, body bytes in
    # flight, before reading) -> the application, which reads the body. Starlette: the last added is outermost.
    app.add_middleware(AdmissionMiddleware, admission=services.admission,
                       body_idle_timeout_s=settings.body_idle_timeout_s)
    app.add_middleware(BodyLimitMiddleware, limits=BodyLimits.from_settings(settings), tenants=services.tenants)
    app.add_middleware(EdgeMiddleware, max_headers=settings.max_headers)
    app.add_middleware(RecordMiddleware, services=services)
    return app
