"""``/v1/files``: upload, look up and delete media files (content-addressed).

The upload's size is bounded while it streams in (server/http_limits.py) and again, exactly, as
it is written (server/media/files.py)."""

from fastapi import APIRouter, Depends, File, Form, UploadFile

from server.deps import get_services, require_api_key
from server.openapi import FileDeleted, FileObject

router = APIRouter(prefix="/v1/files", tags=["files"], dependencies=[Depends(require_api_key)])


@router.post("", responses={200: {"model": FileObject}})
async def upload_file(file: UploadFile = File(...), purpose: str = Form("vision"), services=Depends(get_services)):
    obj = await services.files.save(file, purpose)
    return obj.public()


@router.get("/{file_id}", responses={200: {"model": FileObject}})
async def get_file(file_id: str, services=Depends(get_services)):
    obj, _ = services.files.get(file_id)
    return obj.public()


@router.delete("/{file_id}", responses={200: {"model": FileDeleted}})
async def delete_file(file_id: str, services=Depends(get_services)):
    services.files.delete(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
