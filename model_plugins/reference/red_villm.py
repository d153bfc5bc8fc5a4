"""RED-VILLM in plain PyTorch: the test oracle and the maker of demo checkpoints.

Qwen-VL(-Chat) written in its original style (DESIGN 3.4, spec-stave-red-villm B):

- vision (``transformer.visual``): ``conv1`` patches, ``positional_embedding`` (a 16x16 grid,
  bicubic-interpolated to the patch grid), ``ln_pre``, pre-LN resblocks in LND layout whose
  ``attn.in_proj`` output is read per head as ``[q_h | k_h | v_h]`` (Qwen-VL's ``VisualAttention``),
  exact-GELU MLP; the adapter ``attn_pool`` (one ``nn.MultiheadAttention`` cross-attention of 256
  learned queries over the patches, 2-D sin-cos positions on both sides, ``kv_proj``, ``ln_q``,
  ``ln_kv``), then ``ln_post`` and ``x @ proj``;
- LLM: Qwen-1 blocks as they are (fused ``c_attn``, ``w1``/``w2``/``c_proj`` MLP, RMSNorm,
  rotate-half RoPE), 1-D positions 0..L-1;
- RED-VILLM video path: the T frames go through the ViT trunk (``vision_layer``), the mean over
  patches gives one temporal token per frame (zero-padded to ``pad_temporal_to`` rows *before*
  ``temporal_module``), the mean over frames one spatial grid (Qwen-VL's adapter, or the
  ``tokenwise`` ``spatial_module``), concatenated in ``token_order``.

Module names are the checkpoint's own (``transformer.*``, ``lm_head.*``). Written for clarity,
not speed: fp32, full-sequence recompute, one prompt at a time. API::

    ref = RedVillmReference.from_pretrained(model_dir)
    pixels = ref.preprocess(frames)                          # (T, 3, S, S)
    ref.image_embeds(pixels[:1])                             # (256, D)
    ref.video_embeds(pixels)                                 # (config.video_tokens(T), D)
    prompt = ref.expand_prompt(ids, images=[img], videos=[frames])
    lp = ref.prompt_logprobs(prompt)                         # (L, vocab)
    tokens, steps = ref.greedy(prompt, max_new_tokens=16)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from framewise.model_plugins.configs.red_villm import RedVillmConfig
from framewise.model_plugins.preprocess import qwen_vl_preprocess
from framewise.model_plugins.reference.stave import apply_rope_fp32, load_checkpoint_tensors, rope_inv_freq

FRAME_CHUNK = 16  # frames per ViT batch (bounds the attention memory at 448 px)


# ---- Qwen-VL vision -----------------------------------------------------------------------------

def get_abs_pos(abs_pos: torch.Tensor, tgt_len: int) -> torch.Tensor:
    """A square grid of ``L`` positions ``(L, C)`` resized to ``tgt_len`` (a square) positions,
    bicubic, ``align_corners=False``, in fp32 (Qwen-VL's ``get_abs_pos``)."""
    src, tgt = math.isqrt(abs_pos.shape[0]), math.isqrt(tgt_len)
    if src * src != abs_pos.shape[0] or tgt * tgt != tgt_len:
        raise ValueError(f"position grids must be square: {abs_pos.shape[0]} -> {tgt_len}")
    if src == tgt:
        return abs_pos
    grid = abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(tgt * tgt, -1).to(abs_pos.dtype)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table ``(grid*grid, dim)``, rows in (h, w) order: the first half of the
    channels encodes the column (w) index, the second half the row (h) index, each as
    ``[sin(p*w_j), cos(p*w_j)]`` with ``w_j = 10000^(-j/(dim/4))``."""
    if dim % 4:
        raise ValueError(f"sin-cos embedding width must be a multiple of 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float32) / np.float32(dim / 4))

    def one(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float32), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    hh, ww = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")
    return torch.from_numpy(np.concatenate([one(ww), one(hh)], axis=1)).float()


class VisualAttention(nn.Module):
    """Qwen-VL's ViT self-attention on ``(L, B, W)``. ``in_proj``'s output is viewed as
    ``(heads, 3*head_dim)`` and split into q, k, v inside each head (not ``q | k | v`` blocks)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, b, w = x.shape
        mixed = self.in_proj(x).view(n, b, self.heads, 3 * self.head_dim)
        q, k, v = mixed.split(self.head_dim, dim=-1)  # each (L, B, heads, hd)
        att = torch.einsum("lbhd,mbhd->bhlm", q / math.sqrt(self.head_dim), k).softmax(-1)
        return self.out_proj(torch.einsum("bhlm,mbhd->lbhd", att, v).reshape(n, b, w))


class VisualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.attn = VisualAttention(width, heads)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden), gelu=nn.GELU(),
                                             c_proj=nn.Linear(hidden, width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList(VisualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))


