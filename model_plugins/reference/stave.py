"""STAVE (STAVEQ2) in plain PyTorch: the test oracle and the maker of demo checkpoints.

Qwen2-VL with one temporal self-attention sub-layer in every vision block (DESIGN 3.3,
spec-stave-red-villm A.2): ``x += Attn(LN1 x); x += TempAttn(LN3 x); x += MLP(LN2 x)``.
For each spatial patch position of one video item, its T' temporal-patch tokens attend to
each other (1-D RoPE over 0..T'-1, fp32 softmax); images are items with T' = 1.

Written for clarity, not speed: fp32, full-sequence recompute, one prompt at a time.
Module names follow transformers 5's ``Qwen2VLForConditionalGeneration`` in memory
(``model.visual.*``, ``model.language_model.*``, ``lm_head.*``); on disk a checkpoint uses the
names transformers writes (``visual.*``, ``model.*``, ``lm_head.*``, as the authors' code saves
too) plus ``visual.blocks.{i}.{norm3,temp_attn.qkv,temp_attn.proj}.*``. Either layout loads.

API used by the engine parity tests::

    ref = StaveReference.from_pretrained(model_dir, temporal_output_layout="paper")
    pixels, grid = ref.preprocess(frames, video=True)          # Qwen2-VL processor layout
    emb = ref.vision_embeddings(pixels, [grid])                # (T'*h*w/4, hidden)
    prompt = ref.prepare(prompt_ids, videos=[frames], images=[image])
    lp = ref.prompt_logprobs(prompt)                           # (L, vocab)
    tokens, steps = ref.greedy(prompt, 16)
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from framewise.model_plugins.configs import StaveQwen2VLConfig
from framewise.model_plugins.preprocess import (
    Qwen2VLPixelConfig,
    as_frames,
    load_qwen2vl_pixel_config,
    qwen2vl_preprocess,
)

# ---- checkpoint key layouts -----------------------------------------------------------------

_LEGACY_TO_NEW_PREFIX = (  # order matters: "model." would also match "model.visual."
    ("model.visual.", "model.visual."),
    ("model.language_model.", "model.language_model."),
    ("visual.", "model.visual."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)


def to_new_qwen2vl_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the original Qwen2-VL layout (``visual.``, ``model.``) to transformers 5's."""
    out = {}
    for k, v in state.items():
        for old, new in _LEGACY_TO_NEW_PREFIX:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def to_original_qwen2vl_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse: the names transformers (4.x and 5.x alike) writes to disk for Qwen2-VL."""
    out = {}
    for k, v in state.items():
        if k.startswith("model.visual."):
            k = k[len("model."):]
        elif k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        out[k] = v
    return out


def temporal_weight_shapes(config: StaveQwen2VLConfig, prefix: str = "visual.") -> dict[str, tuple[int, ...]]:
    """Every temporal weight of a checkpoint whose vision tower is under ``prefix``, with its shape."""
    d = config.vision_config.embed_dim
    inner = config.temporal_num_heads * config.temporal_head_dim
    shapes = {}
    for i in range(config.vision_config.depth):
        p = f"{prefix}blocks.{i}."
        shapes |= {p + "norm3.weight": (d,), p + "norm3.bias": (d,),
                   p + "temp_attn.qkv.weight": (3 * inner, d), p + "temp_attn.qkv.bias": (3 * inner,),
                   p + "temp_attn.proj.weight": (d, inner), p + "temp_attn.proj.bias": (d,)}
    return shapes


def load_checkpoint_tensors(model_dir: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint directory (via its index when it has one)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        paths = [os.path.join(model_dir, f) for f in files]
    else:
        paths = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not paths:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for p in paths:
        state.update(load_file(p))
    return state


# ---- Qwen2-VL preprocessing (Qwen2VLImageProcessor semantics) -----------------------------

# ---- rotary embeddings ----------------------------------------------------------------------

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in fp32; ``x`` (..., n, heads, d), ``cos``/``sin`` (n, d)."""
    xf = x.float()
    return (xf * cos[..., None, :] + rotate_half(xf) * sin[..., None, :]).to(x.dtype)


