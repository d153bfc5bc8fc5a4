"""``tc_llava`` config: a llava-hf ``LlavaConfig`` plus TC-LLaVA's temporal keys (DESIGN 3.1)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig


@strict
class TCLlavaConfig(LlavaConfig):
    """LLaVA-1.5 layout (CLIP ``vision_config``, Llama ``text_config``) with:

    - ``video_token_index``: placeholder token of a video (images use ``image_token_index``);
    - ``temporal_rope_gamma``: gamma of the temporal-aware dual RoPE, p_n = n + gamma * t_n;
    - ``frame_block_mask``: frame-wise block-causal attention (False: plain causal);
    - ``frame_pooling``: per-frame average pooling stride over the patch grid (1 = off, 2 = 2x2);
    - ``num_frames``: default frames sampled per video; ``max_frames``: hard limit per video.

    ``temporal_rope_gamma = 0`` with ``frame_block_mask = false`` is exactly LLaVA-1.5.
    ``is_mm_prefix_lm`` (read by vLLM) always follows ``frame_block_mask``.
    """

    model_type = "tc_llava"
    attribute_map = {
        "image_token_id": "image_token_index",
        "video_token_id": "video_token_index",
    }

    video_token_index: int = 32001
    temporal_rope_gamma: float = 1.0
    frame_block_mask: bool = True
    is_mm_prefix_lm: bool = True
    frame_pooling: int = 1
    num_frames: int = 8
    max_frames: int = 32

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.frame_pooling < 1:
            raise ValueError(f"frame_pooling must be >= 1, got {self.frame_pooling}")
        if self.grid_size % self.frame_pooling:
            raise ValueError(
                f"frame_pooling={self.frame_pooling} does not divide the {self.grid_size}x"
                f"{self.grid_size} patch grid"
            )
        if self.vision_feature_select_strategy != "default":
            raise ValueError("TC-LLaVA frames need vision_feature_select_strategy='default' (CLS dropped)")
        if not 1 <= self.num_frames <= self.max_frames:
            raise ValueError(f"num_frames={self.num_frames} must be in [1, max_frames={self.max_frames}]")
        # vLLM reads is_mm_prefix_lm to hand the attention one bidirectional range per item;
        # without the frame mask the model is plain causal and must not get those ranges.
        self.is_mm_prefix_lm = bool(self.frame_block_mask)

    @property
    def grid_size(self) -> int:
        """Patches per side of one frame."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def tokens_per_frame(self) -> int:
        """m: LLM tokens of one frame (or image) after optional pooling."""
        return (self.grid_size // self.frame_pooling) ** 2

    @property
    def mrope_section(self) -> list[int]:
        """Switches on vLLM's multi-row position plumbing (rows n, t_n + Delta, n).

        The rows are consumed by TC-LLaVA's own rotary embedding, never by vLLM's
        M-RoPE layer, so the section sizes themselves are not used.
        """
        return [1, 1, 1]
