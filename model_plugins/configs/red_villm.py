"""``red_villm`` config: Qwen-VL's own ``config.json`` keys plus RED-VILLM's video keys (DESIGN 3.4).

RED-VILLM (arXiv 2404.11865) turns the image LLM Qwen-VL into a video LLM: frames are encoded
independently by Qwen-VL's ViT; the mean over patches gives one *temporal* token per frame (a new
``temporal_module``), the mean over frames gives one *spatial* grid that goes through Qwen-VL's own
adapter. No code or weights are public, so every reading of the paper is a config value.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.models.auto import CONFIG_MAPPING

VISUAL_DEFAULTS = {  # Qwen-VL(-Chat) ``visual`` block: OpenCLIP ViT-bigG at 448 px + 256-query adapter
    "heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48, "mlp_ratio": 4.9231,
    "output_dim": 4096, "patch_size": 14, "width": 1664, "n_queries": 256,
}
SPATIAL_PATHS = ("adapter", "tokenwise")
TEMPORAL_MODULES = ("linear", "mlp2")
TOKEN_ORDERS = ("temporal_first", "spatial_first")
VISION_LAYERS = ("last", "penultimate")


@strict
class RedVillmConfig(PreTrainedConfig):
    """Qwen-VL (flat Qwen-1 LLM keys + ``visual``) with RED-VILLM's choices:

    - ``spatial_path``: ``adapter`` (Qwen-VL's 256-query adapter + ``ln_post`` + ``proj`` on the
      frame-mean grid: 256 tokens) or ``tokenwise`` (``transformer.visual.spatial_module``, of the
      ``temporal_module`` kind, on every pooled patch: (image_size / patch_size)^2 tokens);
    - ``temporal_module``: ``linear`` (width -> output_dim) or ``mlp2`` (Linear, GELU, Linear), weights
      under ``transformer.visual.temporal_module``;
    - ``pad_temporal_to``: temporal features are zero-padded to this many frames *before* the
      temporal module (Video-ChatGPT), so a video is always ``pad_temporal_to + spatial`` tokens
      (356 by default); ``None`` keeps T temporal tokens;
    - ``token_order``: ``temporal_first`` (Video-ChatGPT) or ``spatial_first``;
    - ``vision_layer``: ViT output fed to the video path, ``last`` (Qwen-VL's) or ``penultimate``
      (Video-ChatGPT's); images always take Qwen-VL's own image path;
    - ``num_frames`` / ``max_frames``: the gateway's default frames per video / hard limit
      (``max_frames`` defaults to ``pad_temporal_to``).

    The LLM runs on vLLM's Qwen2 decoder: ``text_config`` is derived from the Qwen-1 keys
    (``intermediate_size`` is Qwen-1's, i.e. twice the MLP width). Qwen-1's dynamic NTK and log-n
    attention only act beyond ``seq_length``, so when either is on the context is capped there.
    """

    model_type = "red_villm"

    # Qwen-1 LLM (Qwen-7B as in Qwen-VL-Chat)
    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016
    layer_norm_epsilon: float = 1e-6
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    seq_length: int = 2048
    max_position_embeddings: int = 8192
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    tie_word_embeddings: bool = False
    visual: dict | None = None
    # RED-VILLM
    spatial_path: str = "adapter"
    temporal_module: str = "linear"
    pad_temporal_to: int | None = 100
    token_order: str = "temporal_first"
    vision_layer: str = "last"
    num_frames: int = 100
    max_frames: int | None = None
    text_config: dict | PreTrainedConfig | None = None

    def __post_init__(self, **kwargs):
        self.visual = {**VISUAL_DEFAULTS, **(self.visual or {})}
        for key, value, allowed in (("spatial_path", self.spatial_path, SPATIAL_PATHS),
                                    ("temporal_module", self.temporal_module, TEMPORAL_MODULES),
                                    ("token_order", self.token_order, TOKEN_ORDERS),
                                    ("vision_layer", self.vision_layer, VISION_LAYERS)):
            if value not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
        if self.rotary_pct != 1.0:
            raise ValueError(f"rotary_pct={self.rotary_pct}: only full rotary (1.0, Qwen-VL's) is supported")
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            raise ValueError("kv_channels * num_attention_heads must equal hidden_size")
        if self.intermediate_size % 2:
            raise ValueError("intermediate_size is Qwen-1's (twice the MLP width): it must be even")
        if self.visual["output_dim"] != self.hidden_size:
            raise ValueError("visual.output_dim must equal hidden_size")
        if self.pad_temporal_to is not None and self.pad_temporal_to < 1:
            raise ValueError(f"pad_temporal_to must be >= 1 or null, got {self.pad_temporal_to}")
        if self.max_frames is None:
            self.max_frames = self.pad_temporal_to or max(self.num_frames, 100)
        if self.pad_temporal_to is not None and self.max_frames > self.pad_temporal_to:
            raise ValueError(f"max_frames={self.max_frames} exceeds pad_temporal_to={self.pad_temporal_to}")
        if not 1 <= self.num_frames <= self.max_frames:
            raise ValueError(f"num_frames={self.num_frames} must be in [1, max_frames={self.max_frames}]")
        capped = self.use_dynamic_ntk or self.use_logn_attn
        self.text_config = CONFIG_MAPPING["qwen2"](
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size // 2, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_attention_heads,
            head_dim=self.kv_channels, hidden_act="silu", rms_norm_eps=self.layer_norm_epsilon,
            rope_parameters={"rope_type": "default", "rope_theta": float(self.rotary_emb_base)},
            max_position_embeddings=self.seq_length if capped else self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings)
        super().__post_init__(**kwargs)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        return self.text_config

    # token ids: Qwen-VL's <img>, </img>, <imgpad>
    @property
    def image_start_id(self) -> int:
        return int(self.visual["image_start_id"])

    @property
    def image_end_id(self) -> int:
        return self.image_start_id + 1

    @property
    def image_pad_id(self) -> int:
        return self.image_start_id + 2

    @property
    def grid_size(self) -> int:
        """Patches per side of one frame (32 for Qwen-VL)."""
        return self.visual["image_size"] // self.visual["patch_size"]

    @property
    def image_tokens(self) -> int:
        """LLM tokens of one image: the adapter's queries."""
        return int(self.visual["n_queries"])

    @property
    def spatial_tokens(self) -> int:
        return self.image_tokens if self.spatial_path == "adapter" else self.grid_size ** 2

    def temporal_tokens(self, num_frames: int) -> int:
        if self.pad_temporal_to is not None and num_frames > self.pad_temporal_to:
            raise ValueError(f"{num_frames} frames exceed pad_temporal_to={self.pad_temporal_to}")
        return self.pad_temporal_to if self.pad_temporal_to is not None else num_frames

    def video_tokens(self, num_frames: int) -> int:
        """LLM tokens of one video of ``num_frames`` frames (356 by default, whatever T)."""
        return self.temporal_tokens(num_frames) + self.spatial_tokens
