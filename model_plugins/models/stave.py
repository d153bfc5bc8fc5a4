"""STAVE / STAVEQ2 (Rasekh et al., NeurIPS 2025, arXiv 2510.26027) for vLLM: Qwen2-VL with a
temporal self-attention sub-layer in every ViT block (DESIGN 3.3).

Per vision block: ``x += Attn(LN1 x); x += TempAttn(LN3 x); x += MLP(LN2 x)``. TempAttn lets the
T' temporal-patch tokens of each spatial patch position of one item attend to each other
(1-D rotate-half RoPE over the temporal-patch index, fp32 softmax), for images too (T' = 1).
Everything else -- patch embed, spatial attention, merger, the Qwen2 LLM with M-RoPE, the
placeholder layout -- is vLLM's in-tree Qwen2-VL, reused by subclassing.

- Processor: decoded ``uint8`` frames -> Qwen2-VL ``pixel_values``/``pixel_values_videos`` and
  ``*_grid_thw`` in torch (``preprocess.qwen2vl_preprocess``); transformers' Qwen2-VL image and
  video processors need torchvision, which the CPU stack does not have.
- Weights: Qwen2-VL's names plus ``visual.blocks.{i}.norm3.*`` and
  ``visual.blocks.{i}.temp_attn.{qkv,proj}.*``; a missing temporal weight fails the load.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
from collections.abc import Iterable, Mapping, Sequence
from functools import partial

import torch
from torch import nn
from transformers import BatchFeature


def _qwen2vl_without_torchvision() -> None:
    """vLLM's ``qwen2_vl.py`` imports ``smart_resize`` (and the processor class names) from
    transformers' torchvision-backed image processor module. Without torchvision, stand that
    module in with transformers' PIL-backed one (same ``smart_resize``); this model never calls
    a transformers processor."""
    name = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
    if name in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

    stub = types.ModuleType(name)
    stub.smart_resize = pil.smart_resize
    stub.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil
    stub.__all__ = ["Qwen2VLImageProcessor"]
    sys.modules[name] = stub


_qwen2vl_without_torchvision()

from vllm.config import VllmConfig  # noqa: E402
from vllm.model_executor.layers.fusion.mm_input_norm import build_mm_input_norm  # noqa: E402
from vllm.model_executor.layers.linear import ReplicatedLinear  # noqa: E402
from vllm.model_executor.models.qwen2_vl import (  # noqa: E402
    Qwen2VisionBlock,
    Qwen2VisionTransformer,
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.model_executor.models.utils import AutoWeightsLoader, init_vllm_registered_model, maybe_prefix  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.processing import PromptReplacement, PromptUpdate  # noqa: E402

from framewise.model_plugins.configs import StaveQwen2VLConfig  # noqa: E402
from framewise.model_plugins.preprocess import (  # noqa: E402
    InvalidMediaError,
    Qwen2VLPixelConfig,
    as_frames,
    load_qwen2vl_pixel_config,
    qwen2vl_preprocess,
)

# ----------------------------------------------------------------------------------------
# Multimodal processing (front-end process)
# ----------------------------------------------------------------------------------------


class _PixelConfigAsImageProcessor:
    """What vLLM's Qwen2-VL token counting reads from an image processor (``size``, ``merge_size``)."""

    def __init__(self, cfg: Qwen2VLPixelConfig):
        self.size = {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}
        self.merge_size = cfg.merge_size
        self.patch_size = cfg.patch_size
        self.temporal_patch_size = cfg.temporal_patch_size


