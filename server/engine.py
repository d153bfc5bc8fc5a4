"""vLLM ``AsyncLLM`` in-process (engine core in its own process), plus the model's defaults."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
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
    return ModelDefaults(
        num_frames=int(getattr(cfg, "num_frames", 8)),
        max_frames=int(getattr(cfg, "max_frames", 32)),
        shortest_edge=edge,
        max_model_len=max_model_len,
        fps=float(cfg.fps) if getattr(cfg, "fps", None) else None,
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

    @property
    def ready(self) -> bool:
        return self.llm is not None and not getattr(self.llm, "errored", False)

    @property
    def dead(self) -> bool:
        """The engine core died (vLLM's ``AsyncLLM.errored``: its process monitor saw the core exit, or the
        output handler failed): every request on it fails with ``EngineDeadError`` from now on."""
        return self.llm is not None and bool(getattr(self.llm, "errored", False))

    async def start(self) -> None:
        from framewise.model_plugins.selfcheck import check_plugin

        check_plugin()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from transformers import AutoConfig, AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self.settings
        args = engine_args(s, self.engine_overrides)
        self.llm = AsyncLLM.from_engine_args(args)
        self.tokenizer = AutoTokenizer.from_pretrained(s.model)
        cfg = AutoConfig.from_pretrained(s.model)
        self.defaults = model_defaults(cfg, self.tokenizer, s.model, int(args.max_model_len or s.max_model_len))

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def generate(self, prompt: dict, params, request_id: str) -> AsyncIterator:
        return self.llm.generate(prompt, params, request_id)

    async def abort(self, request_id: str) -> None:
        if self.llm is not None:
            await self.llm.abort(request_id)

    def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
