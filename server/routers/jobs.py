"""``/v1/jobs``: asynchronous chat completions for long videos.

The job store not answering (a Redis outage): every route answers 503 ``queue_unavailable`` with
``Retry-After`` (server/errors.py); an events stream already open ends with one ``event: error`` whose data
names the job and the ``last_event_id`` to resume from (send it back as ``Last-Event-ID``).

Jobs belong to the tenant that submitted them (server/tenants.py): another tenant gets 404 on get, events and
cancel, as for a job that never existed, and never sees them listed; ``Idempotency-Key`` is per tenant. An
admin sees and may cancel everyone's."""

from __future__ import annotations

import json
import math
import re

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import JSONResponse, StreamingResponse

from framewise.server.deps import check_model, check_parameters, get_services, require_api_key
from framewise.server.errors import APIError, error_body
from framewise.server.jobs.base import STATUSES, JobNotFound, QueueUnavailable, valid_job_id
from framewise.server.openapi import JobList, JobObject, sse
from framewise.server.schemas import ChatCompletionRequest
from framewise.server.tenants import Tenant

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)])


# an Idempotency-Key becomes part of a Redis key name: printable ASCII without spaces, bounded
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def _not_found(job_id: str) -> APIError:
    shown = job_id if len(job_id) <= 80 else job_id[:80] + "..."
    return APIError(404, "job_not_found", f"no job with id {shown!r}", "job_id")


def _known_id(job_id: str) -> str:
    """Ids outside the grammar of job ids name no job: 404 before any store is asked."""
    if not valid_job_id(job_id):
        raise _not_found(job_id)
    return job_id


@router.post("", status_code=202, responses={202: {"model": JobObject}, 200: {"model": JobObject}})
async def submit_job(body: ChatCompletionRequest, services=Depends(get_services),
                     idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
                     tenant: Tenant = Depends(require_api_key)):
    check_model(services, body.model)
    check_parameters(body)
    if idempotency_key is not None and not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
        raise APIError(422, "invalid_parameter", "Idempotency-Key must be 1 to 255 printable ASCII characters "
                       "without spaces", "Idempotency-Key")
    job, created = await services.jobs.submit(body.model_dump(exclude_none=True), idempotency_key,
                                              owner=tenant.name, max_active=tenant.limits.jobs)
    return JSONResponse(job.public(), status_code=202 if created else 200, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("", responses={200: {"model": JobList}})
async def list_jobs(services=Depends(get_services), status: str | None = Query(None),
                    limit: int = Query(20, ge=1, le=100), before: float | None = Query(None),
                    tenant: Tenant = Depends(require_api_key)):
    if status is not None and status not in STATUSES:
        raise APIError(422, "invalid_parameter", f"status must be one of {', '.join(STATUSES)}", "status")
    if before is not None and not math.isfinite(before):
        raise APIError(422, "invalid_parameter", "before must be a finite number (a job's created_at)", "before")
    jobs = await services.jobs.list(status, limit + 1, before, owner=tenant.scope)
    page = jobs[:limit]
    return {"object": "list", "data": [j.public() for j in page], "has_more": len(jobs) > limit,
            "next_before": page[-1].created_at if len(jobs) > limit else None}


@router.get("/{job_id}", responses={200: {"model": JobObject}})
async def get_job(job_id: str, services=Depends(get_services), tenant: Tenant = Depends(require_api_key)):
    try:
        return (await services.jobs.get(_known_id(job_id), tenant.scope)).public()
    except JobNotFound:
        raise _not_found(job_id) from None


@router.delete("/{job_id}", responses={200: {"model": JobObject}})
async def cancel_job(job_id: str, services=Depends(get_services), tenant: Tenant = Depends(require_api_key)):
    try:
        return (await services.jobs.cancel(_known_id(job_id), tenant.scope)).public()
    except JobNotFound:
        raise _not_found(job_id) from None


@router.get("/{job_id}/events", responses={200: sse("progress events")})
async def job_events(job_id: str, services=Depends(get_services),
                     last_event_id: str | None = Header(None, alias="Last-Event-ID"),
                     tenant: Tenant = Depends(require_api_key)):
    try:
        await services.jobs.get(_known_id(job_id), tenant.scope)
    except JobNotFound:
        raise _not_found(job_id) from None

    async def stream():
        last = last_event_id or "0"
        try:
            async for event_id, event in services.jobs.events(job_id, last, tenant.scope):
                last = event_id
                yield f"id: {event_id}\nevent: {event.get('stage', 'progress')}\ndata: {json.dumps(event)}\n\n"
        except QueueUnavailable:
            data = {**error_body(503, "queue_unavailable", "the job queue stopped answering; reconnect with "
                                 "Last-Event-ID to resume"), "job_id": job_id, "last_event_id": last}
            yield f"event: error\nretry: {QueueUnavailable.RETRY_AFTER_S * 1000}\ndata: {json.dumps(data)}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
