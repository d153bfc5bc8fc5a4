"""TC-LLaVA (arXiv 2409.03206) for vLLM: LLaVA-1.5 with temporal-aware dual RoPE and
a frame-wise block-causal mask inside the LLM (DESIGN 3.1).

- Processor: decoded ``uint8`` frames -> CLIP pixels; ``<video>`` expands to F*m
  tokens, ``<image>`` to m (an image is a 1-frame video); any number of each.
- Vision: vLLM's CLIP tower (penultimate layer, CLS dropped) + LLaVA projector,
  optional per-frame average pooling.
- LLM: vLLM's Llama with our attention: rotary position p' = row0 + gamma * row1
  from rows ``(n, t_n + Delta, n)`` (multi-row position plumbing), and a per-layer
  attention backend that splits each item's bidirectional range into frames.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.interfaces import (
    MultiModalEmbeddings,
    SupportsMRoPE,
    SupportsMultiModal,
)
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors

from framewise.model_plugins.configs import TCLlavaConfig
from framewise.model_plugins.layers.temporal import (
    VisualSpan,
    apply_rope,
    rope_cos_sin,
    rope_inv_freq,
    shifted_position_rows,
)
from framewise.model_plugins.models.frames import (
    FramesDummyInputsBuilder,
    FramesMultiModalProcessor,
    FramesProcessingInfo,
    frames_placeholder,
    pixels_per_item,
)
from framewise.model_plugins.preprocess import load_image_processor_config

# ----------------------------------------------------------------------------------------
# Multimodal processing (front-end process)
# ----------------------------------------------------------------------------------------


class TCLlavaProcessingInfo(FramesProcessingInfo):
    def get_hf_config(self) -> TCLlavaConfig:
        return self.ctx.get_hf_config(TCLlavaConfig)

    def get_image_processor_config(self):
        cfg = self.get_hf_config()
        return load_image_processor_config(self.ctx.model_config.model, cfg.vision_config.image_size)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        cfg = self.get_hf_config()
        return {"image": cfg.tokens_per_frame, "video": cfg.tokens_per_frame * cfg.max_frames}


class TCLlavaMultiModalProcessor(FramesMultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptUpdate]:
        cfg = self.info.get_hf_config()
        m = cfg.tokens_per_frame

        def video_tokens(item_idx: int) -> list[int]:
            frames = int(out_mm_kwargs["video"][item_idx]["video_num_frames"].data)
            return [cfg.video_token_index] * (frames * m)

        return [
            PromptReplacement(modality="image", target=[cfg.image_token_index],
                              replacement=[cfg.image_token_index] * m),
            PromptReplacement(modality="video", target=[cfg.video_token_index], replacement=video_tokens),
        ]


# ----------------------------------------------------------------------------------------
# Language model: Llama with TC-LLaVA attention (worker process)
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemporalSettings:
    gamma: float
    frame_block_mask: bool


def frame_block_backend(settings: TemporalSettings):
    """Per-layer attention backend: only this model's layers get the frame mask."""
    if not settings.frame_block_mask:
        return None  # plain causal: the platform's default backend
    if current_platform.is_cpu():
        from framewise.model_plugins.layers.cpu_frame_block_attention import CPUFrameBlockAttentionBackend

        return CPUFrameBlockAttentionBackend
    if current_platform.is_cuda_alike():
        from framewise.model_plugins.layers.gpu_frame_block_attention import TritonFrameBlockAttentionBackend

        return TritonFrameBlockAttentionBackend
    raise NotImplementedError(f"frame_block_mask is not implemented on {current_platform.device_name}")


