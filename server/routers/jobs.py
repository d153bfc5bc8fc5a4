"""``/v1/jobs``: asynchronous chat completions for long videos."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import JSONResponse, StreamingResponse

from server.deps import get_services, require_api_key
from server.errors import APIError
from server.jobs.base import STATUSES, JobNotFound
from server.openapi import JobList, JobObject, sse
from server.schemas import ChatCompletionRequest

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)])


def _not_found(job_id: str) -> APIError:
    return APIError(404, "job_not_found", f"no job with id {job_id!r}", "job_id")


@router.post("", status_code=202, responses={202: {"model": JobObject}, 200: {"model": JobObject}})
async def submit_job(body: ChatCompletionRequest, services=Depends(get_services),
                     idempotency_key: str | None = Header(None, alias="Idempotency-Key")):
    if body.model != services.settings.model_name:
        raise APIError(404, "model_not_found", f"the model {body.model!r} does not exist", "model")
    job, created = await services.jobs.submit(body.model_dump(exclude_none=True), idempotency_key)
    return JSONResponse(job.public(), status_code=202 if created else 200, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("", responses={200: {"model": JobList}})
async def list_jobs(services=Depends(get_services), status: str | None = Query(None),
                    limit: int = Query(20, ge=1, le=100), before: float | None = Query(None)):
    if status is not None and status not in STATUSES:
        raise APIError(422, "invalid_parameter", f"status must be one of {', '.join(STATUSES)}", "status")
    jobs = await services.jobs.list(status, limit + 1, before)
    page = jobs[:limit]
    return {"object": "list", "data": [j.public() for j in page], "has_more": len(jobs) > limit,
            "next_before": page[-1].created_at if len(jobs) > limit else None}


@router.get("/{job_id}", responses={200: {"model": JobObject}})
async def get_job(job_id: str, services=Depends(get_services)):
    try:
        return (await services.jobs.get(job_id)).public()
    except JobNotFound:
        raise _not_found(job_id) from None


@router.delete("/{job_id}", responses={200: {"model": JobObject}})
async def cancel_job(job_id: str, services=Depends(get_services)):
    try:
        return (await services.jobs.cancel(job_id)).public()
    except JobNotFound:
        raise _not_found(job_id) from None


@router.get("/{job_id}/events", responses={200: sse("progress events")})
async def job_events(job_id: str, services=Depends(get_services),
                     last_event_id: str | None = Header(None, alias="Last-Event-ID")):
    try:
        await services.jobs.get(job_id)
    except JobNotFound:
        raise _not_found(job_id) from None

    async def stream():
        async for event_id, event in services.jobs.events(job_id, last_event_id or "0"):
            yield f"id: {event_id}\nevent: {event.get('stage', 'progress')}\ndata: {json.dumps(event)}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
