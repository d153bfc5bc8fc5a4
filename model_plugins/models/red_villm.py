"""RED-VILLM (arXiv 2404.11865) for vLLM: Qwen-VL turned into a video LLM by two poolings
(DESIGN 3.4; every open reading of the paper is a ``RedVillmConfig`` value).

- Processor: decoded ``uint8`` frames -> Qwen-VL's 448 px bicubic resize (no crop), still ``uint8``
  (``preprocess.qwen_vl_resize``: a 100-frame video crosses to the engine as 60 MB, not 240 MB of
  floats); the CLIP mean/std normalisation runs in the model (``preprocess.clip_normalize``). An image part ``<img></img>`` expands to
  ``<img>`` + 256 ``<imgpad>`` + ``</img>``, a video part ``<img><imgpad></img>`` to ``<img>`` +
  ``video_tokens(T)`` ``<imgpad>`` + ``</img>``; embeddings go on the ``<imgpad>`` positions only.
- Vision (Qwen-VL's ``transformer.visual``, written here in vLLM style): the ViT trunk runs on
  all frames of the call as one batch. An image: Qwen-VL's own path (last layer -> 256-query
  adapter -> ``ln_post`` -> ``@ proj``). A video of T frames, trunk output X (T, N, W) at
  ``vision_layer``: temporal tokens ``temporal_module(pad(X.mean(1)))``, spatial tokens the
  adapter (or ``spatial_module``, ``tokenwise``) on ``X.mean(0)``, concatenated in ``token_order``.
- LLM: vLLM's Qwen2 decoder on ``config.text_config`` (plain 1-D RoPE); Qwen-1's keys are
  renamed by ``framewise.model_plugins.qwen1``. Loading fails naming every checkpoint key it cannot
  place and every expected weight the checkpoint lacks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.layers.conv import Conv2dLayer
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement, PromptUpdate, PromptUpdateDetails
from vllm.sequence import IntermediateTensors

from framewise.model_plugins.configs import RedVillmConfig
from framewise.model_plugins.models.frames import (
    FramesDummyInputsBuilder,
    FramesMultiModalProcessor,
    FramesProcessingInfo,
    frames_to_pixels,
    pixels_per_item,
)
from framewise.model_plugins.preprocess import clip_normalize, qwen_vl_resize
from framewise.model_plugins.qwen1 import is_visual, qwen1_to_qwen2

VISUAL_PREFIX = "transformer.visual."
LN_EPS = 1e-6  # every LayerNorm of Qwen-VL's visual module
FRAME_BATCH = 128  # frames per ViT trunk call (frames are independent: the slicing changes nothing)

# ----------------------------------------------------------------------------------------
# Multimodal processing (front-end process)
# ----------------------------------------------------------------------------------------


class RedVillmProcessingInfo(FramesProcessingInfo):
    def get_hf_config(self) -> RedVillmConfig:
        return self.ctx.get_hf_config(RedVillmConfig)

    def get_hf_processor(self, **kwargs: object):
        raise NotImplementedError("RED-VILLM preprocesses in the plugin (Qwen-VL's processor is remote code); "
                                  "there is no HF processor")

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"text_kwargs": set(), "images_kwargs": set(), "videos_kwargs": set()}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        cfg = self.get_hf_config()
        return {"image": cfg.image_tokens, "video": cfg.video_tokens(cfg.max_frames)}

    def tag_tokens(self, modality: str) -> str:
        """The prompt text of one image (``<img></img>``) or video (``<img><imgpad></img>``) part."""
        cfg = self.get_hf_config()
        ids = [cfg.image_start_id, cfg.image_end_id] if modality == "image" else \
            [cfg.image_start_id, cfg.image_pad_id, cfg.image_end_id]
        return "".join(self.get_tokenizer().convert_ids_to_tokens(ids))


class RedVillmDummyInputsBuilder(FramesDummyInputsBuilder):
    """Profiling inputs: square images and videos of ``max_frames`` frames, Qwen-VL's tags."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return (self.info.tag_tokens("image") * mm_counts.get("image", 0)
                + self.info.tag_tokens("video") * mm_counts.get("video", 0))

    def dummy_image_size(self) -> int:
        return int(self.info.get_hf_config().visual["image_size"])


