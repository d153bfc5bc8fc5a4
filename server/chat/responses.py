"""OpenAI chat-completion shapes: the completion object, stream chunks, logprobs, SSE error events."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

from framewise.server.errors import APIError


class CompletionIds:
    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model


def _token_entry(text: str | None, logprob: float) -> dict:
    text = text or ""
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def logprobs_of(token_ids, logprobs, top_k: int) -> dict | None:
    """OpenAI ``logprobs.content`` from vLLM's per-token {token_id: Logprob} dicts."""
    if logprobs is None:
        return None
    content = []
    for tok, entries in zip(token_ids, logprobs, strict=False):
        chosen = entries[tok]
        top = sorted((lp for lp in entries.values() if lp.rank is not None and lp.rank <= top_k),
                     key=lambda lp: lp.rank)
        content.append({**_token_entry(chosen.decoded_token, chosen.logprob),
                        "top_logprobs": [_token_entry(lp.decoded_token, lp.logprob) for lp in top]})
    return {"content": content}


def usage_of(prompt_tokens: int, completion_tokens: int, video_frames: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "video_frames": video_frames}


def chunk(ids: CompletionIds, choices: list[dict], usage: dict | None = None, extra: dict | None = None) -> str:
    body = {"id": ids.id, "object": "chat.completion.chunk", "created": ids.created, "model": ids.model,
            "choices": choices}
    if usage is not None:
        body["usage"] = usage
    if extra:
        body.update(extra)
    return f"data: {json.dumps(body)}\n\n"


def delta_choice(index: int, delta: dict, finish_reason=None, logprobs=None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def error_event(e: APIError) -> str:
    """An error after the stream has begun: one ``data: {"error": ...}`` event, then the stream ends
    without ``[DONE]`` (the OpenAI SDKs raise ``APIError`` on such an event)."""
    return f"data: {json.dumps(e.body())}\n\n"


def result_chunks(result: dict, include_usage: bool, extra: dict | None = None) -> Iterator[str]:
    """A finished completion object replayed as a stream (a queued completion's job result)."""
    ids = CompletionIds(result["model"])
    ids.id, ids.created = result["id"], result["created"]
    for c in result["choices"]:
        yield chunk(ids, [delta_choice(c["index"], {"role": "assistant", "content": ""})],
                    extra={"framewise": {**result.get("framewise", {}), **(extra or {})}} if c["index"] == 0 else None)
        yield chunk(ids, [delta_choice(c["index"], {"content": c["message"]["content"]}, logprobs=c.get("logprobs"))])
        yield chunk(ids, [delta_choice(c["index"], {}, finish_reason=c["finish_reason"])])
    if include_usage:
        yield chunk(ids, [], usage=result["usage"])
    yield "data: [DONE]\n\n"
