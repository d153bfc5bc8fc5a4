"""``/v1/files``: upload, list, look up and delete media files -- each the caller's own (server/media/files.py).

The upload's size is bounded while it streams in (server/http_limits.py) and again, exactly, as
it is written (server/media/files.py). Another tenant's file is 404 on every route, as one that never
existed; an admin sees and may delete everyone's."""

import asyncio

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile

from framewise.server.deps import get_services, require_api_key
from framewise.server.errors import APIError
from framewise.server.media.files import StorageQuotaExceeded
from framewise.server.openapi import FileDeleted, FileList, FileObject
from framewise.server.tenants import Tenant

router = APIRouter(prefix="/v1/files", tags=["files"], dependencies=[Depends(require_api_key)])


@router.post("", responses={200: {"model": FileObject}})
async def upload_file(file: UploadFile = File(...), purpose: str = Form("vision"), services=Depends(get_services),
                      tenant: Tenant = Depends(require_api_key)):
    lim = tenant.limits
    try:
        obj = await services.files.save(file, purpose, tenant.name, retention_s=lim.retention_s,
                                        quota_bytes=lim.storage_bytes)
    except StorageQuotaExceeded:
        ring = getattr(services, "tenants", None)
        services.metrics.tenant_refused.labels(ring.label(tenant.name) if ring else "other", "storage").inc()
        raise
    return obj.public()


@router.get("", responses={200: {"model": FileList}})
async def list_files(services=Depends(get_services), tenant: Tenant = Depends(require_api_key),
                     purpose: str | None = Query(None), limit: int = Query(10000, ge=1, le=10000),
                     order: str = Query("desc"), after: str | None = Query(None)):
    """The caller's files (an admin: everyone's), OpenAI's list shape: newest first (``order=asc``: oldest),
    ``limit`` per page, ``after`` a file id of the previous page."""
    if order not in ("asc", "desc"):
        raise APIError(422, "invalid_parameter", "order must be asc or desc", "order")
    files = await asyncio.to_thread(services.files.list, tenant.scope, purpose)
    if order == "asc":
        files.reverse()
    if after is not None:
        ids = [f.id for f in files]
        files = files[ids.index(after) + 1:] if after in ids else []
    page = files[:limit]
    return {"object": "list", "data": [f.public() for f in page], "has_more": len(files) > limit,
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}


@router.get("/{file_id}", responses={200: {"model": FileObject}})
async def get_file(file_id: str, services=Depends(get_services), tenant: Tenant = Depends(require_api_key)):
    obj, _ = services.files.get(file_id, tenant.scope)
    return obj.public()


@router.delete("/{file_id}", responses={200: {"model": FileDeleted}})
async def delete_file(file_id: str, services=Depends(get_services), tenant: Tenant = Depends(require_api_key)):
    services.files.delete(file_id, tenant.scope)
    return {"id": file_id, "object": "file", "deleted": True}