class Resampler(nn.Module):
    """Qwen-VL's adapter: ``grid^2`` learned queries cross-attend (torch ``nn.MultiheadAttention``,
    LND) to the ``kv_proj``-ed, ``ln_kv``-normed patches; queries get the stored sin-cos table,
    keys the same table resized to the patch grid (values get none)."""

    def __init__(self, n_queries: int, embed_dim: int, kv_dim: int):
        super().__init__()
        grid = math.isqrt(n_queries)
        if grid * grid != n_queries:
            raise ValueError(f"n_queries must be a square, got {n_queries}")
        self.query = nn.Parameter(torch.zeros(n_queries, embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid), requires_grad=False)
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, max(1, embed_dim // 128))
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, kv_dim)`` -> ``(B, n_queries, embed_dim)``."""
        key_pos = get_abs_pos(self.pos_embed, x.shape[1])
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # (N, B, D)
        q = self.ln_q(self.query)[:, None].expand(-1, x.shape[1], -1)
        out = self.attn(q + self.pos_embed[:, None], x + key_pos[:, None], x, need_weights=False)[0]
        return out.permute(1, 0, 2)


def token_module(kind: str, width: int, out: int) -> nn.Module:
    """RED-VILLM's per-token map: ``linear`` (W -> D) or ``mlp2`` (Linear, exact GELU, Linear)."""
    if kind == "linear":
        return nn.Linear(width, out)
    return nn.Sequential(nn.Linear(width, out), nn.GELU(), nn.Linear(out, out))


class VisionTransformer(nn.Module):
    """``transformer.visual``: Qwen-VL's ViT + adapter, plus RED-VILLM's token modules."""

    def __init__(self, config: RedVillmConfig):
        super().__init__()
        v = config.visual
        self.config = config
        width, out = int(v["width"]), int(v["output_dim"])
        self.layers = int(v["layers"])
        self.conv1 = nn.Conv2d(3, width, kernel_size=v["patch_size"], stride=v["patch_size"], bias=False)
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(256, width))
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        self.transformer = VisualTransformer(width, self.layers, int(v["heads"]), float(v["mlp_ratio"]))
        self.attn_pool = Resampler(int(v["n_queries"]), out, width)
        self.ln_post = nn.LayerNorm(out, eps=1e-6)
        self.proj = nn.Parameter(out ** -0.5 * torch.randn(out, out))
        self.temporal_module = token_module(config.temporal_module, width, out)
        if config.spatial_path == "tokenwise":
            self.spatial_module = token_module(config.temporal_module, width, out)

    def trunk(self, pixels: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, N, W)``: patches + positions, ``ln_pre``, the first ``layers``
        resblocks (all by default). Frames are independent: run in chunks of ``FRAME_CHUNK``."""
        layers = self.layers if layers is None else layers
        outs = []
        for chunk in pixels.split(FRAME_CHUNK):
            x = self.conv1(chunk.to(self.conv1.weight.dtype))  # (B, W, g, g)
            x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, N, W)
            x = self.ln_pre(x + get_abs_pos(self.positional_embedding, x.shape[1]))
            x = x.permute(1, 0, 2)  # NLD -> LND
            for blk in self.transformer.resblocks[:layers]:
                x = blk(x)
            outs.append(x.permute(1, 0, 2))
        return torch.cat(outs)

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        """Qwen-VL's image head: ``attn_pool -> ln_post -> @ proj``; ``(B, N, W)`` -> ``(B, Q, D)``."""
        return self.ln_post(self.attn_pool(x)) @ self.proj

    def video_layers(self) -> int:
        return self.layers - 1 if self.config.vision_layer == "penultimate" else self.layers

    def video_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """RED-VILLM on ViT features ``(T, N, W)`` -> ``(video_tokens(T), D)``."""
        cfg = self.config
        n_frames = feats.shape[0]
        temporal = feats.mean(1)  # (T, W): one token per frame
        pad = cfg.temporal_tokens(n_frames) - n_frames
        if pad:
            temporal = torch.cat([temporal, temporal.new_zeros(pad, temporal.shape[1])])
        qt = self.temporal_module(temporal)
        spatial = feats.mean(0)  # (N, W): one token per patch location
        qz = self.adapter(spatial[None])[0] if cfg.spatial_path == "adapter" else self.spatial_module(spatial)
        return torch.cat([qt, qz] if cfg.token_order == "temporal_first" else [qz, qt])


