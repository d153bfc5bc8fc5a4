"""Framewise vLLM model plugin: video-LLM architectures registered out of tree.

vLLM calls :func:`register` (entry point group ``vllm.general_plugins``) in every
process it starts: front-end, engine core, workers and its model-inspection
subprocess. It must stay idempotent, cheap and free of accelerator access.
"""

from __future__ import annotations

import logging
import os

# The vLLM releases this plugin is written against, declared once (pyproject's extras are tested against it):
# the frame-block attention relies on 0.32's attention-backend names and metadata-builder hooks, and the
# processors on its multimodal processing API, which later releases may change without an error.
SUPPORTED_VLLM = ">=0.32.0,<0.33"
ALLOW_UNTESTED_VLLM = "FRAMEWISE_ALLOW_UNTESTED_VLLM"  # "1": register anyway (`--allow-untested-vllm`)


class UnsupportedVLLMError(RuntimeError):
    pass


def check_vllm_version(version: str | None = None) -> bool:
    """Raises :class:`UnsupportedVLLMError` when ``version`` (default: the installed vLLM's) is outside
    :data:`SUPPORTED_VLLM`, unless ``FRAMEWISE_ALLOW_UNTESTED_VLLM=1`` (then a warning; returns False)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if version is None:
        from vllm import __version__ as version
    if Version(Version(version).base_version) in SpecifierSet(SUPPORTED_VLLM):  # 0.32.0+cpu counts as 0.32.0
        return True
    message = (f"Framewise's model plugin supports vLLM {SUPPORTED_VLLM}, and this is vLLM {version}: the "
               "temporal attention depends on that release's internals. Install a supported vLLM "
               "(pip install 'framewise[cpu]' or 'framewise[gpu]'), or set --allow-untested-vllm "
               f"({ALLOW_UNTESTED_VLLM}=1) to try this one.")
    if os.environ.get(ALLOW_UNTESTED_VLLM) == "1":
        logging.getLogger("framewise.plugin").warning("%s Registering anyway (%s=1).", message, ALLOW_UNTESTED_VLLM)
        return False
    raise UnsupportedVLLMError(message)

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
    check_vllm_version()
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
