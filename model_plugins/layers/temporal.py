"""TC-LLaVA's temporal mechanisms as plain functions (DESIGN 3.1).

Pure PyTorch, no vLLM import: the reference model, the vLLM model and the unit
tests all call these, so the math lives in exactly one place.

A *visual span* is the contiguous run of ``num_frames * tokens_per_frame``
placeholder tokens of one video (an image is a 1-frame video), frame-major.

Temporal-aware dual RoPE
    t_n = n                       text before the first span
    t_n = V_s + (n - V_s) // m    visual token of the span starting at V_s
    t_n = n - sum(L_s - F_s)      text after spans (continues at last frame + 1)
    p_n = n + gamma * t_n         rotary position (angle theta_k * p_n)

Frame-wise block-causal mask
    q may attend k  iff  k <= end(q)
    end(q) = last index of q's frame for visual tokens, q itself for text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VisualSpan:
    """One video (or image) in the token sequence."""

    start: int
    num_frames: int
    tokens_per_frame: int

    @property
    def length(self) -> int:
        return self.num_frames * self.tokens_per_frame

    @property
    def end(self) -> int:
        """Index one past the last visual token."""
        return self.start + self.length

    def frame_ranges(self) -> list[tuple[int, int]]:
        """Inclusive ``(first, last)`` token index of every frame."""
        m = self.tokens_per_frame
        return [(self.start + f * m, self.start + (f + 1) * m - 1) for f in range(self.num_frames)]


def _checked(spans: Iterable[VisualSpan], seq_len: int) -> list[VisualSpan]:
    ordered = sorted(spans, key=lambda s: s.start)
    prev_end = 0
    for s in ordered:
        if s.num_frames < 1 or s.tokens_per_frame < 1:
            raise ValueError(f"empty visual span {s}")
        if s.start < prev_end or s.end > seq_len:
            raise ValueError(f"visual span {s} overlaps another or exceeds length {seq_len}")
        prev_end = s.end
    return ordered


def temporal_ids(seq_len: int, spans: Iterable[VisualSpan]) -> torch.Tensor:
    """t_n for every token (int64, shape ``(seq_len,)``)."""
    n = torch.arange(seq_len, dtype=torch.int64)
    t = n.clone()
    removed = 0  # sum of (L_s - F_s) over spans already passed
    for s in _checked(spans, seq_len):
        vis = n[s.start : s.end]
        t[s.start : s.end] = (s.start - removed) + (vis - s.start) // s.tokens_per_frame
        removed += s.length - s.num_frames
        t[s.end :] = n[s.end :] - removed
    return t


def rotary_positions(seq_len: int, spans: Iterable[VisualSpan], gamma: float) -> torch.Tensor:
    """p_n = n + gamma * t_n as float64 (fractional when gamma is)."""
    n = torch.arange(seq_len, dtype=torch.float64)
    return n + gamma * temporal_ids(seq_len, spans).double()


def next_rotary_position(seq_len: int, spans: Iterable[VisualSpan], gamma: float) -> float:
    """Rotary position of the first generated token: (1 + gamma) * n - gamma * Delta."""
    delta = sum(s.length - s.num_frames for s in spans)
    return (1.0 + gamma) * seq_len - gamma * delta


def shifted_position_rows(seq_len: int, spans: Iterable[VisualSpan]) -> torch.Tensor:
    """Rows ``(n, t_n + Delta, n)`` for vLLM's multi-row (M-RoPE) position plumbing.

    The attention forms ``p' = row0 + gamma * row1 = p_n + gamma * Delta``: every
    position of the request moves by the same constant, which RoPE attention
    ignores. Text after the last span has ``t_n + Delta == n``, so the equal rows
    vLLM writes for generated tokens continue the sequence exactly.
    """
    spans = list(spans)
    delta = sum(s.length - s.num_frames for s in spans)
    n = torch.arange(seq_len, dtype=torch.int64)
    return torch.stack([n, temporal_ids(seq_len, spans) + delta, n])


def attention_ends(seq_len: int, spans: Iterable[VisualSpan]) -> torch.Tensor:
    """end(q): the last key index each query may attend (int64, ``(seq_len,)``)."""
    ends = torch.arange(seq_len, dtype=torch.int64)
    for s in _checked(spans, seq_len):
        for first, last in s.frame_ranges():
            ends[first : last + 1] = last
    return ends


def frame_block_causal_mask(seq_len: int, spans: Iterable[VisualSpan]) -> torch.Tensor:
    """Boolean ``(seq_len, seq_len)`` mask, True where query row may attend key column."""
    ends = attention_ends(seq_len, spans)
    keys = torch.arange(seq_len, dtype=torch.int64)
    return keys[None, :] <= ends[:, None]


def split_frame_blocks(
    ranges: Sequence[tuple[int, int]], tokens_per_frame: int
) -> list[tuple[int, int]]:
    """Split inclusive embed ranges (one per video) into per-frame blocks of m tokens.

    This is what turns vLLM's "bidirectional inside each multimodal item" ranges
    into TC-LLaVA's frame-wise blocks; single-token blocks are dropped because
    they are identical to causal attention.
    """
    m = tokens_per_frame
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        length = end - start + 1
        if length % m:
            raise ValueError(f"visual range ({start}, {end}) is not a whole number of {m}-token frames")
        out.extend((b, b + m - 1) for b in range(start, end + 1, m) if m > 1)
    return out


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """The LLM's own RoPE frequencies theta_k = base^(-2k/d), float64."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of ``theta_k * p`` in float32, angles formed in float64 for exactness."""
    angles = positions.double()[:, None] * inv_freq.double()[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (Llama/NeoX) RoPE over the last dim of ``x`` (..., tokens, heads, head_dim).

    ``cos``/``sin`` are ``(tokens, head_dim // 2)``; computed in float32, returned in x.dtype.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