# ---- Qwen-1 LLM -----------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class QWenAttention(nn.Module):
    """Qwen-1 attention: fused ``c_attn`` (rows q | k | v, with bias), causal, ``c_proj``."""

    def __init__(self, config: RedVillmConfig):
        super().__init__()
        self.heads, self.head_dim = config.num_attention_heads, config.kv_channels
        inner = self.heads * self.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * inner)
        self.c_proj = nn.Linear(inner, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = (t.view(n, self.heads, self.head_dim) for t in self.c_attn(x).chunk(3, dim=-1))
        q, k = apply_rope_fp32(q, cos, sin), apply_rope_fp32(k, cos, sin)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(self.head_dim)
        att = att.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        att = att.float().softmax(-1).to(v.dtype)
        return self.c_proj(torch.einsum("hqk,khd->qhd", att, v).reshape(n, -1))


class QWenMLP(nn.Module):
    """``c_proj(w1(x) * silu(w2(x)))``: ``w2`` is the gate."""

    def __init__(self, config: RedVillmConfig):
        super().__init__()
        ff = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, ff, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, ff, bias=not config.no_bias)
        self.c_proj = nn.Linear(ff, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
    def __init__(self, config: RedVillmConfig):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = QWenAttention(config)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cos, sin)
        return x + self.mlp(self.ln_2(x))