class TemporalRotaryEmbedding(nn.Module):
    """Rotate-half RoPE at p' = row0 + gamma * row1, by ``layers/temporal.py``'s rope math (angles in float64,
    applied in fp32). :meth:`table` runs once per forward (float64 is 1/32-1/64 speed on many GPUs); every
    layer applies the same table."""

    def __init__(self, head_dim: int, theta: float, gamma: float):
        super().__init__()
        self.head_dim = head_dim
        self.gamma = gamma
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta), persistent=False)

    def table(self, positions: torch.Tensor) -> torch.Tensor:
        """``(3, N)`` position rows -> ``(2, N, head_dim // 2)``: cos and sin, float32."""
        if positions.ndim != 2:
            raise RuntimeError("TC-LLaVA needs multi-row positions (n, t_n + Delta, n)")
        p = positions[0].double() + self.gamma * positions[1].double()
        return torch.stack(rope_cos_sin(p, self.inv_freq.to(device=p.device)))

    def forward(self, rope: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos, sin = rope[0], rope[1]

        def rotate(x: torch.Tensor) -> torch.Tensor:  # (tokens, heads * head_dim)
            return apply_rope(x.view(x.shape[0], -1, self.head_dim), cos, sin).flatten(1)

        return rotate(q), rotate(k)


def temporal_rotary(config, temporal: TemporalSettings) -> TemporalRotaryEmbedding:
    """The LLM's RoPE (theta, head_dim from its config) at TC-LLaVA's temporal positions."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise NotImplementedError(f"TC-LLaVA supports the default RoPE only, got {rope.get('rope_type')}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return TemporalRotaryEmbedding(head_dim, float(rope.get("rope_theta", 10000.0)), temporal.gamma)


class TCLlavaAttention(nn.Module):
    """Llama attention (same weight names) with TC-LLaVA's rotary and mask. Its ``positions`` argument is the
    model's rotary table (:meth:`TemporalRotaryEmbedding.table`, computed once per forward by
    :class:`TCLlavaLlamaModel`), not the position rows."""

    def __init__(self, config, hidden_size: int, num_heads: int, num_kv_heads: int,
                 max_position_embeddings: int = 8192, quant_config=None, bias: bool = False,
                 bias_o_proj: bool = False, cache_config=None, prefix: str = "",
                 attn_type: str = "decoder", *, temporal: TemporalSettings) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.head_dim = getattr(config, "head_dim", None) or hidden_size // num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(hidden_size, self.head_dim, num_heads, num_kv_heads, bias=bias,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, hidden_size, bias=bias_o_proj,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary_emb = temporal_rotary(config, temporal)  # applies the table; computes none
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn",
                              attn_type=attn_type, attn_backend=frame_block_backend(temporal))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)  # `positions`: the rotary table
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class TCLlavaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", *, temporal: TemporalSettings):
        super().__init__(vllm_config, prefix, attn_layer_type=partial(TCLlavaAttention, temporal=temporal))


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0, "inputs_embeds": 0}
)
class TCLlavaLlamaModel(LlamaModel):
    """LlamaModel compiled with (3, N) positions (dynamic on the token dim). The rotary table is computed here,
    once per forward, and given to every layer in place of the positions."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type=LlamaDecoderLayer):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        self.rotary = temporal_rotary(vllm_config.model_config.hf_config, layer_type.keywords["temporal"])

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None, inputs_embeds: torch.Tensor | None = None,
                **extra_layer_kwargs) -> torch.Tensor | IntermediateTensors:
        return super().forward(input_ids, self.rotary.table(positions), intermediate_tensors, inputs_embeds,
                               **extra_layer_kwargs)


class TCLlavaLlamaForCausalLM(LlamaForCausalLM):
    def _init_model(self, vllm_config: VllmConfig, prefix: str = "", layer_type=LlamaDecoderLayer):
        return TCLlavaLlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------
# (vLLM's llava.py is not imported: it pulls in Pixtral's image processor, which needs
# torchvision, absent from the CPU stack.)


