"""Offline engine construction for Framewise models (vLLM ``LLM``).

Create engines only under ``if __name__ == "__main__":`` (vLLM spawns workers).
"""

from __future__ import annotations

import os
from typing import Any

from framewise.model_plugins.selfcheck import check_plugin

# vLLM on CPU reserves this many GiB of KV cache per engine unless told otherwise.
DEFAULT_CPU_KV_CACHE_GIB = "2"


def create_llm(model: str, **engine_kwargs: Any):
    """Self-check the plugin, then start a vLLM ``LLM`` for ``model``.

    Defaults suit the models served here: float32 on CPU (bf16 elsewhere is
    vLLM's auto choice), and a modest CPU KV cache.
    """
    check_plugin()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KV_CACHE_GIB)
    from vllm import LLM
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        engine_kwargs.setdefault("dtype", "float32")
    engine_kwargs.setdefault("limit_mm_per_prompt", {"image": 4, "video": 4})
    return LLM(model=model, **engine_kwargs)
