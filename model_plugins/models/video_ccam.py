"""Video-CCAM (arXiv 2408.14023; v1.2 checkpoints) for vLLM (DESIGN 3.2).

- Processor: decoded ``uint8`` frames -> SigLIP pixels (exact square resize, mean/std 0.5);
  every ``<image>``/``<video>`` expands to exactly ``num_query`` tokens whatever the frame count.
- Vision: vLLM's SigLIP tower up to ``vision_select_layer`` (no post-LN, no CLS); the frames
  of one video are encoded in batches of ``frame_batch_size``.
- Projector: CCAM (``model_plugins/layers/ccam.py``), one item at a time so items with
  different frame counts get their own causal cross-attention mask.
- LLM: a stock vLLM decoder from ``text_config`` (Qwen2 for v1.2-7B; Phi-3 or Llama), 1-D
  RoPE and causal attention: paged KV, chunked prefill and prefix caching work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.siglip import SiglipVisionModel
from vllm.model_executor.models.utils import AutoWeightsLoader, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.sequence import IntermediateTensors

from framewise.model_plugins.configs import VideoCCAMConfig
from framewise.model_plugins.layers.ccam import CCAMProjector
from framewise.model_plugins.models.frames import (
    FramesDummyInputsBuilder,
    FramesMultiModalProcessor,
    FramesProcessingInfo,
    frames_placeholder,
    pixels_per_item,
)
from framewise.model_plugins.preprocess import ImageProcessorConfig, load_image_processor_config


class VideoCCAMProcessingInfo(FramesProcessingInfo):
    def get_hf_config(self) -> VideoCCAMConfig:
        return self.ctx.get_hf_config(VideoCCAMConfig)

    def get_image_processor_config(self) -> ImageProcessorConfig:
        size = self.get_hf_config().vision_config.image_size
        cfg = load_image_processor_config(self.ctx.model_config.model, size)
        return cfg if cfg.exact_size else ImageProcessorConfig.siglip(size)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        n = self.get_hf_config().num_query
        return {"image": n, "video": n}


class VideoCCAMMultiModalProcessor(FramesMultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptUpdate]:
        cfg = self.info.get_hf_config()
        n = cfg.num_query
        return [
            PromptReplacement(modality="image", target=[cfg.image_token_id], replacement=[cfg.image_token_id] * n),
            PromptReplacement(modality="video", target=[cfg.video_token_id], replacement=[cfg.video_token_id] * n),
        ]


def projector_key_report(expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> str | None:
    """A readable mismatch report between the projector's parameters and a checkpoint's keys."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or wrong):
        return None
    lines = ["the checkpoint's CCAM projector does not match projector_config:"]
    lines += [f"  missing    projector.{k} {tuple(expected[k])}" for k in missing]
    lines += [f"  unexpected projector.{k} {tuple(found[k])}" for k in unexpected]
    lines += [f"  shape      projector.{k}: checkpoint {tuple(found[k])}, model {tuple(expected[k])}" for k in wrong]
    if any(k.startswith("self_attn") for k in unexpected + missing):
        lines.append("  hint: set projector_config.query_self_attention to match the checkpoint")
    if any(k.startswith("output_norm") for k in unexpected + missing):
        lines.append("  hint: set projector_config.output_norm to match the checkpoint")
    return "\n".join(lines)


@MULTIMODAL_REGISTRY.register_processor(
    VideoCCAMMultiModalProcessor, info=VideoCCAMProcessingInfo, dummy_inputs=FramesDummyInputsBuilder
)
class VideoCCAMForConditionalGeneration(nn.Module, SupportsMultiModal):
    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return frames_placeholder("Video-CCAM", modality)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: VideoCCAMConfig = vllm_config.model_config.hf_config
        self.config = config
        self.configure_mm_token_handling(vocab_size=config.text_config.vocab_size,
                                         mm_token_ids=[config.image_token_id, config.video_token_id])
        with self._mark_tower_model(vllm_config, {"image", "video"}):
            self.vision_encoder = SiglipVisionModel(
                config.vision_config, vllm_config.quant_config, num_hidden_layers_override=config.vision_layers_needed,
                require_post_norm=False, prefix=maybe_prefix(prefix, "vision_encoder"))
            self.projector = CCAMProjector(config.projector_config, mask_rule=config.ccam_mask_rule)
        with self._mark_language_model(vllm_config):
            self.llm = init_vllm_registered_model(vllm_config, hf_config=config.text_config,
                                                  prefix=maybe_prefix(prefix, "llm"))
        self.make_empty_intermediate_tensors = self.llm.make_empty_intermediate_tensors

    def _frame_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(T, 3, S, S)`` -> ``(T, P, C)``, in batches of ``frame_batch_size`` frames."""
        dtype = next(self.projector.parameters()).dtype
        return torch.cat([self.vision_encoder(chunk.to(dtype))
                          for chunk in torch.split(pixels, self.config.frame_batch_size)])

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        items = pixels_per_item(kwargs)
        if not items:
            return []
        feats = self._frame_features(torch.cat(items))
        # one item at a time: its own T, its own causal cross-attention mask
        return [self.projector(f) for f in torch.split(feats, [item.shape[0] for item in items])]

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor | IntermediateTensors:
        return self.llm.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.llm.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Stream ``weights`` into the model one tensor at a time (never a list of the whole
        checkpoint). Projector tensors the projector lacks, or of the wrong shape, are held
        back and reported together with the missing ones once the stream is consumed."""
        expected = {k: tuple(v.shape) for k, v in self.projector.state_dict().items()}
        found: dict[str, tuple] = {}

        def checked() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.startswith("projector."):
                    key = name[len("projector."):]
                    found[key] = tuple(tensor.shape)
                    if expected.get(key) != found[key]:
                        continue
                yield name, tensor

        loaded = AutoWeightsLoader(self).load_weights(checked())
        report = projector_key_report(expected, found)
        if report:
            raise ValueError(report)
        return loaded
