"""vLLM ``AsyncLLM`` in-process (engine core in its own process), plus the model's defaults."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.settings import Settings


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

    async def start(self) -> None:
        from model_plugins.selfcheck import check_plugin

        check_plugin()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from transformers import AutoConfig, AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        from model_plugins.preprocess import load_image_processor_config

        s = self.settings
        args = engine_args(s, self.engine_overrides)
        self.llm = AsyncLLM.from_engine_args(args)
        self.tokenizer = AutoTokenizer.from_pretrained(s.model)
        cfg = AutoConfig.from_pretrained(s.model)
        size = getattr(getattr(cfg, "vision_config", None), "image_size", None)
        edge = load_image_processor_config(s.model, size).shortest_edge if size else None
        self.defaults = ModelDefaults(
            num_frames=int(getattr(cfg, "num_frames", 8)),
            max_frames=int(getattr(cfg, "max_frames", 32)),
            shortest_edge=edge,
            max_model_len=int(args.max_model_len or s.max_model_len),
            fps=float(cfg.fps) if getattr(cfg, "fps", None) else None,
            placeholders={kind: self.tokenizer.convert_ids_to_tokens(int(getattr(cfg, f"{kind}_token_id")))
                          for kind in ("image", "video") if getattr(cfg, f"{kind}_token_id", None) is not None},
        )

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
