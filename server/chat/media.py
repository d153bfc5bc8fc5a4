"""Media in the messages -> sampled frames and images; messages -> the prompt (chat template)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from server.chat.thumbnails import add_thumbnails
from server.errors import APIError
from server.schemas import ChatCompletionRequest, ImagePart, TextPart, VideoPart
from server.video.decode import MediaError
from server.video.sampling import FrameSampling
from server.video.service import FramesEvicted

MB = 1 << 20
# the placeholder each media part must leave in the rendered prompt (the model plugins' get_placeholder_str);
# a tokenizer that declares its own (``tokenizer.image_token``/``video_token``) overrides these
PLACEHOLDERS = {"video": "<video>", "image": "<image>"}


@dataclass
class Prepared:
    prompt: dict
    media: list[dict] = field(default_factory=list)  # what the model saw, reported back

    @property
    def video_frames(self) -> int:
        return sum(m.get("frames", 0) for m in self.media if m["type"] == "video")


class LongVideo(Exception):
    """This request's video is long enough to go through the job queue."""


def _fps(v, defaults) -> float | None:
    """The request's fps; else the model's default rate (``fps`` in config.json) unless it asked for num_frames."""
    if v.fps is not None or v.num_frames is not None:
        return v.fps
    return getattr(defaults, "fps", None)


async def _sample(services, v, media, params: FrameSampling, shape: dict, route_long: bool):
    s = services.settings
    try:
        if route_long and s.queue_above_mb is not None and media.size > s.queue_above_mb * MB:
            raise LongVideo(v.url)
        return await services.video.sample(media.path, media.sha256, params, **shape,
                                           queue_above_s=s.queue_above_s if route_long else None)
    finally:
        media.release()


async def _video(services, part: VideoPart, route_long: bool) -> tuple[object, dict]:
    s, v = services.settings, part.video_url
    defaults = services.engine.defaults
    params = FrameSampling(v.num_frames, _fps(v, defaults), v.start, v.end)
    shape = {"default_frames": defaults.num_frames, "max_frames": defaults.max_frames,
             "shortest_edge": defaults.shortest_edge}
    max_bytes = int(s.max_video_mb * MB)
    # a URL asked about before: a conditional GET, and no download when its frames are cached
    media = await services.media.revalidate(v.url, max_bytes, lambda sha: services.video.cached(sha, params, **shape))
    if media is not None:
        try:
            res = await _sample(services, v, media, params, shape, route_long)
        except FramesEvicted:  # evicted between the revalidation and now: download after all
            media = None
    if media is None:
        media = await services.media.resolve(v.url, max_bytes)
        res = await _sample(services, v, media, params, shape, route_long)
    if res is None:
        raise LongVideo(v.url)
    m = services.metrics
    m.fetch_bytes.inc(media.downloaded_bytes)
    if media.path is None:
        m.fetch_not_modified.inc()
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


def _template_messages(body: ChatCompletionRequest) -> list[dict]:
    """The messages as the chat template sees them: media parts become ``{"type": "video"|"image"}``."""
    messages = []
    for m in body.messages:
        if not isinstance(m.content, list):
            messages.append({"role": m.role, "content": m.content or ""})
            continue
        content = []
        for p in m.content:
            if isinstance(p, TextPart):
                content.append({"type": "text", "text": p.text})
            else:
                content.append({"type": "video" if isinstance(p, VideoPart) else "image"})
        messages.append({"role": m.role, "content": content})
    return messages


def render_prompt(engine, body: ChatCompletionRequest, videos: int, images: int) -> str:
    """The chat template's rendering of the messages, refused (400) when the template does not place every
    media part: a template that renders only text and images (the one llava-hf checkpoints ship) would
    silently drop a video."""
    try:
        text = engine.render(_template_messages(body))
    except Exception as e:
        raise APIError(400, "invalid_messages", f"the model's chat template rejected the messages: {e}",
                       "messages") from None
    tokenizer = getattr(engine, "tokenizer", None)
    for kind, count in (("video", videos), ("image", images)):
        model_placeholders = getattr(getattr(engine, "defaults", None), "placeholders", None) or {}
        placeholder = (getattr(tokenizer, f"{kind}_token", None) or model_placeholders.get(kind)
                       or PLACEHOLDERS[kind])
        if count and text.count(placeholder) < count:
            raise APIError(400, "unsupported_media_in_template",
                           f"the model's chat template places {text.count(placeholder)} of the request's {count} "
                           f"{kind} part(s) ({placeholder!r} placeholders); refusing rather than dropping media",
                           "messages")
    return text


async def prepare(services, body: ChatCompletionRequest, route_long: bool = False) -> Prepared:
    """Render the chat template (refusing media it cannot place), then fetch and sample every media part
    concurrently.

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
    text = render_prompt(services.engine, body, len(videos), len(images))  # before any fetch
    try:
        loaded = await asyncio.gather(*[_video(services, p, route_long) for p in videos],
                                      *[_image(services, p) for p in images])
    except MediaError as e:
        services.metrics.media_errors.labels(e.code).inc()
        raise APIError.from_media(e) from None
    except APIError as e:
        services.metrics.media_errors.labels(e.code).inc()
        raise
    video_items, image_items = iter(loaded[: len(videos)]), iter(loaded[len(videos):])
    ordered = [next(video_items) if isinstance(p, VideoPart) else next(image_items)
               for p in parts if not isinstance(p, TextPart)]
    media = [info for _, info in ordered]
    if body.framewise is not None and body.framewise.return_frames == "thumbnails":
        await add_thumbnails(ordered, s.model)
    mm = {}
    if videos:
        mm["video"] = [x for x, _ in loaded[: len(videos)]]
    if images:
        mm["image"] = [x for x, _ in loaded[len(videos):]]
    prompt = {"prompt": text}
    if mm:
        prompt["multi_modal_data"] = mm
    return Prepared(prompt, media)
