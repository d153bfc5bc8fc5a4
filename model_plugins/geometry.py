"""Token geometry of a video per architecture, from the checkpoint's config alone: what start-up validation
and the gateway's pre-fetch check compare against the engine's context (``max_model_len``)."""

from __future__ import annotations

from collections.abc import Callable


def video_tokens_fn(cfg) -> Callable[[int], int] | None:
    """``frames -> LLM tokens of one video``, or None where the count also depends on the frames' size
    (STAVE: Qwen2-VL's dynamic resolution; vLLM checks the prompt's length once the frames are known)."""
    kind = getattr(cfg, "model_type", None)
    if kind == "tc_llava":  # m tokens per frame (CLIP grid / pooling^2), every frame kept
        return lambda frames: cfg.tokens_per_frame * frames
    if kind == "videoccam":  # the CCAM projector's queries, whatever the frame count
        return lambda frames: cfg.num_query
    if kind == "red_villm":  # T temporal (or padded) + the spatial tokens
        return cfg.video_tokens
    return None


def checkpoint_context(cfg) -> int | None:
    """The LLM's own context length (``max_position_embeddings`` of its text config)."""
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None


class VideoDoesNotFit(ValueError):
    pass


def fit_frames(cfg, num_frames: int, max_frames: int, max_model_len: int, *, text_tokens: int = 64) -> int:
    """The largest ``max_frames`` whose video (plus ``text_tokens`` of prompt) fits ``max_model_len``: at most
    the checkpoint's own. Raises :class:`VideoDoesNotFit`, naming the numbers and the fixes, when not even a
    video of the default ``num_frames`` fits."""
    tokens = video_tokens_fn(cfg)
    if tokens is None:
        return max_frames
    room = max_model_len - text_tokens
    if tokens(num_frames) > room:
        need = tokens(num_frames) + text_tokens
        raise VideoDoesNotFit(
            f"a video of the default {num_frames} frames is {describe(cfg, num_frames)} tokens, and the engine's "
            f"context is {max_model_len} tokens ({text_tokens} kept for the text): every default video request "
            f"would be refused. Start with --max-model-len {need} or more (the checkpoint supports "
            f"{checkpoint_context(cfg) or 'an unknown length'}), or lower num_frames in the checkpoint's config.json"
            + (" or pool the frames (frame_pooling)" if getattr(cfg, "model_type", None) == "tc_llava" else ""))
    fits = max_frames
    while fits > num_frames and tokens(fits) > room:
        fits -= 1
    return fits


def describe(cfg, frames: int) -> str:
    """How a video's token count comes about: ``8 frames × 576 = 4608``, ``1024 (the projector's queries)``,
    ``8 frames -> 356``."""
    kind = getattr(cfg, "model_type", None)
    total = video_tokens_fn(cfg)(frames)
    if kind == "tc_llava":
        return f"{frames} frames × {cfg.tokens_per_frame} = {total}"
    if kind == "videoccam":
        return f"{total} (the projector's queries, whatever the frames)"
    return f"{frames} frames -> {total}"