class StaveProcessingInfo(Qwen2VLProcessingInfo):
    def get_hf_config(self) -> StaveQwen2VLConfig:
        return self.ctx.get_hf_config(StaveQwen2VLConfig)

    def get_pixel_config(self) -> Qwen2VLPixelConfig:
        return load_qwen2vl_pixel_config(self.ctx.model_config.model)

    def get_hf_processor(self, **kwargs: object):
        raise NotImplementedError("STAVE preprocesses in the plugin (transformers' Qwen2-VL processors need "
                                  "torchvision); there is no HF processor")

    def get_image_processor(self, **kwargs: object) -> _PixelConfigAsImageProcessor:
        return _PixelConfigAsImageProcessor(self.get_pixel_config())

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"text_kwargs": set(), "images_kwargs": set(), "videos_kwargs": set()}

    def get_num_frames_with_most_features(self, seq_len: int, mm_counts: Mapping[str, int],
                                          max_frames_per_video: int | None = None) -> int:
        """Profiling/budget frames per video: at most ``max_frames`` (config), as many as fit in ``seq_len``."""
        return super().get_num_frames_with_most_features(seq_len, mm_counts, self.get_hf_config().max_frames)

    def placeholder_token(self, modality: str) -> str:
        cfg = self.get_hf_config()
        token_id = cfg.image_token_id if modality == "image" else cfg.video_token_id
        return self.get_tokenizer().convert_ids_to_tokens(token_id)


class StaveDummyInputsBuilder(Qwen2VLDummyInputsBuilder):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return (self.info.placeholder_token("image") * mm_counts.get("image", 0)
                + self.info.placeholder_token("video") * mm_counts.get("video", 0))