class RedVillmMultiModalProcessor(FramesMultiModalProcessor):
    """Frames validated and resized here (Qwen-VL's transform, normalised in the model); token ids are
    expanded by vLLM."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        cfg = self.info.get_hf_config()
        size = cfg.visual["image_size"]
        return frames_to_pixels(hf_data, lambda frames: qwen_vl_resize(frames, size), cfg.max_frames)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptUpdate]:
        cfg = self.info.get_hf_config()
        start, end, pad = cfg.image_start_id, cfg.image_end_id, cfg.image_pad_id

        def span(n: int) -> PromptUpdateDetails:
            return PromptUpdateDetails.select_token_id([start] + [pad] * n + [end], pad)

        def video(item_idx: int) -> PromptUpdateDetails:
            return span(cfg.video_tokens(int(out_mm_kwargs["video"][item_idx]["video_num_frames"].data)))

        return [
            PromptReplacement(modality="image", target=[start, end], replacement=span(cfg.image_tokens)),
            PromptReplacement(modality="video", target=[start, pad, end], replacement=video),
        ]


# ----------------------------------------------------------------------------------------
# Vision: Qwen-VL's ViT + adapter, RED-VILLM's temporal/spatial modules (worker process)
# ----------------------------------------------------------------------------------------


def abs_pos(pos: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Qwen-VL's ``get_abs_pos``: a square ``(L, C)`` table bicubically resized to ``num_tokens``."""
    src, tgt = math.isqrt(pos.shape[0]), math.isqrt(num_tokens)
    if src == tgt:
        return pos
    grid = pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(pos.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax attention, ``q (B, Lq, C)``, ``k``/``v (B, Lk, C)`` -> ``(B, Lq, C)``,
    scale ``1/sqrt(C / heads)`` (torch SDPA: softmax accumulated in fp32, no score matrix kept)."""
    b, lq, c = q.shape
    d = c // heads
    q, k, v = (x.reshape(b, x.shape[1], heads, d).transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, lq, c)


class VisionSelfAttention(nn.Module):
    """Qwen-VL's ``VisualAttention`` with q|k|v rows (its per-head interleaved ``in_proj`` is
    reordered at load time, see :func:`deinterleave_in_proj`)."""

    def __init__(self, width: int, heads: int, prefix: str = ""):
        super().__init__()
        self.heads = heads
        self.qkv = ReplicatedLinear(width, 3 * width, bias=True, prefix=f"{prefix}.qkv")
        self.out_proj = ReplicatedLinear(width, width, bias=True, prefix=f"{prefix}.out_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv(x)
        out, _ = self.out_proj(attention(*qkv.chunk(3, dim=-1), self.heads))
        return out


class VisionMLP(nn.Module):
    def __init__(self, width: int, hidden: int, prefix: str = ""):
        super().__init__()
        self.c_fc = ReplicatedLinear(width, hidden, bias=True, prefix=f"{prefix}.c_fc")
        self.c_proj = ReplicatedLinear(hidden, width, bias=True, prefix=f"{prefix}.c_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.c_fc(x)
        x, _ = self.c_proj(F.gelu(x))
        return x


class VisionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, prefix: str = ""):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = VisionSelfAttention(width, heads, prefix=f"{prefix}.attn")
        self.ln_2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = VisionMLP(width, int(width * mlp_ratio), prefix=f"{prefix}.mlp")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisionBlocks(nn.Module):
    """Holds ``resblocks`` (Qwen-VL's ``transformer.visual.transformer.resblocks``)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, prefix: str = ""):
        super().__init__()
        self.resblocks = nn.ModuleList([VisionBlock(width, heads, mlp_ratio, prefix=f"{prefix}.resblocks.{i}")
                                        for i in range(layers)])


class AdapterCrossAttention(nn.Module):
    """torch ``nn.MultiheadAttention``'s math with separate q/k/v projections (its packed
    ``in_proj_weight``/``in_proj_bias`` are split at load time)."""

    def __init__(self, dim: int, heads: int, prefix: str = ""):
        super().__init__()
        self.heads = heads
        self.q_proj = ReplicatedLinear(dim, dim, bias=True, prefix=f"{prefix}.q_proj")
        self.k_proj = ReplicatedLinear(dim, dim, bias=True, prefix=f"{prefix}.k_proj")
        self.v_proj = ReplicatedLinear(dim, dim, bias=True, prefix=f"{prefix}.v_proj")
        self.out_proj = ReplicatedLinear(dim, dim, bias=True, prefix=f"{prefix}.out_proj")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        (q, _), (k, _), (v, _) = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        out, _ = self.out_proj(attention(q, k, v, self.heads))
        return out


class Adapter(nn.Module):
    """Qwen-VL's ``Resampler`` (``attn_pool``): ``n_queries`` learned queries with a fixed 2-D
    sin-cos position table cross-attend to the (position-tagged) patch grid."""

    def __init__(self, width: int, dim: int, n_queries: int, prefix: str = ""):
        super().__init__()
        self.query = nn.Parameter(torch.empty(n_queries, dim))
        self.pos_embed = nn.Parameter(torch.empty(n_queries, dim), requires_grad=False)
        self.kv_proj = ReplicatedLinear(width, dim, bias=False, prefix=f"{prefix}.kv_proj") if width != dim else None
        self.attn = AdapterCrossAttention(dim, dim // 128, prefix=f"{prefix}.attn")
        self.ln_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.ln_kv = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, W)`` -> ``(B, n_queries, D)``."""
        key_pos = abs_pos(self.pos_embed, x.shape[1])
        if self.kv_proj is not None:
            x, _ = self.kv_proj(x)
        x = self.ln_kv(x)
        q = (self.ln_q(self.query) + self.pos_embed).expand(x.shape[0], -1, -1)
        return self.attn(q, x + key_pos, x)


class TokenwiseLinear(ReplicatedLinear):
    """``temporal_module`` / ``spatial_module`` of kind ``linear``: one Linear W -> D."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class TokenwiseMLP2(nn.ModuleList):
    """Kind ``mlp2``: Linear W -> D, exact GELU, Linear D -> D (keys ``.0.*`` and ``.2.*``)."""

    def __init__(self, width: int, dim: int, prefix: str = ""):
        super().__init__([TokenwiseLinear(width, dim, bias=True, prefix=f"{prefix}.0"), nn.GELU(),
                          TokenwiseLinear(dim, dim, bias=True, prefix=f"{prefix}.2")])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x)
        return x


