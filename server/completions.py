"""Chat completions: media in the messages -> frames, prompt -> vLLM, outputs -> OpenAI JSON."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from server.errors import APIError
from server.schemas import ChatCompletionRequest, ImagePart, TextPart, VideoPart
from server.video.decode import MediaError
from server.video.sampling import SamplingParams as VideoSampling

MB = 1 << 20


@dataclass
class Prepared:
    prompt: dict
    media: list[dict] = field(default_factory=list)  # what the model saw, reported back

    @property
    def video_frames(self) -> int:
        return sum(m.get("frames", 0) for m in self.media if m["type"] == "video")


class LongVideo(Exception):
    """This request's video is long enough to go through the job queue."""


async def _video(services, part: VideoPart, route_long: bool) -> tuple[object, dict]:
    s, v = services.settings, part.video_url
    defaults = services.engine.defaults
    media = await services.media.resolve(v.url, int(s.max_video_mb * MB))
    try:
        if route_long and s.queue_above_mb is not None and media.size > s.queue_above_mb * MB:
            raise LongVideo(v.url)
        res = await services.video.sample(
            media.path, media.sha256, VideoSampling(v.num_frames, v.fps, v.start, v.end),
            default_frames=defaults.num_frames, max_frames=defaults.max_frames, shortest_edge=defaults.shortest_edge,
            queue_above_s=s.queue_above_s if route_long else None)
    finally:
        media.release()
    if res is None:
        raise LongVideo(v.url)
    m = services.metrics
    m.fetch_bytes.inc(media.size)
    m.fetch_seconds.observe(media.fetch_seconds)
    if res.cache_hit:
        m.frame_cache_hits.inc()
    else:
        m.decode_seconds.observe(res.decode_seconds)
    m.frames_sampled.inc(len(res.video.timestamps))
    info = res.video.info
    return res.video.frames, {
        "type": "video", "frames": len(res.video.timestamps), "timestamps": res.video.timestamps,
        "duration_s": round(info.duration, 3), "source_fps": round(info.frame_rate, 3), "codec": info.codec,
        "fetch_ms": round(media.fetch_seconds * 1000, 1), "decode_ms": round(res.decode_seconds * 1000, 1),
        "cache_hit": res.cache_hit,
    }


async def _image(services, part: ImagePart) -> tuple[object, dict]:
    media = await services.media.resolve(part.image_url.url, int(services.settings.max_image_mb * MB))
    try:
        start = time.perf_counter()
        image = await services.video.load_image(media.path)
    finally:
        media.release()
    services.metrics.fetch_bytes.inc(media.size)
    return image, {"type": "image", "width": int(image.shape[1]), "height": int(image.shape[0]),
                   "fetch_ms": round(media.fetch_seconds * 1000, 1),
                   "decode_ms": round((time.perf_counter() - start) * 1000, 1)}


async def prepare(services, body: ChatCompletionRequest, route_long: bool = False) -> Prepared:
    """Fetch and sample every media part (concurrently), render the chat template.

    With ``route_long``, raises :class:`LongVideo` (before decoding) when a video is longer or
    larger than the settings' thresholds, so the caller can run the request as a job."""
    s = services.settings
    parts = [p for m in body.messages if isinstance(m.content, list) for p in m.content]
    videos = [p for p in parts if isinstance(p, VideoPart)]
    images = [p for p in parts if isinstance(p, ImagePart)]
    if len(videos) > s.max_videos_per_request:
        raise APIError(400, "too_many_videos", f"at most {s.max_videos_per_request} videos per request", "messages")
    if len(images) > s.max_images_per_request:
        raise APIError(400, "too_many_images", f"at most {s.max_images_per_request} images per request", "messages")
    try:
        loaded = await asyncio.gather(*[_video(services, p, route_long) for p in videos],
                                      *[_image(services, p) for p in images])
    except MediaError as e:
        services.metrics.media_errors.labels(e.code).inc()
        raise APIError.from_media(e) from None
    except APIError as e:
        services.metrics.media_errors.labels(e.code).inc()
        raise
    video_data = [x for x, _ in loaded[: len(videos)]]
    image_data = [x for x, _ in loaded[len(videos):]]
    info = iter([i for _, i in loaded[: len(videos)]])
    image_info = iter([i for _, i in loaded[len(videos):]])

    messages, media = [], []
    for m in body.messages:
        if not isinstance(m.content, list):
            messages.append({"role": m.role, "content": m.content or ""})
            continue
        content = []
        for p in m.content:
            if isinstance(p, TextPart):
                content.append({"type": "text", "text": p.text})
            elif isinstance(p, VideoPart):
                content.append({"type": "video"})
                media.append(next(info))
            else:
                content.append({"type": "image"})
                media.append(next(image_info))
        messages.append({"role": m.role, "content": content})
    try:
        text = services.engine.render(messages)
    except Exception as e:
        raise APIError(400, "invalid_messages", f"the model's chat template rejected the messages: {e}",
                       "messages") from None
    mm = {}
    if video_data:
        mm["video"] = video_data
    if image_data:
        mm["image"] = image_data
    prompt = {"prompt": text}
    if mm:
        prompt["multi_modal_data"] = mm
    return Prepared(prompt, media)


def sampling_params(body: ChatCompletionRequest, stream: bool):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return SamplingParams(
        n=body.n,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        stop=stop,
        seed=body.seed,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        top_k=body.top_k if body.top_k is not None else 0,
        min_tokens=body.min_tokens or 0,
        repetition_penalty=body.repetition_penalty or 1.0,
        ignore_eos=body.ignore_eos,
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    )


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


def _finish(reason: str | None) -> str | None:
    return {"abort": "stop"}.get(reason, reason)


class CompletionIds:
    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model


def usage_of(prompt_tokens: int, completion_tokens: int, prepared: Prepared) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "video_frames": prepared.video_frames}


def completion_body(ids: CompletionIds, final, prepared: Prepared, top_k: int) -> dict:
    choices = [{
        "index": c.index,
        "message": {"role": "assistant", "content": c.text},
        "logprobs": logprobs_of(c.token_ids, c.logprobs, top_k),
        "finish_reason": _finish(c.finish_reason),
    } for c in sorted(final.outputs, key=lambda c: c.index)]
    completion = sum(len(c.token_ids) for c in final.outputs)
    return {
        "id": ids.id, "object": "chat.completion", "created": ids.created, "model": ids.model,
        "choices": choices, "usage": usage_of(len(final.prompt_token_ids), completion, prepared),
        "framewise": {"media": prepared.media},
    }


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
