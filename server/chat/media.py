"""Media in the messages -> sampled frames and images; messages -> the prompt (chat template)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from framewise.server.chat.thumbnails import add_thumbnails
from framewise.server.errors import APIError
from framewise.server.media.fetch import Deferred
from framewise.server.schemas import ChatCompletionRequest, ImagePart, TextPart, VideoPart
from framewise.server.tenants import DEFAULT
from framewise.server.video.decode import MediaError
from framewise.server.video.sampling import FrameSampling
from framewise.server.video.service import FramesEvicted

MB = 1 << 20
log = logging.getLogger("framewise.media")
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


@dataclass
class LongVideo:
    """The decision that a request runs as a job (a value :func:`prepare` returns, not an exception): one of
    its videos lasts longer than ``queue_above_s`` or is larger than ``queue_above_mb``. ``staged``: part
    position (``"<message>.<part>"``) -> the files-store id of bytes this gateway already downloaded, handed
    to the job so its worker does not fetch them again."""

    url: str
    reason: str  # "duration" | "size"
    staged: dict[str, str] = field(default_factory=dict)


@dataclass
class MediaRun:
    """How media is got for one run: a request (``route_long``: a long video is a :class:`LongVideo`
    decision, decided as early as the origin allows) or a job (a job-sized fetch timeout, transient fetch
    failures retried with backoff, ``staged`` bytes used instead of a second fetch)."""

    route_long: bool = False
    job: bool = False
    staged: dict[str, str] = field(default_factory=dict)
    owner: str | None = DEFAULT  # the tenant the media is got for: its file-<id>s, its staged bytes (None: admin)
    tenant: str = DEFAULT  # who owns what this run stages


class _Long(Exception):  # noqa: N818 - private: carries the decision out of the part's task (cancels the siblings)
    def __init__(self, decision: LongVideo):
        super().__init__(decision.url)
        self.decision = decision


def _fps(v, defaults) -> float | None:
    """The request's fps; else the model's default rate (``fps`` in config.json) unless it asked for num_frames."""
    if v.fps is not None or v.num_frames is not None:
        return v.fps
    return getattr(defaults, "fps", None)


def _early_check(services, url: str):
    """For a request that may route long: stop an http(s) download as soon as its ``Content-Length`` or its
    container header (the first bytes: an index-first MP4, Matroska) shows the video runs as a job -- the
    worker fetches it then, once. A header stating more than ``max_duration_s`` is refused before the rest is
    downloaded (the same refusal the full decode gives)."""
    s = services.settings

    async def early(length: int | None, path: str | None, size: int) -> str | bool | None:
        if path is None:
            if s.queue_above_mb is not None and length is not None and length > s.queue_above_mb * MB:
                return "size"
            return None if s.queue_above_s is not None else False
        duration = await services.video.header_duration(path)
        if duration is None:
            return None  # the header is further on (or at the end): look again at the next checkpoint
        if duration > s.max_duration_s:
            raise MediaError("video_too_long", f"video lasts {duration:.0f}s; the limit is {s.max_duration_s:.0f}s",
                             status=413)
        return "duration" if duration > s.queue_above_s else False

    return early


async def _resolve(services, url: str, max_bytes: int, run: MediaRun, early=None, ranged: bool = False):
    """The media, with a job's fetch policy: a job-sized timeout, transient failures tried
    ``job_fetch_attempts`` times in all with backoff (1 s, 2 s, ...). ``ranged``: a video, which a range-serving
    origin may let the decoder read in ranges."""
    s = services.settings
    if not run.job:
        return await services.media.resolve(url, max_bytes, early=early, owner=run.owner, ranged=ranged)
    for attempt in range(1, s.job_fetch_attempts + 1):
        try:
            return await services.media.resolve(url, max_bytes, timeout_s=s.job_fetch_timeout_s, owner=run.owner,
                                                ranged=ranged)
        except APIError as e:
            if not e.transient or attempt == s.job_fetch_attempts:
                raise
            log.warning("media fetch failed (%s), try %d of %d; retrying", e.message, attempt, s.job_fetch_attempts)
            await asyncio.sleep(min(2.0 ** (attempt - 1), 30.0))
    raise AssertionError("unreachable")


async def _staged(services, file_id: str, max_bytes: int, owner: str):
    """Bytes the gateway staged for this job, if the shared store has them (else the URL is fetched)."""
    try:
        return await services.media.resolve(file_id, max_bytes, owner=owner)
    except APIError as e:
        log.warning("staged media %s not in the files store (%s); fetching the URL", file_id, e.message)
        return None


async def _stage(services, media, url: str, position: str, owner: str) -> dict[str, str]:
    """Bytes downloaded here for a video that runs as a job: into the shared files store, ``{position: file
    id}`` (``{}`` when there is nothing worth handing over: a file id or path the worker reads itself, a data:
    URL inside the request)."""
    if not (media.temporary and media.path is not None and url.startswith(("http://", "https://"))):
        return {}
    name = url.split("?", 1)[0].rsplit("/", 1)[-1][:100] or "media"
    try:
        return {position: await asyncio.to_thread(services.files.stage, media.path, media.sha256, media.size, name,
                                                  owner)}
    except Exception as e:  # noqa: BLE001 - the worker fetches the URL instead
        log.warning("could not stage %s for its job: %s", url, e)
        return {}


def _check_fits(defaults, videos: list[VideoPart]) -> None:
    """Videos whose frame count is known before the download (``num_frames``, or the default) and whose tokens
    alone exceed the context are refused before any fetch: 400 ``context_length_exceeded`` naming frames ×
    tokens. (``fps`` sampling, and models whose tokens depend on the frame size, are checked by vLLM later.)"""
    tokens = getattr(defaults, "video_tokens", None)
    if tokens is None or not videos:
        return
    counted = []
    for part in videos:
        v = part.video_url
        if v.fps is not None or (v.num_frames is None and defaults.fps):
            return
        frames = v.num_frames or defaults.num_frames
        if frames > defaults.max_frames:
            return  # invalid_sampling says so, with its own message
        counted.append(frames)
    total = sum(tokens(f) for f in counted)
    if total > defaults.max_model_len:
        each = "; ".join(defaults.describe_video(f) for f in counted)
        raise APIError(400, "context_length_exceeded",
                       f"the video{'s' if len(counted) > 1 else ''} alone take {total} tokens ({each}), over the "
                       f"model's context of {defaults.max_model_len} tokens: ask fewer frames (video_url.num_frames) "
                       "or fewer videos", "messages")


async def _video(services, part: VideoPart, position: str, run: MediaRun) -> tuple[object, dict]:
    s, v = services.settings, part.video_url
    route_long = run.route_long
    defaults = services.engine.defaults
    params = FrameSampling(v.num_frames, _fps(v, defaults), v.start, v.end,
                           fps_rule=getattr(defaults, "fps_rule", "midpoints"),
                           seek=v.seek or s.video_seek or getattr(defaults, "seek", None) or "exact")
    shape = {"default_frames": defaults.num_frames, "max_frames": defaults.max_frames,
             "shortest_edge": defaults.shortest_edge}
    queue_above_s = s.queue_above_s if route_long else None
    max_bytes = int(s.max_video_mb * MB)

    def too_big(media) -> bool:  # a download's size: a video read in ranges is routed by its duration alone
        return route_long and s.queue_above_mb is not None and not media.in_ranges and media.size > s.queue_above_mb * MB

    res = None
    media = await _staged(services, run.staged[position], max_bytes, run.tenant) if position in run.staged else None
    if media is None:
        # a URL asked about before: a conditional GET, and no download when its frames are cached
        media = await services.media.revalidate(v.url, max_bytes,
                                                lambda sha: services.video.cached(sha, params, **shape))
        if media is not None and media.source is None:  # 304: the frames are cached
            try:
                if too_big(media):
                    raise _Long(LongVideo(v.url, "size"))
                res = await services.video.sample(None, media.sha256, params, **shape, queue_above_s=queue_above_s)
            except FramesEvicted:  # evicted between the revalidation and now: download after all
                media = None
            else:
                if res is None:
                    raise _Long(LongVideo(v.url, "duration"))
    if media is None:
        early = _early_check(services, v.url) if route_long and v.url.startswith(("http://", "https://")) else None
        media = await _resolve(services, v.url, max_bytes, run, early, ranged=True)
        if isinstance(media, Deferred):
            raise _Long(LongVideo(v.url, media.reason))
    if res is None:
        try:
            if too_big(media):
                raise _Long(LongVideo(v.url, "size", await _stage(services, media, v.url, position, run.tenant)))
            res = await services.video.sample(media.source, media.sha256, params, **shape,
                                              queue_above_s=queue_above_s)
            if res is None:
                raise _Long(LongVideo(v.url, "duration", await _stage(services, media, v.url, position,
                                                                      run.tenant)))
        finally:
            media.release()
    # "ranged": read from the origin in ranges; "download": fetched whole; "local": a file here (file://, an
    # upload, bytes a gateway staged for this job)
    read = "ranged" if media.in_ranges else "download" if v.url.startswith(("http://", "https://")) \
        and position not in run.staged else "local"
    m = services.metrics
    # bytes this decode read of the file or, in ranges, of the origin (0 for frames from a cache)
    bytes_read = 0 if res.cache_hit else res.video.extra.get("bytes_read", 0)
    m.fetch_bytes.inc(media.downloaded_bytes + (bytes_read if media.ranged is not None else 0))
    if media.source is None:
        m.fetch_not_modified.inc()
    m.fetch_seconds.observe(media.fetch_seconds)
    m.frame_cache_lookups.labels(res.cache).inc()
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
        "cache_hit": res.cache_hit, "frame_cache": res.cache,
        # per frame: the planned instant and how it was reached (seek "keyframe" may return a nearby keyframe)
        "seek": params.seek, "targets": res.video.extra.get("targets"), "seek_used": res.video.extra.get("seek_used"),
        # how the bytes were got and how many of the media's ``size_bytes`` the decode read
        "read": read, "bytes_read": bytes_read, "size_bytes": media.size,
    }


async def _image(services, part: ImagePart, run: MediaRun) -> tuple[object, dict]:
    media = await _resolve(services, part.image_url.url, int(services.settings.max_image_mb * MB), run)
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


def _positioned_parts(body: ChatCompletionRequest) -> list[tuple[str, object]]:
    """Every content part with its position ``"<message index>.<part index>"``."""
    return [(f"{i}.{j}", p) for i, m in enumerate(body.messages) if isinstance(m.content, list)
            for j, p in enumerate(m.content)]


async def prepare(services, body: ChatCompletionRequest, run: MediaRun | None = None) -> Prepared | LongVideo:
    """Render the chat template (refusing media it cannot place), then fetch and sample every media part
    concurrently, in one task group: the first part that fails cancels the others (their downloads and
    decodes), and so does a caller cancelled (the client left).

    With ``run.route_long``: a :class:`LongVideo` decision instead, as soon as one video is known to be
    longer or larger than the settings' thresholds (from its ``Content-Length`` or container header when the
    origin gives them, before the rest is downloaded; else after the download, whose bytes go to the job)."""
    s = services.settings
    run = run or MediaRun()
    parts = _positioned_parts(body)
    videos = [(pos, p) for pos, p in parts if isinstance(p, VideoPart)]
    images = [(pos, p) for pos, p in parts if isinstance(p, ImagePart)]
    if len(videos) > s.max_videos_per_request:
        raise APIError(400, "too_many_videos", f"at most {s.max_videos_per_request} videos per request", "messages")
    if len(images) > s.max_images_per_request:
        raise APIError(400, "too_many_images", f"at most {s.max_images_per_request} images per request", "messages")
    text = render_prompt(services.engine, body, len(videos), len(images))  # before any fetch
    _check_fits(services.engine.defaults, [p for _, p in videos])
    try:
        async with asyncio.TaskGroup() as tg:
            video_tasks = [tg.create_task(_video(services, p, pos, run)) for pos, p in videos]
            image_tasks = [tg.create_task(_image(services, p, run)) for _, p in images]
    except BaseExceptionGroup as group:
        return _outcome(services, group)
    loaded_videos = [t.result() for t in video_tasks]
    loaded_images = [t.result() for t in image_tasks]
    video_items, image_items = iter(loaded_videos), iter(loaded_images)
    ordered = [next(video_items) if isinstance(p, VideoPart) else next(image_items)
               for _, p in parts if not isinstance(p, TextPart)]
    media = [info for _, info in ordered]
    if body.framewise is not None and body.framewise.return_frames == "thumbnails":
        await add_thumbnails(ordered, s.model)
    mm = {}
    if videos:
        mm["video"] = [x for x, _ in loaded_videos]
    if images:
        mm["image"] = [x for x, _ in loaded_images]
    prompt = {"prompt": text}
    if mm:
        prompt["multi_modal_data"] = mm
    return Prepared(prompt, media)


def _outcome(services, group: BaseExceptionGroup) -> LongVideo:
    """What the failed task group means: the first error of the client's or the media's (400s before a long
    video: the request could not run either way), else the long-video decision, else what went wrong."""
    flat: list[BaseException] = []
    stack = [group]
    while stack:
        g = stack.pop(0)
        for e in g.exceptions:
            (stack if isinstance(e, BaseExceptionGroup) else flat).append(e)
    for e in flat:
        if isinstance(e, MediaError):
            services.metrics.media_errors.labels(e.code).inc()
            raise APIError.from_media(e) from None
        if isinstance(e, APIError):
            services.metrics.media_errors.labels(e.code).inc()
            raise e from None
    for e in flat:
        if not isinstance(e, _Long):
            raise e
    decisions = [e.decision for e in flat]
    first = decisions[0]
    staged = {k: v for d in decisions for k, v in d.staged.items()}
    return LongVideo(first.url, first.reason, staged)
