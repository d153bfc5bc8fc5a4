"""Video-CCAM in plain PyTorch / transformers: the oracle for the vLLM model and the maker of
demo checkpoints. State-dict keys: ``vision_encoder.vision_model.*`` (SigLIP),
``projector.*`` (CCAM), ``llm.model.*`` / ``llm.lm_head.*`` (the decoder)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, SiglipVisionModel

from framewise.model_plugins.configs import VideoCCAMConfig
from framewise.model_plugins.layers.ccam import CCAMProjector
from framewise.model_plugins.preprocess import (
    ImageProcessorConfig,
    as_frames,
    clip_preprocess,
    load_image_processor_config,
)
from framewise.model_plugins.reference.tc_llava import PreparedPrompt
from framewise.model_plugins.weights import iter_safetensors, load_streamed


class VisionEncoder(nn.Module):
    """Holds SigLIP under ``vision_model`` (the checkpoint's key layout)."""

    def __init__(self, cfg):
        super().__init__()
        self.vision_model = SiglipVisionModel(cfg)


class VideoCCAMReference(nn.Module):
    def __init__(self, config: VideoCCAMConfig, image_processor: ImageProcessorConfig | None = None):
        super().__init__()
        self.config = config
        self.image_processor = image_processor or ImageProcessorConfig.siglip(config.vision_config.image_size)
        self.vision_encoder = VisionEncoder(config.vision_config)
        self.projector = CCAMProjector(config.projector_config, mask_rule=config.ccam_mask_rule)
        self.llm = AutoModelForCausalLM.from_config(config.text_config, attn_implementation="eager")

    @classmethod
    def from_pretrained(cls, model_dir: str, **config_overrides) -> VideoCCAMReference:
        config = VideoCCAMConfig.from_pretrained(model_dir, **config_overrides)
        ipc = load_image_processor_config(model_dir, config.vision_config.image_size)
        model = cls(config, ipc)
        load_streamed(model, iter_safetensors(model_dir))  # shard by shard, tensor by tensor
        return model.eval()

    @torch.no_grad()
    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``(T, H, W, 3)`` -> SigLIP features ``(T, P, C)`` of ``vision_select_layer``."""
        pixels = clip_preprocess(frames, self.image_processor)
        out = self.vision_encoder.vision_model(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[self.config.vision_select_layer]

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """One image/video -> ``(num_query, LLM hidden)``."""
        return self.projector(self.frame_features(frames))

    def prepare(self, prompt_ids: Sequence[int], videos: Sequence[object] = (),
                images: Sequence[object] = ()) -> PreparedPrompt:
        cfg = self.config
        embed = self.llm.get_input_embeddings()
        queues = {cfg.image_token_id: list(images), cfg.video_token_id: list(videos)}
        ids, pieces, text = [], [], []
        for tok in prompt_ids:
            if tok not in queues:
                ids.append(tok)
                text.append(tok)
                continue
            what = "image" if tok == cfg.image_token_id else "video"
            frames = as_frames(queues[tok].pop(0), what=what)
            if text:
                pieces.append(embed(torch.tensor(text)))
                text = []
            ids.extend([tok] * cfg.num_query)
            pieces.append(self.encode(frames))
        if text:
            pieces.append(embed(torch.tensor(text)))
        if any(queues.values()):
            raise ValueError("more media items than placeholder tokens")
        return PreparedPrompt(ids, torch.cat(pieces).float(), [])

    @torch.no_grad()
    def logits(self, embeds: torch.Tensor, spans=()) -> torch.Tensor:
        return self.llm(inputs_embeds=embeds[None]).logits[0].float()

    @torch.no_grad()
    def prompt_logprobs(self, prompt: PreparedPrompt) -> torch.Tensor:
        return torch.log_softmax(self.logits(prompt.embeds), dim=-1)

    @torch.no_grad()
    def greedy(self, prompt: PreparedPrompt, max_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
        embeds, tokens, steps = prompt.embeds, [], []
        embed = self.llm.get_input_embeddings()
        for _ in range(max_tokens):
            lp = torch.log_softmax(self.logits(embeds)[-1], dim=-1)
            tok = int(lp.argmax())
            tokens.append(tok)
            steps.append(lp)
            embeds = torch.cat([embeds, embed(torch.tensor([tok])).float()])
        return tokens, steps
