"""``stave_qwen2_vl`` config: transformers' ``Qwen2VLConfig`` plus STAVE's temporal keys (DESIGN 3.3)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Qwen2VLConfig

TEMPORAL_OUTPUT_LAYOUTS = ("released", "paper")


@strict
class StaveQwen2VLConfig(Qwen2VLConfig):
    """Qwen2-VL (``vision_config``, ``text_config`` or flat text keys, M-RoPE) with:

    - ``temporal_heads_scale``: temporal heads = max(1, round(vision num_heads * scale)),
      each of the vision head size (embed_dim / num_heads);
    - ``temporal_output_layout``: ``released`` (the authors' code: the per-patch output is
      written back patch-major into the frame-major stream) or ``paper`` (frame-major);
    - ``temporal_rope_theta``: base of the 1-D RoPE over the temporal-patch index;
    - ``fps``, ``num_frames``, ``max_frames``: the gateway's frame sampling defaults
      (2 fps, at most 32 frames, as the authors evaluate);
    - ``frame_sampling``: how an fps becomes frames: ``qwen2vl_eval`` (the authors' evaluation path:
      qwen-vl-utils' even frame count and index rule, then the 32-frame cap) or ``midpoints``.

    A checkpoint saved by the authors' code (``CustomQwen2VLForConditionalGeneration``,
    ``model_type: qwen2_vl``) loads once its ``model_type`` is set to ``stave_qwen2_vl``.
    """

    model_type = "stave_qwen2_vl"

    temporal_heads_scale: float = 0.25
    temporal_output_layout: str = "released"
    temporal_rope_theta: float = 10000.0
    fps: float = 2.0
    num_frames: int = 32
    max_frames: int = 32
    frame_sampling: str = "qwen2vl_eval"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.frame_sampling not in ("qwen2vl_eval", "midpoints"):
            raise ValueError(f"frame_sampling must be qwen2vl_eval or midpoints, got {self.frame_sampling!r}")
        if self.temporal_output_layout not in TEMPORAL_OUTPUT_LAYOUTS:
            raise ValueError(f"temporal_output_layout must be one of {TEMPORAL_OUTPUT_LAYOUTS}, "
                             f"got {self.temporal_output_layout!r}")
        if self.temporal_heads_scale <= 0:
            raise ValueError(f"temporal_heads_scale must be > 0, got {self.temporal_heads_scale}")
        if not 1 <= self.num_frames <= self.max_frames:
            raise ValueError(f"num_frames={self.num_frames} must be in [1, max_frames={self.max_frames}]")

    @property
    def temporal_num_heads(self) -> int:
        return max(1, round(self.vision_config.num_heads * self.temporal_heads_scale))

    @property
    def temporal_head_dim(self) -> int:
        return self.vision_config.embed_dim // self.vision_config.num_heads