def rope_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def vision_hw_positions(grid_thw: Sequence[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """``(S, 2)`` (h, w) index of every vision row, rows in merge-window order, per temporal patch."""
    out = []
    for t, h, w in grid_thw:
        hh = torch.arange(h)[:, None].expand(h, w).reshape(h // merge, merge, w // merge, merge)
        ww = torch.arange(w)[None, :].expand(h, w).reshape(h // merge, merge, w // merge, merge)
        hw = torch.stack([hh.permute(0, 2, 1, 3).flatten(), ww.permute(0, 2, 1, 3).flatten()], dim=-1)
        out.append(hw.repeat(t, 1))
    return torch.cat(out)


# ---- vision tower ---------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (tp, p, p): a linear map of each flattened patch row."""

    def __init__(self, vc):
        super().__init__()
        self.proj = nn.Conv3d(vc.in_channels, vc.embed_dim, (vc.temporal_patch_size, vc.patch_size, vc.patch_size),
                              stride=(vc.temporal_patch_size, vc.patch_size, vc.patch_size), bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return pixels.to(w.dtype) @ w.reshape(w.shape[0], -1).T


class VisionAttention(nn.Module):
    """Qwen2-VL's spatial attention: 2-D RoPE, full attention within each temporal patch."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, chunks: list[int]) -> torch.Tensor:
        s = x.shape[0]
        q, k, v = self.qkv(x).view(s, 3, self.heads, self.head_dim).unbind(1)
        q, k = apply_rope_fp32(q, cos, sin), apply_rope_fp32(k, cos, sin)
        outs = []
        for qc, kc, vc in zip(q.split(chunks), k.split(chunks), v.split(chunks), strict=True):
            att = torch.einsum("qhd,khd->hqk", qc, kc) / math.sqrt(self.head_dim)
            att = att.float().softmax(-1).to(vc.dtype)
            outs.append(torch.einsum("hqk,khd->qhd", att, vc))
        return self.proj(torch.cat(outs).reshape(s, -1))


class TemporalAttention(nn.Module):
    """STAVE's sub-layer: for each spatial patch of one item, attention over its T' temporal patches.

    ``layout="paper"`` writes patch n's output at step t back to its own row t*N + n.
    ``layout="released"`` reproduces the authors' code: the (N, T') output is flattened
    patch-major and added to the frame-major rows as is, so row r gets the output of patch
    r // T' at step r % T' (a permutation of the rows whenever T' > 1 and N > 1).
    """

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)

    def per_patch(self, x: torch.Tensor, t: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x (T'*N, D)`` frame-major rows of one item -> ``O (N, T', heads*head_dim)``, before ``proj``."""
        n = x.shape[0] // t
        qkv = self.qkv(x).view(t, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 1, 0, 3, 4).unbind(0)  # each (N, T', heads, hd)
        q, k = apply_rope_fp32(q, cos, sin), apply_rope_fp32(k, cos, sin)
        att = torch.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(self.head_dim)
        att = att.float().softmax(-1).to(v.dtype)
        return torch.einsum("nhqk,nkhd->nqhd", att, v).reshape(n, t, -1)

    def forward(self, x: torch.Tensor, t: int, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
        o = self.per_patch(x, t, cos, sin)
        o = o.reshape(-1, o.shape[-1]) if layout == "released" else o.transpose(0, 1).reshape(-1, o.shape[-1])
        return self.proj(o)


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        if act not in ("quick_gelu", "gelu"):
            raise ValueError(f"vision hidden_act {act!r} is not supported (quick_gelu, gelu)")
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)
        return self.fc2(h)


class VisionBlock(nn.Module):
    def __init__(self, config: StaveQwen2VLConfig):
        super().__init__()
        vc = config.vision_config
        d = vc.embed_dim
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d, eps=1e-6) for _ in range(3))
        self.attn = VisionAttention(d, vc.num_heads)
        self.temp_attn = TemporalAttention(d, config.temporal_num_heads, config.temporal_head_dim)
        self.mlp = VisionMLP(d, int(d * vc.mlp_ratio), vc.hidden_act)

    def forward(self, x, cos, sin, chunks, items, t_rope, layout):
        """``chunks``: rows of each temporal patch (spatial attention); ``items``: (rows, T') per item."""
        x = x + self.attn(self.norm1(x), cos, sin, chunks)
        h = self.norm3(x)
        x = x + torch.cat([self.temp_attn(hi, t, *t_rope[t], layout)
                           for hi, (_, t) in zip(h.split([r for r, _ in items]), items, strict=True)])
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm per patch, 2x2 window concatenated (4 consecutive rows), GELU MLP."""

    def __init__(self, dim: int, out: int, merge: int):
        super().__init__()
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        hid = dim * merge * merge
        self.mlp = nn.Sequential(nn.Linear(hid, hid), nn.GELU(), nn.Linear(hid, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.mlp[0].in_features))


class VisionTower(nn.Module):
    def __init__(self, config: StaveQwen2VLConfig):
        super().__init__()
        vc = config.vision_config
        self.config = config
        self.patch_embed = PatchEmbed(vc)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(vc.depth))
        self.merger = PatchMerger(vc.embed_dim, vc.hidden_size, vc.spatial_merge_size)
        head_dim = vc.embed_dim // vc.num_heads
        theta = float((getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        self.register_buffer("hw_inv_freq", rope_inv_freq(head_dim // 2, theta), persistent=False)
        self.register_buffer("t_inv_freq", rope_inv_freq(config.temporal_head_dim, config.temporal_rope_theta),
                             persistent=False)

    def forward(self, pixels: torch.Tensor, grid_thw: Sequence[tuple[int, int, int]],
                layout: str | None = None, return_rows: bool = False) -> torch.Tensor:
        """Merged embeddings ``(sum T'*h*w/4, hidden)`` of the items in ``grid_thw``, in order.

        ``return_rows``: the last block's output ``(sum T'*h*w, embed_dim)`` instead (before the merger).
        """
        layout = layout or self.config.temporal_output_layout
        grid_thw = [tuple(int(v) for v in g) for g in grid_thw]
        # 2-D RoPE: freqs over h for the first half of each half-dim, w for the second
        hw = vision_hw_positions(grid_thw, self.config.vision_config.spatial_merge_size).to(pixels.device)
        f = (hw[..., None].float() * self.hw_inv_freq).flatten(1)  # (S, head_dim/2)
        f = torch.cat([f, f], dim=-1)
        cos, sin = f.cos(), f.sin()
        # 1-D temporal RoPE over the temporal-patch index 0..T'-1 of each item
        t_rope = {}
        for t, _, _ in grid_thw:
            ft = torch.arange(t, device=pixels.device).float()[:, None] * self.t_inv_freq
            ft = torch.cat([ft, ft], dim=-1)
            t_rope[t] = (ft.cos(), ft.sin())
        chunks = [h * w for t, h, w in grid_thw for _ in range(t)]
        items = [(t * h * w, t) for t, h, w in grid_thw]
        x = self.patch_embed(pixels)
        for blk in self.blocks:
            x = blk(x, cos, sin, chunks, items, t_rope, layout)
        return x if return_rows else self.merger(x)


# ---- Qwen2 LLM with M-RoPE ------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, tc):
        super().__init__()
        self.n_heads, self.n_kv = tc.num_attention_heads, tc.num_key_value_heads
        self.head_dim = tc.hidden_size // tc.num_attention_heads
        d = tc.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin):
        n = x.shape[0]
        q = apply_rope_fp32(self.q_proj(x).view(n, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope_fp32(self.k_proj(x).view(n, self.n_kv, self.head_dim), cos, sin)
        v = self.v_proj(x).view(n, self.n_kv, self.head_dim)
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(self.head_dim)
        att = att.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        att = att.float().softmax(-1).to(v.dtype)
        return self.o_proj(torch.einsum("hqk,khd->qhd", att, v).reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, tc):
        super().__init__()
        self.gate_proj = nn.Linear(tc.hidden_size, tc.intermediate_size, bias=False)
        self.up_proj = nn.Linear(tc.hidden_size, tc.intermediate_size, bias=False)
        self.down_proj = nn.Linear(tc.intermediate_size, tc.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, tc):
        super().__init__()
        self.input_layernorm = RMSNorm(tc.hidden_size, tc.rms_norm_eps)
        self.self_attn = Attention(tc)
        self.post_attention_layernorm = RMSNorm(tc.hidden_size, tc.rms_norm_eps)
        self.mlp = MLP(tc)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    def __init__(self, tc):
        super().__init__()
        self.embed_tokens = nn.Embedding(tc.vocab_size, tc.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(tc) for _ in range(tc.num_hidden_layers))
        self.norm = RMSNorm(tc.hidden_size, tc.rms_norm_eps)


class Qwen2VLModel(nn.Module):
    def __init__(self, config: StaveQwen2VLConfig):
        super().__init__()
        self.visual = VisionTower(config)
        self.language_model = LanguageModel(config.text_config)


def mrope_positions(input_ids: Sequence[int], items: Sequence[tuple[int, int, int, int]]) -> torch.Tensor:
    """``(3, L)`` M-RoPE (t, h, w) positions, Qwen2-VL's ``get_rope_index`` (vLLM, transformers 4.46).

    ``items``: ``(offset, T', h', w')`` of each visual placeholder run (merged grid). Text advances
    all three by 1; a visual run gets ``start + (t, h, w)`` indices; text after it resumes at the
    largest position so far + 1.
    """
    pos, st, nxt = [], 0, 0
    for off, t, h, w in sorted(items):
        n_text = off - st
        pos.append(torch.arange(n_text).expand(3, -1) + nxt)
        start = nxt + n_text
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
        pos.append(grid.reshape(3, -1) + start)
        nxt = int(pos[-1].max()) + 1
        st = off + t * h * w
    pos.append(torch.arange(len(input_ids) - st).expand(3, -1) + nxt)
    return torch.cat(pos, dim=1)


@dataclass
class PreparedPrompt:
    """A prompt with its visual placeholders expanded, as the LLM sees it."""

    input_ids: list[int]
    embeds: torch.Tensor  # (L, hidden)
    positions: torch.Tensor  # (3, L)
    vision_spans: list[tuple[int, int]]  # (offset, length) of every visual placeholder run


class StaveReference(nn.Module):
    def __init__(self, config: StaveQwen2VLConfig, processor: Qwen2VLPixelConfig | None = None):
        super().__init__()
        self.config = config
        self.processor = processor or Qwen2VLPixelConfig()
        self.model = Qwen2VLModel(config)
        tc = config.text_config
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        rope = tc.rope_parameters or {}
        self.mrope_section = list(rope.get("mrope_section", [16, 24, 24]))
        self.register_buffer("inv_freq", rope_inv_freq(tc.hidden_size // tc.num_attention_heads,
                                                       float(rope.get("rope_theta", 1e6))), persistent=False)

    @classmethod
    def from_pretrained(cls, model_dir: str, **config_overrides) -> StaveReference:
        """Load a STAVE checkpoint (either key layout). A missing or misshaped temporal weight
        raises ``ValueError`` naming the key."""
        config = StaveQwen2VLConfig.from_pretrained(model_dir, **config_overrides)
        model = cls(config, load_qwen2vl_pixel_config(model_dir))
        state = load_checkpoint_tensors(model_dir)
        prefix = "model.visual." if any(k.startswith("model.visual.") for k in state) else "visual."
        for key, shape in temporal_weight_shapes(config, prefix).items():  # named as in the checkpoint
            if key not in state:
                raise ValueError(f"STAVE checkpoint {model_dir} lacks temporal weight {key}")
            if tuple(state[key].shape) != shape:
                raise ValueError(f"STAVE temporal weight {key} has shape {tuple(state[key].shape)}, "
                                 f"expected {shape}")
        state = to_new_qwen2vl_keys(state)
        if config.tie_word_embeddings and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model.eval()

    # ---- vision ------------------------------------------------------------------------------
    def preprocess(self, media: object, *, video: bool = True) -> tuple[torch.Tensor, tuple[int, int, int]]:
        frames = as_frames(media, what="video" if video else "image")
        if not video and frames.shape[0] != 1:
            raise ValueError(f"an image has one frame, got {frames.shape[0]}")
        pixels, grid = qwen2vl_preprocess(frames, self.processor)
        return pixels, tuple(grid)

    @torch.no_grad()
    def vision_embeddings(self, pixels: torch.Tensor, grid_thw: Sequence[tuple[int, int, int]],
                          layout: str | None = None) -> torch.Tensor:
        """Merged vision embeddings of several items; temporal attention runs within each item."""
        return self.model.visual(pixels.float(), grid_thw, layout)

    # ---- prompt ------------------------------------------------------------------------------
    def prepare(self, prompt_ids: Sequence[int], videos: Sequence[object] = (),
                images: Sequence[object] = ()) -> PreparedPrompt:
        """Expand each run of ``<|video_pad|>``/``<|image_pad|>`` (one item each, in order) to its
        ``T'*h*w/4`` tokens and splice in the item's vision embeddings."""
        cfg = self.config
        m = cfg.vision_config.spatial_merge_size
        queues = {cfg.image_token_id: [(x, False) for x in images], cfg.video_token_id: [(x, True) for x in videos]}
        embed = self.model.language_model.embed_tokens
        ids: list[int] = []
        pieces: list[torch.Tensor] = []
        items: list[tuple[int, int, int, int]] = []
        i = 0
        while i < len(prompt_ids):
            tok = prompt_ids[i]
            if tok not in queues:
                pieces.append(embed(torch.tensor([tok])))
                ids.append(tok)
                i += 1
                continue
            while i < len(prompt_ids) and prompt_ids[i] == tok:
                i += 1
            if not queues[tok]:
                raise ValueError(f"more placeholder runs of token {tok} than media items")
            media, is_video = queues[tok].pop(0)
            pixels, (t, h, w) = self.preprocess(media, video=is_video)
            emb = self.vision_embeddings(pixels, [(t, h, w)])
            items.append((len(ids), t, h // m, w // m))
            ids.extend([tok] * emb.shape[0])
            pieces.append(emb)
        if any(queues.values()):
            raise ValueError("more media items than placeholder runs")
        return PreparedPrompt(ids, torch.cat(pieces).float(), mrope_positions(ids, items),
                              [(o, t * h * w) for o, t, h, w in items])

    # ---- LLM ---------------------------------------------------------------------------------
    def mrope_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, head_dim)`` cos/sin: frequency j takes its angle from the t, h or w row by section."""
        freqs = positions[..., None].float() * self.inv_freq  # (3, L, head_dim/2)
        axis = torch.cat([torch.full((s,), i % 3) for i, s in enumerate(self.mrope_section)])
        f = freqs.gather(0, axis.view(1, 1, -1).expand(1, freqs.shape[1], -1))[0]
        f = torch.cat([f, f], dim=-1)
        return f.cos(), f.sin()

    @torch.no_grad()
    def logits(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.mrope_cos_sin(positions)
        lm = self.model.language_model
        x = embeds
        for layer in lm.layers:
            x = layer(x, cos, sin)
        return self.lm_head(lm.norm(x)).float()

    @torch.no_grad()
    def prompt_logprobs(self, prompt: PreparedPrompt) -> torch.Tensor:
        """``(L, vocab)``: row i is log P(next token | tokens 0..i)."""
        return torch.log_softmax(self.logits(prompt.embeds, prompt.positions), dim=-1)

    @torch.no_grad()
    def greedy(self, prompt: PreparedPrompt, max_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy decode by full recompute; returns tokens and each step's log-probs."""
        embeds, positions = prompt.embeds, prompt.positions
        tokens, steps = [], []
        embed = self.model.language_model.embed_tokens
        for _ in range(max_tokens):
            lp = torch.log_softmax(self.logits(embeds, positions)[-1], dim=-1)
            tok = int(lp.argmax())
            tokens.append(tok)
            steps.append(lp)
            embeds = torch.cat([embeds, embed(torch.tensor([tok])).float()])
            positions = torch.cat([positions, torch.full((3, 1), int(positions.max()) + 1)], dim=1)
        return tokens, steps
