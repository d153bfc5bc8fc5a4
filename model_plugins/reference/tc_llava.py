"""TC-LLaVA in plain PyTorch: the test oracle and the maker of demo checkpoints.

Written for clarity, not speed: full-sequence recompute, an explicit boolean
attention mask, one request at a time. Module names give the llava-hf state-dict
keys (``vision_tower.vision_model.*``, ``multi_modal_projector.linear_{1,2}.*``,
``language_model.model.*``, ``language_model.lm_head.*``), so a llava-1.5-*-hf
checkpoint loads unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel

from framewise.model_plugins.configs import TCLlavaConfig
from framewise.model_plugins.layers.temporal import (
    VisualSpan,
    apply_rope,
    frame_block_causal_mask,
    rope_cos_sin,
    rope_inv_freq,
    rotary_positions,
)
from framewise.model_plugins.preprocess import (
    ImageProcessorConfig,
    as_frames,
    clip_preprocess,
    load_image_processor_config,
)
from framewise.model_plugins.weights import iter_safetensors

# checkpoints saved by transformers >= 4.52 nest everything under ``model.``
_NEW_TO_LEGACY_PREFIX = {
    "model.language_model.": "language_model.model.",
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "lm_head.": "language_model.lm_head.",
}


def to_legacy_llava_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state_dict.items():
        for new, old in _NEW_TO_LEGACY_PREFIX.items():
            if k.startswith(new):
                k = old + k[len(new) :]
                break
        out[k] = v
    return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        bias = bool(getattr(cfg, "attention_bias", False))
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=bias)

    def forward(self, x, cos, sin, mask):
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(n, self.n_kv, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # (heads, n, head_dim); mask True = may attend
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask
        )
        return self.o_proj(out.transpose(0, 1).reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.model = LlamaBackbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class VisionTower(nn.Module):
    """Holds the CLIP encoder under ``vision_model`` as llava-hf checkpoints name it."""

    def __init__(self, cfg):
        super().__init__()
        self.vision_model = CLIPVisionModel(cfg)


class Projector(nn.Module):
    """LLaVA-1.5's 2-layer GELU MLP."""

    def __init__(self, cfg: TCLlavaConfig):
        super().__init__()
        bias = cfg.multimodal_projector_bias
        self.linear_1 = nn.Linear(cfg.vision_config.hidden_size, cfg.text_config.hidden_size, bias=bias)
        self.linear_2 = nn.Linear(cfg.text_config.hidden_size, cfg.text_config.hidden_size, bias=bias)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))


@dataclass
class PreparedPrompt:
    """A prompt with its placeholders expanded, as the LLM sees it."""

    input_ids: list[int]
    embeds: torch.Tensor  # (L, hidden)
    spans: list[VisualSpan]


