"""``POST /v1/chat/completions``: the HTTP adapter of the chat pipeline (:mod:`framewise.server.chat.pipeline`).

Here: validation and the admission slot (taken before the body is read: server/admission.py). The answer
-- JSON, server-sent events, or a queued completion's -- the timeout, the client leaving and the error
classification are the pipeline's (:func:`framewise.server.chat.pipeline.respond`).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from framewise.server.admission import ChatSlot as _Slot  # `_Slot`: the name tests and callers know
from framewise.server.chat import pipeline
from framewise.server.deps import get_services, require_api_key
from framewise.server.openapi import CHAT_RESPONSES
from framewise.server.schemas import ChatCompletionRequest

router = APIRouter(prefix="/v1/chat", tags=["chat"], dependencies=[Depends(require_api_key)])


@router.post("/completions", responses=CHAT_RESPONSES)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, services=Depends(get_services)):
    # taken before the body was read (server/admission.py); the pipeline releases it as the work allows
    slot = getattr(request.state, "chat_slot", None) or _Slot(services)
    return await pipeline.respond(services, body, request, slot)
