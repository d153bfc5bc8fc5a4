"""``GET /v1/models``."""

import time

from fastapi import APIRouter, Depends

from framewise.server.deps import check_model, get_services, require_api_key
from framewise.server.openapi import ModelCard, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require_api_key)])
_STARTED = int(time.time())


def _model(name: str) -> dict:
    return {"id": name, "object": "model", "created": _STARTED, "owned_by": "framewise"}


@router.get("", responses={200: {"model": ModelList}})
async def list_models(services=Depends(get_services)):
    return {"object": "list", "data": [_model(services.settings.model_name)]}


@router.get("/{model_id:path}", responses={200: {"model": ModelCard}})
async def get_model(model_id: str, services=Depends(get_services)):
    check_model(services, model_id)
    return _model(model_id)
