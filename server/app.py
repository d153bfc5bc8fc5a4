"""FastAPI application factory: routers per resource, services in ``app.state``."""

from __future__ import annotations

import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request

from server.engine import Engine
from server.errors import install_error_handlers
from server.media.fetch import MediaFetcher
from server.media.files import FileStore
from server.media.sources import MediaResolver
from server.metrics import Metrics
from server.routers import chat, files, health, models
from server.settings import Settings
from server.video.decode import DecodeLimits
from server.video.pool import DecodePool
from server.video.service import FrameCache, VideoService

MB = 1 << 20


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
    inflight: int = 0


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
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
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await pool.start()
        await fetcher.start()
        await services.engine.start()
        try:
            yield
        finally:
            services.engine.shutdown()
            await fetcher.close()
            await pool.close()

    app = FastAPI(title="Framewise", version="0.1.0", lifespan=lifespan)
    app.state.services = services
    install_error_handlers(app)
    for router in (chat.router, files.router, models.router, health.router):
        app.include_router(router)

    @app.middleware("http")
    async def record(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        services.metrics.requests.labels(route, str(response.status_code)).inc()
        services.metrics.request_seconds.labels(route).observe(time.perf_counter() - start)
        return response

    return app
