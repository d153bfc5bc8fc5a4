"""``framewise.return_frames = "thumbnails"``: the frames the model was given, as small JPEG data URLs.

A thumbnail shows a frame as the model's image processor sees it: the gateway's shortest-edge resize
(done while decoding), then the processor's own geometry when the checkpoint has a CLIP/SigLIP-style
``preprocessor_config.json`` (resize by the shortest edge and center crop, or resize to an exact
square). Other processors (Qwen2-VL's smart resize) get the frames as handed to the engine.

Bounds (documented in the README): the longest side is at most :data:`MAX_SIDE` px; each JPEG is at
most :data:`MAX_BYTES` bytes (quality, then size, stepped down until it fits); a response carries at
most :data:`MAX_THUMBNAILS` thumbnails over all its media items, in message order (a video past the
budget gets fewer, and reports ``thumbnails_omitted``). So a response grows by at most
64 x 16 KiB = 1 MiB of JPEG (about 1.4 MB as base64).

Encoding is CPU work: :func:`add_thumbnails` runs it in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from functools import lru_cache

import numpy as np
from PIL import Image

log = logging.getLogger("framewise.chat")

MAX_SIDE = 160
MAX_BYTES = 16 * 1024
MAX_THUMBNAILS = 64
QUALITIES = (85, 70, 50, 30)


@lru_cache(maxsize=8)
def model_view(model_dir: str):
    """The checkpoint's CLIP/SigLIP image-processor geometry, or ``None`` (frames shown as handed over)."""
    try:
        from transformers import AutoConfig

        from framewise.model_plugins.preprocess import load_image_processor_config

        cfg = AutoConfig.from_pretrained(model_dir)
        size = getattr(getattr(cfg, "vision_config", None), "image_size", None)
        return load_image_processor_config(model_dir, int(size)) if size else None
    except Exception as e:  # noqa: BLE001 - an unknown layout: show the frames as handed over
        log.info("thumbnails: no image-processor geometry for %s (%s)", model_dir, e)
        return None


def processor_view(img: Image.Image, view) -> Image.Image:
    """``img`` through the processor's resize and crop (PIL, bicubic, like the CLIP image processors)."""
    if view is None:
        return img
    if view.do_resize and view.exact_size:
        s = view.exact_size
        return img if img.size == (s, s) else img.resize((s, s), Image.BICUBIC)
    if view.do_resize:
        w, h = img.size
        scale = view.shortest_edge / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if size != img.size:
            img = img.resize(size, Image.BICUBIC)
    if view.do_center_crop:
        c = view.crop_size
        w, h = img.size
        if w < c or h < c:  # pad like the processor does
            canvas = Image.new("RGB", (max(w, c), max(h, c)))
            canvas.paste(img, ((canvas.width - w) // 2, (canvas.height - h) // 2))
            img, (w, h) = canvas, canvas.size
        left, top = (w - c) // 2, (h - c) // 2
        img = img.crop((left, top, left + c, top + c))
    return img


def jpeg_data_url(frame: np.ndarray, view=None) -> str:
    """One ``(H, W, 3) uint8`` frame as a ``data:image/jpeg;base64,`` URL within the bounds above."""
    img = processor_view(Image.fromarray(np.ascontiguousarray(frame)).convert("RGB"), view)
    if max(img.size) > MAX_SIDE:
        img.thumbnail((MAX_SIDE, MAX_SIDE), Image.BICUBIC)
    while True:
        for quality in QUALITIES:
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=quality)
            if buf.tell() <= MAX_BYTES:
                return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        img = img.resize((max(1, img.width // 2), max(1, img.height // 2)), Image.BICUBIC)


def encode_all(items: list[tuple[np.ndarray, dict]], model_dir: str | None) -> None:
    """Set ``thumbnails`` on each media info dict: its frames (``(T, H, W, 3)``, or an image ``(H, W, 3)``)."""
    view = model_view(model_dir) if model_dir else None
    budget = MAX_THUMBNAILS
    for frames, info in items:
        frames = frames[None] if frames.ndim == 3 else frames
        take = min(len(frames), budget)
        info["thumbnails"] = [jpeg_data_url(f, view) for f in frames[:take]]
        if take < len(frames):
            info["thumbnails_omitted"] = len(frames) - take
        budget -= take


async def add_thumbnails(items: list[tuple[np.ndarray, dict]], model_dir: str | None) -> None:
    """:func:`encode_all` in a thread (JPEG encoding is CPU work)."""
    await asyncio.to_thread(encode_all, items, model_dir)