class StaveMultiModalProcessor(Qwen2VLMultiModalProcessor):
    """Frames are validated and preprocessed here, in torch (no HF processor)."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        ipc = self.info.get_pixel_config()
        max_frames = self.info.get_hf_config().max_frames
        out: dict[str, torch.Tensor] = {}
        for modality, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            pixels, grids = [], []
            for i, item in enumerate(hf_data.get(f"{modality}s") or []):
                frames = as_frames(item, what=f"{modality} {i}" if modality == "video" else "image")
                if modality == "image" and frames.shape[0] != 1:
                    raise InvalidMediaError(f"an image is one frame, got {frames.shape[0]}")
                if frames.shape[0] > max_frames:
                    raise InvalidMediaError(f"video {i} has {frames.shape[0]} frames; this model takes at most "
                                            f"{max_frames} (max_frames in config.json)")
                px, grid = qwen2vl_preprocess(frames, ipc)
                pixels.append(px)
                grids.append(grid)
            if pixels:
                out[key] = torch.cat(pixels)
                out[f"{modality}_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        return BatchFeature(out)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptUpdate]:
        cfg = self.info.get_hf_config()
        merge = cfg.vision_config.spatial_merge_size**2
        token = {"image": cfg.image_token_id, "video": cfg.video_token_id}

        def replacement(item_idx: int, modality: str) -> list[int]:
            grid_thw = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data
            return [token[modality]] * (int(grid_thw.prod()) // merge)

        return [PromptReplacement(modality=m, target=[token[m]], replacement=partial(replacement, modality=m))
                for m in ("image", "video")]


# ----------------------------------------------------------------------------------------
# Vision tower: Qwen2-VL blocks + temporal attention (worker process)
# ----------------------------------------------------------------------------------------


def temporal_rope(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(T', head_dim)`` in fp32 for rotate-half RoPE over all ``head_dim`` dims:
    dim j pairs with j + head_dim/2 at frequency theta^(-2j/head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x (..., T', d)`` rotated in fp32 and cast back (Qwen2-VL's vision RoPE convention)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class TemporalAttention(nn.Module):
    """For each spatial patch position n of one item, its T' temporal-patch tokens attend to each
    other. ``layout``: ``paper`` writes O[n, t] back to row t*N + n (frame-major, as the input);
    ``released`` writes the patch-major flattening of O into the frame-major rows, i.e. row r gets
    O[r // T', r % T'] (the authors' code)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, theta: float, layout: str, prefix: str = ""):
        super().__init__()
        self.num_heads, self.head_dim, self.theta, self.layout = num_heads, head_dim, theta, layout
        inner = num_heads * head_dim
        self.qkv = ReplicatedLinear(dim, 3 * inner, bias=True, prefix=f"{prefix}.qkv")
        self.proj = ReplicatedLinear(inner, dim, bias=True, prefix=f"{prefix}.proj")

    def attend(self, qkv: torch.Tensor, t: int, n: int) -> torch.Tensor:
        """``qkv (t*n, 3*H*d)`` of one item -> attention output ``(t*n, H*d)`` in the chosen layout."""
        h, d = self.num_heads, self.head_dim
        q, k, v = qkv.view(t, n, 3, h, d).permute(2, 1, 3, 0, 4).unbind(0)  # each (n, h, t, d)
        cos, sin = temporal_rope(torch.arange(t, device=qkv.device), d, self.theta)
        q, k = apply_rotate_half(q, cos, sin), apply_rotate_half(k, cos, sin)
        scores = (q @ k.transpose(-1, -2)) * d**-0.5
        o = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v  # (n, h, t, d)
        if self.layout == "paper":
            return o.permute(2, 0, 1, 3).reshape(t * n, h * d)  # row t*n + i <- O[i, t]
        return o.permute(0, 2, 1, 3).reshape(n * t, h * d)  # row r <- O[r // t, r % t]

    def forward(self, x: torch.Tensor, grid_thw: list[list[int]]) -> torch.Tensor:
        """``x (S, 1, D)``: all items of the call, concatenated; attention never crosses items."""
        qkv, _ = self.qkv(x[:, 0])
        outs, start = [], 0
        for t, gh, gw in grid_thw:
            n = gh * gw
            outs.append(self.attend(qkv[start:start + t * n], t, n))
            start += t * n
        if start != x.shape[0]:
            raise RuntimeError(f"grid_thw covers {start} rows, the vision input has {x.shape[0]}")
        out, _ = self.proj(torch.cat(outs))
        return out[:, None]


class StaveVisionBlock(Qwen2VisionBlock):
    """Qwen2-VL vision block with ``norm3`` + ``temp_attn`` between spatial attention and MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, temporal_heads: int, temporal_theta: float,
                 temporal_layout: str, norm_layer=None, quant_config=None, prefix: str = "") -> None:
        super().__init__(dim, num_heads, mlp_ratio, norm_layer=norm_layer, quant_config=quant_config, prefix=prefix)
        self.norm3 = norm_layer(dim)
        self.temp_attn = TemporalAttention(dim, temporal_heads, dim // num_heads, temporal_theta, temporal_layout,
                                           prefix=f"{prefix}.temp_attn")

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, rotary_pos_emb_cos: torch.Tensor,
                rotary_pos_emb_sin: torch.Tensor, max_seqlen: int | None = None, *,
                grid_thw: list[list[int]]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens=cu_seqlens, rotary_pos_emb_cos=rotary_pos_emb_cos,
                          rotary_pos_emb_sin=rotary_pos_emb_sin, max_seqlen=max_seqlen)
        x = x + self.temp_attn(self.norm3(x), grid_thw)
        return x + self.mlp(self.norm2(x))


class StaveVisionTransformer(Qwen2VisionTransformer):
    def __init__(self, config: StaveQwen2VLConfig, norm_eps: float = 1e-6, quant_config=None,
                 input_norm: nn.Module | None = None, prefix: str = "") -> None:
        vc = config.vision_config
        no_blocks = copy.copy(vc)
        no_blocks.depth = 0  # the parent builds everything but the blocks
        super().__init__(no_blocks, norm_eps=norm_eps, quant_config=quant_config, input_norm=input_norm,
                         prefix=prefix)
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.blocks = nn.ModuleList([
            StaveVisionBlock(vc.embed_dim, vc.num_heads, vc.mlp_ratio, temporal_heads=config.temporal_num_heads,
                             temporal_theta=config.temporal_rope_theta,
                             temporal_layout=config.temporal_output_layout, norm_layer=norm_layer,
                             quant_config=quant_config, prefix=f"{prefix}.blocks.{i}")
            for i in range(vc.depth)
        ])

    def forward(self, x: torch.Tensor, grid_thw: torch.Tensor | list[list[int]] | None, *,
                encoder_metadata: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if grid_thw is None:
            raise NotImplementedError("STAVE's temporal attention needs grid_thw (no encoder CUDA graphs)")
        grid = grid_thw if isinstance(grid_thw, list) else grid_thw.tolist()
        x = self.patch_embed(self.input_norm(x.to(device=self.device), self.dtype))
        meta = encoder_metadata or self.prepare_encoder_metadata(grid)
        x = x.unsqueeze(1)
        for blk in self.blocks:
            x = blk(x, cu_seqlens=meta["cu_seqlens"], rotary_pos_emb_cos=meta["rotary_pos_emb_cos"],
                    rotary_pos_emb_sin=meta["rotary_pos_emb_sin"], max_seqlen=meta["max_seqlen"], grid_thw=grid)
        return self.merger(x)


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------


@MULTIMODAL_REGISTRY.register_processor(StaveMultiModalProcessor, info=StaveProcessingInfo,
                                        dummy_inputs=StaveDummyInputsBuilder)
class StaveQwen2VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with STAVE's vision tower; M-RoPE, merging and the LLM unchanged."""

    # The plugin's processor hands over normalised pixels; no second normalisation on the device.
    supports_mm_device_do_normalize = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        config: StaveQwen2VLConfig = vllm_config.model_config.hf_config
        multimodal_config = vllm_config.model_config.get_multimodal_config()
        self.model_config = vllm_config.model_config
        self.use_data_parallel = multimodal_config.mm_encoder_tp_mode == "data"
        if self.use_data_parallel:
            raise NotImplementedError("STAVE does not support mm_encoder_tp_mode='data'")
        self.config = config
        self.multimodal_config = multimodal_config
        with self._mark_tower_model(vllm_config, {"image", "video"}):
            self.visual = StaveVisionTransformer(config, norm_eps=getattr(config, "rms_norm_eps", 1e-6),
                                                 quant_config=vllm_config.quant_config,
                                                 input_norm=build_mm_input_norm(self.model_config),
                                                 prefix=maybe_prefix(prefix, "visual"))
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(vllm_config=vllm_config,
                                                             prefix=maybe_prefix(prefix, "language_model"),
                                                             architectures=["Qwen2ForCausalLM"])
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def get_encoder_cudagraph_config(self):
        raise NotImplementedError("STAVE's temporal attention needs grid_thw (no encoder CUDA graphs)")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Qwen2-VL loading; then every temporal parameter must have come from the checkpoint."""
        params = dict(self.named_parameters())

        def checked(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if ".temp_attn." in name or ".norm3." in name:
                    key = name.removeprefix("model.")
                    if key not in params:
                        raise ValueError(f"unexpected temporal weight {name!r} in the checkpoint")
                    if tuple(params[key].shape) != tuple(tensor.shape):
                        raise ValueError(f"temporal weight {name!r} has shape {tuple(tensor.shape)}, "
                                         f"expected {tuple(params[key].shape)}")
                yield name, tensor

        loaded = AutoWeightsLoader(self).load_weights(checked(weights), mapper=self.hf_to_vllm_mapper)
        temporal = [name for name, _ in self.named_parameters() if ".temp_attn." in name or ".norm3." in name]
        missing = sorted(set(temporal) - loaded)
        if missing:
            raise ValueError(f"STAVE checkpoint lacks {len(missing)} temporal weight(s), e.g. {missing[:4]} "
                             "(use `framewise convert-qwen2vl` to add zero-initialised temporal layers)")
        return loaded


class CustomQwen2VLForConditionalGeneration(StaveQwen2VLForConditionalGeneration):
    """The authors' class name (config.json of checkpoints saved by their code)."""


@MULTIMODAL_REGISTRY.register_processor(StaveMultiModalProcessor, info=StaveProcessingInfo,
                                        dummy_inputs=StaveDummyInputsBuilder)
class Qwen2VLOnPluginPreprocessing(Qwen2VLForConditionalGeneration):
    """vLLM's in-tree Qwen2-VL, model code untouched, fed by the plugin's torch preprocessing (its own
    processor needs torchvision): the stock baseline STAVE is compared with. The temporal weights of a
    STAVE checkpoint are skipped, so ``hf_overrides={"architectures": ["Qwen2VLOnPluginPreprocessing"]}``
    runs any STAVE checkpoint as plain Qwen2-VL."""

    supports_mm_device_do_normalize = False  # the plugin's processor hands over normalised pixels

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights((n, w) for n, w in weights if ".temp_attn." not in n and ".norm3." not in n)