def tokenwise_module(kind: str, width: int, dim: int, prefix: str) -> nn.Module:
    if kind == "linear":
        return TokenwiseLinear(width, dim, bias=True, prefix=prefix)
    if kind == "mlp2":
        return TokenwiseMLP2(width, dim, prefix=prefix)
    raise ValueError(f"unknown temporal_module kind {kind!r}")


class RedVillmVisual(nn.Module):
    """Qwen-VL's ``transformer.visual`` (same parameter names, except the attention projections)
    plus RED-VILLM's ``temporal_module`` (and ``spatial_module`` when ``tokenwise``)."""

    def __init__(self, config: RedVillmConfig, prefix: str = ""):
        super().__init__()
        v = config.visual
        width, dim, patch = int(v["width"]), int(v["output_dim"]), int(v["patch_size"])
        self.config = config
        self.conv1 = Conv2dLayer(3, width, kernel_size=patch, stride=patch, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(256, width))
        self.ln_pre = nn.LayerNorm(width, eps=LN_EPS)
        self.transformer = VisionBlocks(width, int(v["layers"]), int(v["heads"]), float(v["mlp_ratio"]),
                                        prefix=f"{prefix}.transformer")
        self.attn_pool = Adapter(width, dim, int(v["n_queries"]), prefix=f"{prefix}.attn_pool")
        self.ln_post = nn.LayerNorm(dim, eps=LN_EPS)
        self.proj = nn.Parameter(torch.empty(dim, dim))
        self.temporal_module = tokenwise_module(config.temporal_module, width, dim, f"{prefix}.temporal_module")
        if config.spatial_path == "tokenwise":
            self.spatial_module = tokenwise_module(config.temporal_module, width, dim, f"{prefix}.spatial_module")

    @property
    def dtype(self) -> torch.dtype:
        return self.proj.dtype

    def trunk(self, pixels: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """``(B, 3, S, S)`` -> patch features ``(B, N, W)`` after the first ``num_blocks`` blocks."""
        pixels = clip_normalize(pixels.to(device=self.proj.device))  # the processor sends resized 0..255 values
        x = self.conv1(pixels.to(dtype=self.dtype)).flatten(2).transpose(1, 2)
        x = self.ln_pre(x + abs_pos(self.positional_embedding, x.shape[1]))
        for block in self.transformer.resblocks[:num_blocks]:
            x = block(x)
        return x

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        """Qwen-VL's connector: ``(B, N, W)`` -> ``(B, n_queries, D)``."""
        return self.ln_post(self.attn_pool(x)) @ self.proj

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, 256, D)``: Qwen-VL's image path (last layer)."""
        blocks = len(self.transformer.resblocks)
        return torch.cat([self.adapter(self.trunk(chunk, blocks)) for chunk in pixels.split(FRAME_BATCH)])

    def video_trunk_blocks(self) -> int:
        n = len(self.transformer.resblocks)
        return n - 1 if self.config.vision_layer == "penultimate" else n

    def pool_video(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk output of one video ``(T, N, W)`` -> ``(video_tokens(T), D)``."""
        cfg = self.config
        t = x.mean(1)  # one temporal token per frame
        pad = cfg.temporal_tokens(x.shape[0]) - t.shape[0]
        if pad:
            t = torch.cat([t, t.new_zeros(pad, t.shape[1])])
        temporal = self.temporal_module(t)
        z = x.mean(0)  # one spatial token per patch position
        spatial = self.adapter(z[None])[0] if cfg.spatial_path == "adapter" else self.spatial_module(z)
        parts = (temporal, spatial) if cfg.token_order == "temporal_first" else (spatial, temporal)
        return torch.cat(parts)

    def embed_videos(self, videos: list[torch.Tensor]) -> list[torch.Tensor]:
        """The frames of all videos through the trunk as one batch (in slices of ``FRAME_BATCH``
        frames, which bounds the activation memory when vLLM schedules many videos at once),
        then each video pooled."""
        for i, video in enumerate(videos):
            if video.shape[0] > self.config.max_frames:
                raise ValueError(f"video {i} has {video.shape[0]} frames; max_frames is {self.config.max_frames}")
        blocks = self.video_trunk_blocks()
        feats = torch.cat([self.trunk(chunk, blocks) for chunk in torch.cat(videos).split(FRAME_BATCH)])
        return [self.pool_video(f) for f in torch.split(feats, [v.shape[0] for v in videos])]


# ---- Qwen-VL checkpoint keys -> these parameters -----------------------------------------------


def deinterleave_in_proj(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Qwen-VL ``VisualAttention.in_proj`` rows are per head ``[q_h | k_h | v_h]``; return
    ``[q | k | v]`` rows (heads in order inside each), weight ``(3W, W)`` or bias ``(3W,)``."""
    rest = tensor.shape[1:]
    return tensor.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(tensor.shape)


def visual_checkpoint_key(param: str) -> str:
    """The Qwen-VL checkpoint key (``transformer.visual.`` prefix dropped) a parameter comes from."""
    param = re.sub(r"^(transformer\.resblocks\.\d+\.attn)\.qkv\.", r"\1.in_proj.", param)
    return re.sub(r"^attn_pool\.attn\.[qkv]_proj\.(weight|bias)$", r"attn_pool.attn.in_proj_\1", param)


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------


@MULTIMODAL_REGISTRY.register_processor(RedVillmMultiModalProcessor, info=RedVillmProcessingInfo,
                                        dummy_inputs=RedVillmDummyInputsBuilder)
class RedVillmForConditionalGeneration(nn.Module, SupportsMultiModal):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return f"Picture {i}: <img></img>"
        if modality.startswith("video"):
            return f"Video {i}: <img><imgpad></img>"
        raise ValueError(f"RED-VILLM takes images and videos, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: RedVillmConfig = vllm_config.model_config.hf_config
        self.config = config
        self.configure_mm_token_handling(vocab_size=config.text_config.vocab_size,
                                         mm_token_ids=[config.image_pad_id])
        with self._mark_tower_model(vllm_config, {"image", "video"}):
            self.visual = RedVillmVisual(config, prefix=maybe_prefix(prefix, "visual"))
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config, hf_config=config.text_config, prefix=maybe_prefix(prefix, "language_model"),
                architectures=["Qwen2ForCausalLM"])
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    # ---- vision ----------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One ``(tokens, D)`` tensor per item, in the order vLLM passed them."""
        out: list[torch.Tensor] = []
        for key in list(kwargs):  # one modality per call in practice; both handled, in order
            if key == "pixel_values":
                images = pixels_per_item({key: kwargs[key]})
                if images:
                    out.extend(self.visual.embed_images(torch.cat(images)).unbind(0))
            elif key == "pixel_values_videos":
                videos = pixels_per_item({key: kwargs[key], "video_num_frames": kwargs["video_num_frames"]})
                if videos:
                    out.extend(self.visual.embed_videos(videos))
        return out

    # ---- LM ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor | IntermediateTensors:
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    # ---- weights -------------------------------------------------------------------------
    def _visual_plan(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Checkpoint key -> the parameters it fills (q, k, v order for a packed projection)."""
        plan: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for name, param in self.visual.named_parameters():
            plan.setdefault(VISUAL_PREFIX + visual_checkpoint_key(name), []).append((f"visual.{name}", param))
        return plan

    def _load_visual(self, key: str, tensor: torch.Tensor, targets: list[tuple[str, nn.Parameter]]) -> None:
        heads = int(self.config.visual["heads"])
        if re.search(r"\.resblocks\.\d+\.attn\.in_proj\.", key) and tensor.shape[0] % (3 * heads) == 0:
            tensor = deinterleave_in_proj(tensor, heads)
        parts = tensor.chunk(len(targets)) if len(targets) > 1 else [tensor]
        for (name, param), part in zip(targets, parts, strict=True):
            if tuple(part.shape) != tuple(param.shape):
                raise ValueError(f"checkpoint key {key!r} has shape {tuple(tensor.shape)}, which does not fit "
                                 f"{name} {tuple(param.shape)} (config.json's visual/temporal settings?)")
            getattr(param, "weight_loader", default_weight_loader)(param, part)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Qwen-VL keys: LLM ones renamed to Qwen2's and handed to vLLM's Qwen2 loader (streamed),
        visual ones placed here. Raises ``ValueError`` naming every key that has no place and every
        expected weight (``temporal_module`` included) the checkpoint lacks."""
        has_visual = any(True for _ in self.visual.parameters())  # absent when every mm limit is 0
        plan = self._visual_plan() if has_visual else {}
        seen: set[str] = set()
        unplaced: list[str] = []

        def llm_weights() -> Iterable[tuple[str, torch.Tensor]]:
            for key, tensor in weights:
                if is_visual(key):
                    if key in plan:
                        self._load_visual(key, tensor, plan[key])
                        seen.add(key)
                    elif has_visual:
                        unplaced.append(key)
                    continue
                try:
                    mapped = qwen1_to_qwen2(key, tensor)
                except KeyError:
                    unplaced.append(key)
                    continue
                yield from mapped

        loaded = {f"language_model.{n}" for n in self.language_model.load_weights(llm_weights())}
        loaded |= {name for key in seen for name, _ in plan[key]}
        problems = []
        if unplaced:
            problems.append(f"checkpoint keys with no place in this model: {sorted(unplaced)}")
        missing_visual = sorted(set(plan) - seen)
        if missing_visual:
            hint = " (a plain Qwen-VL checkpoint? `framewise convert-qwen-vl` adds a fresh temporal module)" \
                if any(".temporal_module." in k or ".spatial_module." in k for k in missing_visual) else ""
            problems.append(f"checkpoint lacks {missing_visual}{hint}")
        missing_llm = sorted(n for n, _ in self.language_model.named_parameters()
                             if f"language_model.{n}" not in loaded)
        if missing_llm:
            problems.append(f"checkpoint lacks weights for the LLM's {missing_llm} (vLLM Qwen2 names)")
        if problems:
            raise ValueError("RED-VILLM checkpoint does not match config.json (spatial_path="
                             f"{self.config.spatial_path}, temporal_module={self.config.temporal_module}): "
                             + "; ".join(problems))
        return loaded