class LlavaProjector(nn.Module):
    """LLaVA-1.5's 2-layer MLP (``multi_modal_projector.linear_{1,2}``)."""

    def __init__(self, vision_hidden: int, text_hidden: int, act: str, bias: bool, quant_config, prefix: str):
        super().__init__()
        self.linear_1 = ColumnParallelLinear(vision_hidden, text_hidden, bias=bias, quant_config=quant_config,
                                             prefix=f"{prefix}.linear_1")
        self.act = get_act_fn(act)
        self.linear_2 = RowParallelLinear(text_hidden, text_hidden, bias=bias, quant_config=quant_config,
                                          prefix=f"{prefix}.linear_2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.linear_1(x)
        x, _ = self.linear_2(self.act(x))
        return x


def vision_layers_needed(config: TCLlavaConfig) -> int:
    """Encoder layers up to the selected feature layer (e.g. -2 of 24 -> 23)."""
    layer, total = config.vision_feature_layer, config.vision_config.num_hidden_layers
    if not isinstance(layer, int):
        raise NotImplementedError("TC-LLaVA takes a single vision_feature_layer")
    return layer + total + 1 if layer < 0 else layer


@MULTIMODAL_REGISTRY.register_processor(
    TCLlavaMultiModalProcessor, info=TCLlavaProcessingInfo, dummy_inputs=FramesDummyInputsBuilder
)
class TCLlavaForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsMRoPE):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    # checkpoints saved by transformers >= 4.52 nest everything under "model."
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.language_model.": "language_model.model.",
            "model.vision_tower.": "vision_tower.",
            "model.multi_modal_projector.": "multi_modal_projector.",
            "lm_head.": "language_model.lm_head.",
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return frames_placeholder("TC-LLaVA", modality)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: TCLlavaConfig = vllm_config.model_config.hf_config
        self.config = config
        if config.frame_block_mask and not vllm_config.scheduler_config.disable_chunked_mm_input:
            raise RuntimeError(
                "TC-LLaVA's frame-wise mask needs whole-video scheduling "
                "(scheduler disable_chunked_mm_input=True); the framewise plugin sets it "
                "unless its registration failed -- run `framewise selfcheck`"
            )
        quant_config = vllm_config.quant_config
        self.configure_mm_token_handling(
            vocab_size=config.text_config.vocab_size,
            mm_token_ids=[config.image_token_index, config.video_token_index],
        )
        with self._mark_tower_model(vllm_config, {"image", "video"}):
            self.vision_tower = CLIPVisionModel(
                config.vision_config, quant_config, num_hidden_layers_override=vision_layers_needed(config),
                require_post_norm=False, prefix=maybe_prefix(prefix, "vision_tower"),
            )
            self.multi_modal_projector = LlavaProjector(
                config.vision_config.hidden_size, config.text_config.hidden_size, config.projector_hidden_act,
                config.multimodal_projector_bias, quant_config, maybe_prefix(prefix, "multi_modal_projector"),
            )
        temporal = TemporalSettings(float(config.temporal_rope_gamma), bool(config.frame_block_mask))
        with self._mark_language_model(vllm_config):
            self.language_model = TCLlavaLlamaForCausalLM(
                vllm_config=vllm_config.with_hf_config(config.text_config, architectures=["LlamaForCausalLM"]),
                prefix=maybe_prefix(prefix, "language_model"),
                layer_type=partial(TCLlavaDecoderLayer, temporal=temporal),
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    # ---- vision ----------------------------------------------------------------------
    def _encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(T, 3, S, S)`` -> ``(T, m, hidden)``."""
        feats = self.vision_tower(pixels.to(self.vision_tower.dtype),
                                  feature_select_strategy=self.config.vision_feature_select_strategy)
        emb = self.multi_modal_projector(feats)
        p = self.config.frame_pooling
        if p > 1:
            t, g = emb.shape[0], self.config.grid_size
            grid = emb.view(t, g, g, -1).permute(0, 3, 1, 2)
            emb = F.avg_pool2d(grid, p).flatten(2).transpose(1, 2)
        return emb

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        items = pixels_per_item(kwargs)
        if not items:
            return []
        emb = self._encode_frames(torch.cat(items))  # every frame of every item in one batch
        return [e.flatten(0, 1) for e in torch.split(emb, [item.shape[0] for item in items])]

    # ---- dual RoPE positions -----------------------------------------------------------
    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        m = self.config.tokens_per_frame
        spans = []
        for feature in mm_features:
            for start, end in feature.mm_position.extract_embeds_range():
                frames, rest = divmod(end - start + 1, m)
                if rest or not frames:  # the same rule as split_frame_blocks: whole frames only
                    raise ValueError(f"visual range ({start}, {end}) is not a whole number of {m}-token frames")
                spans.append(VisualSpan(start, frames, m))
        return shifted_position_rows(len(input_tokens), spans), 0

    # ---- LM ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor | IntermediateTensors:
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
