"""Liveness, readiness and Prometheus metrics."""

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from server.deps import get_services
from server.errors import error_response

router = APIRouter(tags=["health"])


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(services=Depends(get_services)):
    if not services.engine.ready:
        return error_response(503, "engine_not_ready", "the engine is not ready")
    return JSONResponse({"status": "ready", "model": services.settings.model_name})


@router.get("/metrics")
async def metrics(services=Depends(get_services)):
    services.metrics.decode_restarts.set(services.pool.restarts)
    return Response(services.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
