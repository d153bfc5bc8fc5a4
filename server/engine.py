"""vLLM ``AsyncLLM`` in-process (engine core in its own process), plus the model's defaults."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from framewise.server.settings import Settings

# RED-VILLM (Qwen-VL's tags): what its chat template writes for an image / a video part
RED_VILLM_PLACEHOLDERS = {"image": "<img></img>", "video": "<img><imgpad></img>"}


@dataclass
class ModelDefaults:
    """What the gateway needs to know about the served model's video input."""

    num_frames: int
    max_frames: int
    shortest_edge: int | None
    max_model_len: int
    fps: float | None = None  # sample at this rate when a request names neither num_frames nor fps
    placeholders: dict[str, str] | None = None  # the token each image/video part leaves in the prompt
    video_tokens: Callable[[int], int] | None = None  # frames -> LLM tokens of one video (None: size-dependent)
    describe_video: Callable[[int], str] | None = None  # frames -> "8 × 576 = 4608"
    fps_rule: str = "midpoints"  # how fps sampling picks frames (server/video/sampling.py FPS_RULES)
    seek: str | None = None  # the checkpoint's default video_url.seek (config.json ``video_seek``), if any


def check_geometry(settings: Settings, overrides: dict | None = None):
    """Start-up validation, before the engine starts: a video of the checkpoint's default ``num_frames`` must
    fit the context (else :class:`~framewise.model_plugins.geometry.VideoDoesNotFit`, naming the numbers and the
    fix); ``max_frames`` is lowered to what fits. Returns ``(config, context, max_frames)``."""
    from transformers import AutoConfig

    from framewise.model_plugins.geometry import checkpoint_context, fit_frames

    cfg = AutoConfig.from_pretrained(settings.model)
    given = (overrides or {}).get("max_model_len") or settings.max_model_len
    context = int(given or checkpoint_context(cfg) or 4096)
    num_frames, max_frames = int(getattr(cfg, "num_frames", 8)), int(getattr(cfg, "max_frames", 32))
    fits = fit_frames(cfg, num_frames, max_frames, context)
    if fits < max_frames:
        import logging

        from framewise.model_plugins.geometry import describe

        logging.getLogger("framewise.engine").warning(
            "max_frames lowered from %d to %d: a video of %d frames is %s tokens, over the context of %d tokens "
            "(--max-model-len)", max_frames, fits, max_frames, describe(cfg, max_frames), context)
    return cfg, context, fits


def engine_args(settings: Settings, overrides: dict | None = None):
    """vLLM ``AsyncEngineArgs``: Framewise's defaults, then every engine option the user gave
    (``overrides``: vLLM CLI dests such as ``tensor_parallel_size``) on top."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

    s = settings
    defaults = {
        "model": s.model,
        "served_model_name": [s.model_name],
        "max_model_len": s.max_model_len,
        "enable_prefix_caching": s.enable_prefix_caching,
        "limit_mm_per_prompt": {"video": s.max_videos_per_request, "image": s.max_images_per_request},
        "dtype": "float32" if current_platform.is_cpu() else "auto",
    }
    return AsyncEngineArgs(**{**defaults, **(overrides or {})})


def _seek_mode(value) -> str | None:
    from framewise.server.video.sampling import SEEK_MODES

    if value is not None and value not in SEEK_MODES:
        raise ValueError(f"config.json video_seek={value!r}: one of {', '.join(SEEK_MODES)}")
    return value


def model_defaults(cfg, tokenizer, model_dir: str, max_model_len: int) -> ModelDefaults:
    """The gateway's view of the served model, from its config and tokenizer."""
    from framewise.model_plugins.preprocess import load_image_processor_config

    size = getattr(getattr(cfg, "vision_config", None), "image_size", None)
    edge = load_image_processor_config(model_dir, size).shortest_edge if size else None
    placeholders = {kind: tokenizer.convert_ids_to_tokens(int(getattr(cfg, f"{kind}_token_id")))
                    for kind in ("image", "video") if getattr(cfg, f"{kind}_token_id", None) is not None}
    if getattr(cfg, "model_type", None) == "red_villm":
        # Qwen-VL resizes every frame to image_size x image_size (no crop): frames are decoded no
        # smaller than that on their short side; media parts are tag pairs, not one token
        edge = int(cfg.visual["image_size"])
        placeholders = dict(RED_VILLM_PLACEHOLDERS)
    from framewise.model_plugins.geometry import describe, video_tokens_fn

    tokens = video_tokens_fn(cfg)
    return ModelDefaults(
        video_tokens=tokens,
        describe_video=(lambda frames: describe(cfg, frames)) if tokens else None,
        num_frames=int(getattr(cfg, "num_frames", 8)),
        max_frames=int(getattr(cfg, "max_frames", 32)),
        shortest_edge=edge,
        max_model_len=max_model_len,
        fps=float(cfg.fps) if getattr(cfg, "fps", None) else None,
        fps_rule=str(getattr(cfg, "frame_sampling", None) or "midpoints"),
        seek=_seek_mode(getattr(cfg, "video_seek", None)),
        placeholders=placeholders,
    )


