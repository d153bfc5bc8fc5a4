"""Framewise vLLM model plugin: video-LLM architectures registered out of tree.

vLLM calls :func:`register` (entry point group ``vllm.general_plugins``) in every
process it starts: front-end, engine core, workers and its model-inspection
subprocess. It must stay idempotent, cheap and free of accelerator access.
"""

from __future__ import annotations

# architecture name (config.json "architectures") -> (model_type, "module:Class")
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "TCLlavaForConditionalGeneration": ("tc_llava", "framewise.model_plugins.models.tc_llava:TCLlavaForConditionalGeneration"),
    "VideoCCAM": ("videoccam", "framewise.model_plugins.models.video_ccam:VideoCCAMForConditionalGeneration"),
    "StaveQwen2VLForConditionalGeneration": (
        "stave_qwen2_vl", "framewise.model_plugins.models.stave:StaveQwen2VLForConditionalGeneration"),
    "CustomQwen2VLForConditionalGeneration": (
        "stave_qwen2_vl", "framewise.model_plugins.models.stave:CustomQwen2VLForConditionalGeneration"),
    # vLLM's in-tree Qwen2-VL, model code untouched, on the plugin's preprocessing: STAVE's baseline
    "Qwen2VLOnPluginPreprocessing": ("stave_qwen2_vl", "framewise.model_plugins.models.stave:Qwen2VLOnPluginPreprocessing"),
    "RedVillmForConditionalGeneration": (
        "red_villm", "framewise.model_plugins.models.red_villm:RedVillmForConditionalGeneration"),
}


class WholeItemScheduling:
    """vLLM per-architecture config hook: never split an image/video across prefill steps
    (and, for RED-VILLM on CPU, no encoder profiling run).

    A frame-wise mask is only exact when all keys of a frame are in the cache when
    its queries run. CUDA/ROCm force this for prefix-LM models; CPU does not.
    """

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        hf_config = vllm_config.model_config.hf_config
        if getattr(hf_config, "frame_block_mask", False):
            vllm_config.scheduler_config.disable_chunked_mm_input = True
        mm_config = vllm_config.model_config.multimodal_config
        if getattr(hf_config, "model_type", None) == "red_villm" and mm_config is not None:
            from vllm.platforms import current_platform

            # On CPU the KV cache is sized by VLLM_CPU_KVCACHE_SPACE, not by profiling; the compile
            # warm-up would otherwise push max_num_batched_tokens / 356 dummy 100-frame videos through
            # the ViT (minutes even for the tiny demo model). GPUs keep profiling the encoder.
            if current_platform.is_cpu():
                mm_config.skip_mm_profiling = True

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return None


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from framewise.model_plugins.configs import RedVillmConfig, StaveQwen2VLConfig, TCLlavaConfig, VideoCCAMConfig

    for config_cls in (TCLlavaConfig, VideoCCAMConfig, StaveQwen2VLConfig, RedVillmConfig):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    supported = set(ModelRegistry.get_supported_archs())
    for arch, (_, target) in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)

    # Private in vLLM 0.32 (vllm/model_executor/models/config.py); the model also
    # refuses to start if the setting did not take.
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    for arch in ARCHITECTURES:
        MODELS_CONFIG_MAP.setdefault(arch, WholeItemScheduling)
