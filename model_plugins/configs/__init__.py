"""HF config classes of the Framewise architectures (registered with AutoConfig)."""

from model_plugins.configs.stave import StaveQwen2VLConfig
from model_plugins.configs.tc_llava import TCLlavaConfig
from model_plugins.configs.video_ccam import VideoCCAMConfig

__all__ = ["StaveQwen2VLConfig", "TCLlavaConfig", "VideoCCAMConfig"]
