"""Video-CCAM's projector: learnable queries cross-attending to all frames under the
causal cross-attention mask (DESIGN 3.2). Pure PyTorch; shared by the vLLM model and
the reference.

Mask: query i (0..N-1) sees every token of frame t (0..T-1) iff
    start rule:  t * N <= i * T          (frame t <= floor(i T / N))
    end rule:    t * N <  (i + 1) * T
With T | N both give N/T groups, group g seeing frames 0..g; T = 1 is full attention.

Graph (reconstructed; the optional parts are config flags checked against checkpoint keys):
    q = query                                   (N, D)
    [q = q + SelfAttn(LN_sa(q))]                query_self_attention
    q = q + CrossAttn(LN_q(q), LN_v(x), mask)   x: (T * P, C) frame features
    q = q + SwiGLU(LN_ffn(q))
    [q = LN_out(q)]                             output_norm
    out = output_proj(q)                        (N, LLM hidden)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MASK_RULES = ("start", "end")


def visible_frames(num_query: int, num_frames: int, rule: str = "start") -> torch.Tensor:
    """Number of leading frames each query may see, ``(num_query,)`` int64."""
    if rule not in MASK_RULES:
        raise ValueError(f"ccam_mask_rule must be one of {MASK_RULES}, got {rule!r}")
    i = torch.arange(num_query, dtype=torch.int64)
    if rule == "start":  # t <= floor(i T / N)  # noqa: SIM108 - one comment per rule
        counts = i * num_frames // num_query + 1
    else:  # t N < (i + 1) T  <=>  t < ceil((i + 1) T / N)
        counts = -((-(i + 1) * num_frames) // num_query)
    return counts.clamp(1, num_frames)


def ccam_mask(num_query: int, num_frames: int, tokens_per_frame: int, rule: str = "start") -> torch.Tensor:
    """Boolean ``(num_query, num_frames * tokens_per_frame)``: True where the query may attend."""
    frame_of_key = torch.arange(num_frames * tokens_per_frame) // tokens_per_frame
    return frame_of_key[None, :] < visible_frames(num_query, num_frames, rule)[:, None]


class Attention(nn.Module):
    def __init__(self, dim: int, kv_dim: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, s, h = q.shape[0], kv.shape[0], self.heads
        qh = self.q_proj(q).view(n, h, -1).transpose(0, 1)
        kh = self.k_proj(kv).view(s, h, -1).transpose(0, 1)
        vh = self.v_proj(kv).view(s, h, -1).transpose(0, 1)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        return self.o_proj(out.transpose(0, 1).reshape(n, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CCAMProjector(nn.Module):
    def __init__(self, pc, *, mask_rule: str = "start"):
        """``pc``: the checkpoint's ``projector_config`` (an object with attributes or a dict)."""
        super().__init__()
        g = pc.get if isinstance(pc, dict) else lambda k, d=None: getattr(pc, k, d)
        if g("hidden_act", "swiglu") != "swiglu":
            raise NotImplementedError(f"CCAM projector activation {g('hidden_act')!r} (only swiglu)")
        d, c, eps = g("hidden_size"), g("cross_hidden_size"), g("layer_norm_eps", 1e-5)
        heads, bias = g("num_heads"), bool(g("attention_bias", True))
        if g("num_key_value_heads", heads) != heads:
            raise NotImplementedError("CCAM projector with grouped key/value heads")
        self.num_query, self.mask_rule = g("num_query"), mask_rule
        self.query = nn.Parameter(torch.zeros(self.num_query, d))
        if g("query_self_attention", False):
            self.self_attn_norm = nn.LayerNorm(d, eps=eps)
            self.self_attn = Attention(d, d, heads, bias)
        else:
            self.self_attn = None
        self.query_norm = nn.LayerNorm(d, eps=eps)
        self.visual_norm = nn.LayerNorm(c, eps=eps)
        self.cross_attn = Attention(d, c, heads, bias)
        self.ffn_norm = nn.LayerNorm(d, eps=eps)
        self.mlp = SwiGLU(d, g("intermediate_size"), bool(g("mlp_bias", True)))
        self.output_norm = nn.LayerNorm(d, eps=eps) if g("output_norm", False) else None
        self.output_proj = nn.Linear(d, g("output_size"), bias=True)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``(T, P, C)`` features of one item's frames -> ``(num_query, output_size)``."""
        t, p, _ = frames.shape
        q = self.query.to(frames.dtype)
        if self.self_attn is not None:
            x = self.self_attn_norm(q)
            q = q + self.self_attn(x, x)
        mask = ccam_mask(self.num_query, t, p, self.mask_rule).to(frames.device)
        q = q + self.cross_attn(self.query_norm(q), self.visual_norm(frames.reshape(t * p, -1)), mask)
        q = q + self.mlp(self.ffn_norm(q))
        if self.output_norm is not None:
            q = self.output_norm(q)
        return self.output_proj(q)