class EngineAPI(Protocol):
    """What the gateway and the job worker need of an engine (:class:`Engine`; tests use stand-ins).

    ``ready``: it can take requests. ``dead`` (optional: a stand-in without it is dead when it stops
    being ready after start): the engine core died, for good -- the process must exit (server/lifecycle.py)."""

    tokenizer: Any
    defaults: ModelDefaults | None

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    def render(self, messages: list[dict]) -> str: ...

    def generate(self, prompt: dict, params, request_id: str) -> AsyncIterator: ...

    async def abort(self, request_id: str) -> None: ...

    def shutdown(self) -> None: ...


class Engine:
    def __init__(self, settings: Settings, engine_overrides: dict | None = None):
        self.settings = settings
        self.engine_overrides = dict(engine_overrides or {})
        self.llm = None
        self.tokenizer = None
        self.defaults: ModelDefaults | None = None
        self.string_content = False  # the template takes string content only (see _needs_string_content)

    @property
    def ready(self) -> bool:
        return self.llm is not None and not getattr(self.llm, "errored", False)

    @property
    def dead(self) -> bool:
        """The engine core died (vLLM's ``AsyncLLM.errored``: its process monitor saw the core exit, or the
        output handler failed): every request on it fails with ``EngineDeadError`` from now on."""
        return self.llm is not None and bool(getattr(self.llm, "errored", False))

    async def start(self) -> None:
        from framewise.model_plugins import ALLOW_UNTESTED_VLLM
        from framewise.model_plugins.selfcheck import check_plugin

        if self.settings.allow_untested_vllm:  # for every process vLLM starts (each registers the plugin)
            os.environ[ALLOW_UNTESTED_VLLM] = "1"
        check_plugin()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self.settings
        cfg, _, max_frames = check_geometry(s, self.engine_overrides)  # before the engine: fail fast
        args = engine_args(s, self.engine_overrides)
        self.llm = AsyncLLM.from_engine_args(args)
        self.tokenizer = AutoTokenizer.from_pretrained(s.model)
        self.defaults = model_defaults(cfg, self.tokenizer, s.model, int(self.llm.model_config.max_model_len))
        self.defaults.max_frames = min(self.defaults.max_frames, max_frames)
        self.string_content = self._needs_string_content()

    def _needs_string_content(self) -> bool:
        """A template that takes only string content (Video-CCAM v1.2's Qwen2.5 one) gets each message joined
        into a string with the media placeholders in it; checked once, on a probe conversation."""
        from framewise.model_plugins.chat_template import as_string_content, takes_typed_parts

        placeholders = self.defaults.placeholders or {}
        typed = takes_typed_parts(self._render, placeholders)
        if typed:
            return False
        if takes_typed_parts(lambda m: self._render(as_string_content(m, placeholders)), placeholders):
            return True
        import logging  # requests with media are refused (400 unsupported_media_in_template), text still served

        logging.getLogger("framewise.engine").warning(
            "the chat template of %s places no %s placeholder for a video part, with typed or string content",
            self.settings.model, placeholders)
        return False

    def _render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def render(self, messages: list[dict]) -> str:
        if self.string_content:
            from framewise.model_plugins.chat_template import as_string_content

            messages = as_string_content(messages, self.defaults.placeholders or {})
        return self._render(messages)

    def generate(self, prompt: dict, params, request_id: str) -> AsyncIterator:
        return self.llm.generate(prompt, params, request_id)

    async def abort(self, request_id: str) -> None:
        if self.llm is not None:
            await self.llm.abort(request_id)

    def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