class QWenModel(nn.Module):
    def __init__(self, config: RedVillmConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(QWenBlock(config) for _ in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.visual = VisionTransformer(config)


# ---- the model ----------------------------------------------------------------------------------

@dataclass
class PreparedPrompt:
    """A prompt with its placeholders expanded, as the LLM sees it."""

    input_ids: list[int]
    embeds: torch.Tensor  # (L, hidden)
    vision_spans: list[tuple[int, int]]  # (offset, length) of every <imgpad> run, in prompt order


class RedVillmReference(nn.Module):
    def __init__(self, config: RedVillmConfig):
        super().__init__()
        self.config = config
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config.kv_channels, float(config.rotary_emb_base)),
                             persistent=False)

    @classmethod
    def from_pretrained(cls, model_dir: str, **config_overrides) -> RedVillmReference:
        """Load a Qwen-VL / RED-VILLM checkpoint directory; every key must be used and present."""
        config = RedVillmConfig.from_pretrained(model_dir, **config_overrides)
        model = cls(config)
        state = {k: v for k, v in load_checkpoint_tensors(model_dir).items()
                 if not k.endswith("rotary_emb.inv_freq")}  # a buffer some exports keep; recomputed
        if config.tie_word_embeddings and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["transformer.wte.weight"]
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"RED-VILLM checkpoint {model_dir}: missing keys {missing[:8]}, "
                             f"unexpected keys {unexpected[:8]} (spatial_path={config.spatial_path}, "
                             f"temporal_module={config.temporal_module})")
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model.eval()

    @property
    def visual(self) -> VisionTransformer:
        return self.transformer.visual

    # ---- vision ------------------------------------------------------------------------------
    def preprocess(self, media: object) -> torch.Tensor:
        """Frames (or one image) -> ``(T, 3, S, S)`` pixels (Qwen-VL's transform)."""
        return qwen_vl_preprocess(media, int(self.config.visual["image_size"]))

    def _pixels(self, media: object) -> torch.Tensor:
        if isinstance(media, torch.Tensor) and media.is_floating_point():
            return media[None] if media.ndim == 3 else media
        return self.preprocess(media)

    @torch.no_grad()
    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """Qwen-VL's image path (last layer, adapter): ``(1, 3, S, S)`` -> ``(256, D)``."""
        pixels = pixels[None] if pixels.ndim == 3 else pixels
        if pixels.shape[0] != 1:
            raise ValueError(f"one image at a time, got {pixels.shape[0]}")
        return self.visual.adapter(self.visual.trunk(pixels.float()))[0]

    @torch.no_grad()
    def video_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """ViT features ``(T, N, W)`` of the video path (``vision_layer``); refuses T > max_frames."""
        n_frames = pixels.shape[0]
        if n_frames < 1 or pixels.ndim != 4:
            raise ValueError(f"a video is (T, 3, S, S) pixels with T >= 1, got {tuple(pixels.shape)}")
        if n_frames > self.config.max_frames:
            raise ValueError(f"video has {n_frames} frames, more than max_frames={self.config.max_frames}")
        return self.visual.trunk(pixels.float(), self.visual.video_layers())

    @torch.no_grad()
    def video_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """RED-VILLM's video tokens: ``(T, 3, S, S)`` -> ``(config.video_tokens(T), D)``."""
        return self.visual.video_from_features(self.video_features(pixels))

    # ---- prompt ------------------------------------------------------------------------------
    @torch.no_grad()
    def expand_prompt(self, input_ids: Sequence[int], images: Sequence[object] = (),
                      videos: Sequence[object] = ()) -> PreparedPrompt:
        """Expand ``<img></img>`` to ``<img>`` + 256 ``<imgpad>`` + ``</img>`` and
        ``<img><imgpad></img>`` to ``<img>`` + ``video_tokens(T)`` ``<imgpad>`` + ``</img>`` (media
        taken in order per kind), embeddings on the ``<imgpad>`` positions only. Media: frames /
        images as :func:`qwen_vl_preprocess` takes them, or float pixels ``(T, 3, S, S)``."""
        cfg = self.config
        start, end, pad = cfg.image_start_id, cfg.image_end_id, cfg.image_pad_id
        queues = {"image": list(images), "video": list(videos)}
        wte = self.transformer.wte
        ids: list[int] = []
        pieces: list[torch.Tensor] = []
        spans: list[tuple[int, int]] = []
        i, src = 0, list(input_ids)
        while i < len(src):
            tok = src[i]
            if tok in (end, pad):
                raise ValueError(f"token {tok} (</img> or <imgpad>) outside an <img></img> or "
                                 f"<img><imgpad></img> placeholder at position {i}")
            if tok != start:
                ids.append(tok)
                pieces.append(wte(torch.tensor([tok])))
                i += 1
                continue
            if src[i + 1:i + 2] == [end]:
                kind, width = "image", 2
            elif src[i + 1:i + 3] == [pad, end]:
                kind, width = "video", 3
            else:
                raise ValueError(f"<img> at position {i} is not followed by </img> or <imgpad></img>")
            if not queues[kind]:
                raise ValueError(f"more {kind} placeholders than {kind}s")
            pixels = self._pixels(queues[kind].pop(0))
            emb = self.image_embeds(pixels) if kind == "image" else self.video_embeds(pixels)
            ids.append(start)
            pieces.append(wte(torch.tensor([start])))
            spans.append((len(ids), emb.shape[0]))
            ids.extend([pad] * emb.shape[0])
            pieces.append(emb)
            ids.append(end)
            pieces.append(wte(torch.tensor([end])))
            i += width
        left = {k: len(v) for k, v in queues.items() if v}
        if left:
            raise ValueError(f"more media than placeholders: {left}")
        return PreparedPrompt(ids, torch.cat(pieces).float(), spans)

    prepare = expand_prompt

    # ---- LLM ---------------------------------------------------------------------------------
    def _cos_sin(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        if (cfg.use_dynamic_ntk or cfg.use_logn_attn) and n > cfg.seq_length:
            raise ValueError(f"{n} tokens exceed seq_length={cfg.seq_length} (dynamic NTK / log-n "
                             "attention act beyond it and are not implemented)")
        f = torch.arange(n, dtype=torch.float)[:, None] * self.inv_freq
        f = torch.cat([f, f], dim=-1)
        return f.cos(), f.sin()

    @torch.no_grad()
    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        cos, sin = self._cos_sin(embeds.shape[0])
        x = embeds.float()
        for blk in self.transformer.h:
            x = blk(x, cos, sin)
        return self.lm_head(self.transformer.ln_f(x)).float()

    @torch.no_grad()
    def prompt_logprobs(self, prompt: PreparedPrompt | Sequence[int]) -> torch.Tensor:
        """``(L, vocab)``: row i is log P(next token | tokens 0..i). Plain ids are text-only."""
        if not isinstance(prompt, PreparedPrompt):
            prompt = self.expand_prompt(prompt)
        return torch.log_softmax(self.logits(prompt.embeds), dim=-1)

    @torch.no_grad()
    def greedy(self, prompt: PreparedPrompt | Sequence[int],
               max_new_tokens: int = 16) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy decoding by full recompute (no stop tokens); returns tokens and each step's log-probs."""
        if not isinstance(prompt, PreparedPrompt):
            prompt = self.expand_prompt(prompt)
        embeds = prompt.embeds
        tokens, steps = [], []
        for _ in range(max_new_tokens):
            lp = torch.log_softmax(self.logits(embeds)[-1], dim=-1)
            tok = int(lp.argmax())
            tokens.append(tok)
            steps.append(lp)
            embeds = torch.cat([embeds, self.transformer.wte(torch.tensor([tok])).float()])
        return tokens, steps
