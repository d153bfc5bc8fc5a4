"""Liveness, readiness and Prometheus metrics."""

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from server.deps import get_services
from server.errors import error_response
from server.metrics import refresh_queue_gauges
from server.openapi import Health, Ready, plain_text

router = APIRouter(tags=["health"])


@router.get("/health", responses={200: {"model": Health}})
async def health():
    return {"status": "ok"}


@router.get("/ready", responses={200: {"model": Ready}})
async def ready(services=Depends(get_services)):
    if not services.engine.ready:
        return error_response(503, "engine_not_ready", "the engine is not ready")
    if not await services.jobs.ping():
        return error_response(503, "queue_unavailable", "the job queue (Redis) is not reachable")
    return JSONResponse({"status": "ready", "model": services.settings.model_name})


@router.get("/metrics", responses={200: plain_text("Prometheus text format")})
async def metrics(services=Depends(get_services)):
    await refresh_queue_gauges(services)
    return Response(services.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
