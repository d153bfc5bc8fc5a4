"""HF config classes of the Framewise architectures (registered with AutoConfig)."""

from model_plugins.configs.red_villm import RedVillmConfig
from model_plugins.configs.stave import StaveQwen2VLConfig
from model_plugins.configs.tc_llava import TCLlavaConfig
from model_plugins.configs.video_ccam import VideoCCAMConfig

__all__ = ["RedVillmConfig", "StaveQwen2VLConfig", "TCLlavaConfig", "VideoCCAMConfig"]
