"""Qwen-1 (Qwen-7B, Qwen-VL's LLM) checkpoint names -> transformers/vLLM Qwen2 names.

Qwen-1's decoder is Qwen2's up to naming and fusion: ``attn.c_attn`` is the fused q | k | v
projection (rows contiguous, with bias), ``attn.c_proj`` the output projection (no bias), and the
MLP is ``c_proj(w1(x) * silu(w2(x)))``, i.e. ``w2`` = gate, ``w1`` = up, ``c_proj`` = down.
RMSNorm, rotate-half RoPE over the full head and 1/sqrt(head_dim) scaling are the same.
"""

from __future__ import annotations

import re

import torch

VISUAL_PREFIX = "transformer.visual."

_PER_LAYER = {
    "ln_1.weight": "input_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.gate_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_GLOBAL = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER = re.compile(r"transformer\.h\.(\d+)\.(.+)")


def is_visual(name: str) -> bool:
    """Whether a checkpoint key belongs to Qwen-VL's vision side (ViT, adapter, RED-VILLM modules)."""
    return name.startswith(VISUAL_PREFIX)


def qwen1_to_qwen2(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Map one Qwen-1 LLM tensor to its Qwen2 name(s); ``c_attn`` splits into ``q/k/v_proj``.

    A stored rotary ``inv_freq`` buffer maps to nothing (it is recomputed). Raises ``KeyError``
    naming the key for anything else that is not a known Qwen-1 LLM weight (vision keys included:
    test them with :func:`is_visual` first)."""
    if name.endswith("rotary_emb.inv_freq") and not is_visual(name):
        return []
    if name in _GLOBAL:
        return [(_GLOBAL[name], tensor)]
    m = _LAYER.fullmatch(name)
    if m:
        i, rest = m.group(1), m.group(2)
        prefix = f"model.layers.{i}."
        if rest in _PER_LAYER:
            return [(prefix + _PER_LAYER[rest], tensor)]
        if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
            kind = rest.rsplit(".", 1)[1]
            if tensor.shape[0] % 3:
                raise ValueError(f"{name}: first dimension {tensor.shape[0]} is not 3 * hidden")
            q, k, v = tensor.chunk(3, dim=0)
            return [(f"{prefix}self_attn.{p}_proj.{kind}", t) for p, t in (("q", q), ("k", k), ("v", v))]
    raise KeyError(f"unknown Qwen-1 LLM weight {name!r}"
                   + (" (a vision weight: route it with is_visual)" if is_visual(name) else ""))


def qwen1_state_to_qwen2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LLM part of a Qwen-VL state dict in Qwen2 names (vision keys skipped)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not is_visual(name):
            out.update(qwen1_to_qwen2(name, tensor))
    return out
