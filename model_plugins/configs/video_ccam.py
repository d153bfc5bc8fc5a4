"""``videoccam`` config (Video-CCAM v1.2 layout, DESIGN 3.2)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.models.auto import CONFIG_MAPPING, AutoConfig

PROJECTOR_DEFAULTS = {
    "num_query": 1024, "hidden_size": 1024, "cross_hidden_size": 1152, "num_heads": 16, "num_key_value_heads": 16,
    "attention_bias": True, "intermediate_size": 4096, "hidden_act": "swiglu", "mlp_bias": True,
    "layer_norm_eps": 1e-5, "dropout": 0.1, "attention_dropout": 0.1, "output_size": 3584,
    # graph options the released config does not state; checked against the checkpoint's keys
    "query_self_attention": False, "output_norm": False,
}


@strict
class VideoCCAMConfig(PreTrainedConfig):
    """SigLIP ``vision_config`` + CCAM ``projector_config`` + decoder ``text_config`` (Qwen2 for
    v1.2-7B; Phi-3 / Llama selectable). Every image or video becomes ``num_query`` LLM tokens.

    - ``vision_select_layer``: SigLIP hidden state fed to the projector (-2: penultimate, no post-LN);
    - ``ccam_mask_rule``: ``start`` (t N <= i T) or ``end`` (t N < (i + 1) T);
    - ``num_frames`` / ``max_frames``: default frames per video (32) / hard limit (96 is the paper's
      long-video setting).
    """

    model_type = "videoccam"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_config: dict | None = None
    image_token_id: int = 151665
    video_token_id: int = 151666
    vision_select_layer: int = -2
    ccam_mask_rule: str = "start"
    num_frames: int = 32
    max_frames: int = 96
    frame_batch_size: int = 32
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, dict):
            vc = dict(self.vision_config)
            vc.setdefault("model_type", "siglip_vision_model")
            self.vision_config = CONFIG_MAPPING[vc["model_type"]](**vc)
        elif self.vision_config is None:
            self.vision_config = CONFIG_MAPPING["siglip_vision_model"](
                hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                image_size=384, patch_size=14)
        if isinstance(self.text_config, dict):
            tc = dict(self.text_config)
            tc.setdefault("model_type", "qwen2")
            self.text_config = CONFIG_MAPPING[tc["model_type"]](**tc)
        elif self.text_config is None:  # Qwen2.5-7B, as in Video-CCAM-7B-v1.2
            self.text_config = CONFIG_MAPPING["qwen2"](
                hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064)
        self.projector_config = {**PROJECTOR_DEFAULTS, **(self.projector_config or {})}
        if self.ccam_mask_rule not in ("start", "end"):
            raise ValueError(f"ccam_mask_rule must be 'start' or 'end', got {self.ccam_mask_rule!r}")
        if self.projector_config["cross_hidden_size"] != self.vision_config.hidden_size:
            raise ValueError("projector_config.cross_hidden_size must equal vision_config.hidden_size")
        if self.projector_config["output_size"] != self.text_config.hidden_size:
            raise ValueError("projector_config.output_size must equal text_config.hidden_size")
        if not 1 <= self.num_frames <= self.max_frames:
            raise ValueError(f"num_frames={self.num_frames} must be in [1, max_frames={self.max_frames}]")
        super().__post_init__(**kwargs)

    @property
    def num_query(self) -> int:
        return int(self.projector_config["num_query"])

    @property
    def tokens_per_frame(self) -> int:
        """SigLIP patches per frame (no CLS)."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

    @property
    def vision_layers_needed(self) -> int:
        layer, total = self.vision_select_layer, self.vision_config.num_hidden_layers
        return layer + total + 1 if layer < 0 else layer
