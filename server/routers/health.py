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
    if not await services.jobs.ping():
        return error_response(503, "queue_unavailable", "the job queue (Redis) is not reachable")
    return JSONResponse({"status": "ready", "model": services.settings.model_name})


@router.get("/metrics")
async def metrics(services=Depends(get_services)):
    m = services.metrics
    m.decode_restarts.set(services.pool.restarts)
    try:
        m.queue_depth.set(await services.jobs.depth())
        m.oldest_job_age.set(await services.jobs.oldest_age())
        m.job_reclaims.set(services.jobs.reclaims)
    except Exception:  # Redis down: /ready reports it; metrics still render
        pass
    return Response(services.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
