"""Liveness, readiness and Prometheus metrics.

``/health`` (liveness): 200 while the process can serve; 503 ``engine_dead`` once its engine died (the
process exits with status 1 moments later: server/lifecycle.py). ``/ready`` (readiness): the engine is up.
Neither asks Redis: short videos never touch it, so a Redis outage takes no replica out of service; queue
reachability is ``framewise_queue_up`` on ``/metrics`` (alert FramewiseQueueDown), and the job routes answer
503 ``queue_unavailable`` while it is 0."""

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from framewise.server.deps import get_services
from framewise.server.errors import error_response
from framewise.server.metrics import refresh_queue_gauges
from framewise.server.openapi import Health, Ready, plain_text

router = APIRouter(tags=["health"])


def _engine_dead() -> JSONResponse:
    return error_response(503, "engine_dead", "the inference engine died; this process is exiting")


@router.get("/health", responses={200: {"model": Health}})
async def health(services=Depends(get_services)):
    if services.lifecycle.engine_dead:
        return _engine_dead()
    return {"status": "ok"}


@router.get("/ready", responses={200: {"model": Ready}})
async def ready(services=Depends(get_services)):
    if services.lifecycle.engine_dead:
        return _engine_dead()
    if not services.engine.ready:
        return error_response(503, "engine_not_ready", "the engine is not ready")
    return JSONResponse({"status": "ready", "model": services.settings.model_name})


@router.get("/metrics", responses={200: plain_text("Prometheus text format")})
async def metrics(services=Depends(get_services)):
    await refresh_queue_gauges(services)
    return Response(services.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