class TCLlavaReference(nn.Module):
    def __init__(self, config: TCLlavaConfig, image_processor: ImageProcessorConfig | None = None):
        super().__init__()
        self.config = config
        size = config.vision_config.image_size
        self.image_processor = image_processor or ImageProcessorConfig(shortest_edge=size, crop_size=size)
        self.vision_tower = VisionTower(config.vision_config)
        self.multi_modal_projector = Projector(config)
        self.language_model = LlamaForCausalLM(config.text_config)
        tc = config.text_config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        theta = float((tc.rope_parameters or {}).get("rope_theta", 10000.0))
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta), persistent=False)

    @classmethod
    def from_pretrained(cls, model_dir: str, **config_overrides) -> TCLlavaReference:
        config = TCLlavaConfig.from_pretrained(model_dir, **config_overrides)
        ipc = load_image_processor_config(model_dir, config.vision_config.image_size)
        model = cls(config, ipc)
        state = to_legacy_llava_keys(dict(iter_safetensors(model_dir)))  # one file or shards
        model.load_state_dict(state, strict=True)
        return model.eval()

    # ---- vision ----------------------------------------------------------------
    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``(T, H, W, 3)`` -> ``(T * m, hidden)`` LLM embeddings, frame-major."""
        pixels = clip_preprocess(frames, self.image_processor).to(self.inv_freq.device)
        out = self.vision_tower.vision_model(pixel_values=pixels.to(self.multi_modal_projector.linear_1.weight.dtype),
                                output_hidden_states=True)
        feats = out.hidden_states[self.config.vision_feature_layer][:, 1:]  # drop CLS
        emb = self.multi_modal_projector(feats)  # (T, G*G, D)
        p = self.config.frame_pooling
        if p > 1:
            t, g = emb.shape[0], self.config.grid_size
            grid = emb.view(t, g, g, -1).permute(0, 3, 1, 2)
            emb = F.avg_pool2d(grid, p).flatten(2).transpose(1, 2)
        return emb.reshape(-1, emb.shape[-1])

    # ---- prompt ----------------------------------------------------------------
    def prepare(
        self,
        prompt_ids: Sequence[int],
        videos: Sequence[object] = (),
        images: Sequence[object] = (),
    ) -> PreparedPrompt:
        """Expand every ``<image>``/``<video>`` token into its frames' embeddings."""
        cfg = self.config
        m = cfg.tokens_per_frame
        embed = self.language_model.model.embed_tokens
        device = self.inv_freq.device
        queues = {cfg.image_token_index: list(images), cfg.video_token_index: list(videos)}
        ids: list[int] = []
        pieces: list[torch.Tensor] = []
        spans: list[VisualSpan] = []
        text: list[int] = []

        def flush_text():
            if text:
                pieces.append(embed(torch.tensor(text, device=device)))
                text.clear()

        for tok in prompt_ids:
            if tok not in queues:
                ids.append(tok)
                text.append(tok)
                continue
            if not queues[tok]:
                raise ValueError(f"more placeholder tokens {tok} than media items")
            what = "image" if tok == cfg.image_token_index else "video"
            frames = as_frames(queues[tok].pop(0), what=what)
            flush_text()
            spans.append(VisualSpan(len(ids), frames.shape[0], m))
            ids.extend([tok] * frames.shape[0] * m)
            pieces.append(self.encode_frames(frames))
        flush_text()
        if any(queues.values()):
            raise ValueError("more media items than placeholder tokens")
        return PreparedPrompt(ids, torch.cat(pieces).float(), spans)

    # ---- LLM -------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, embeds: torch.Tensor, spans: Sequence[VisualSpan]) -> torch.Tensor:
        """``(L, vocab)`` logits with TC-LLaVA's positions and mask (fp32 float math)."""
        cfg = self.config
        n = embeds.shape[0]
        pos = rotary_positions(n, spans, cfg.temporal_rope_gamma)
        cos, sin = rope_cos_sin(pos.to(embeds.device), self.inv_freq)
        mask = frame_block_causal_mask(n, spans) if cfg.frame_block_mask else torch.ones(n, n, dtype=torch.bool).tril()
        mask = mask.to(embeds.device)
        lm = self.language_model
        x = embeds.to(lm.lm_head.weight.dtype)
        for layer in lm.model.layers:
            x = layer(x, cos, sin, mask)
        return lm.lm_head(lm.model.norm(x)).float()

    @torch.no_grad()
    def prompt_logprobs(self, prompt: PreparedPrompt) -> torch.Tensor:
        """``(L, vocab)``: row i is log P(next token | tokens 0..i)."""
        return torch.log_softmax(self.logits(prompt.embeds, prompt.spans), dim=-1)

    @torch.no_grad()
    def greedy(self, prompt: PreparedPrompt, max_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy decode by full recompute; returns tokens and each step's log-probs."""
        embeds, tokens, steps = prompt.embeds, [], []
        embed = self.language_model.model.embed_tokens
        for _ in range(max_tokens):
            lp = torch.log_softmax(self.logits(embeds, prompt.spans)[-1], dim=-1)
            tok = int(lp.argmax())
            tokens.append(tok)
            steps.append(lp)
            new = embed(torch.tensor([tok], device=embeds.device)).to(embeds.dtype)
            embeds = torch.cat([embeds, new])
        return tokens, steps
