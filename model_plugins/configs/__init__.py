"""HF config classes of the Framewise architectures (registered with AutoConfig)."""

from framewise.model_plugins.configs.red_villm import RedVillmConfig
from framewise.model_plugins.configs.stave import StaveQwen2VLConfig
from framewise.model_plugins.configs.tc_llava import TCLlavaConfig
from framewise.model_plugins.configs.video_ccam import VideoCCAMConfig

__all__ = ["RedVillmConfig", "StaveQwen2VLConfig", "TCLlavaConfig", "VideoCCAMConfig"]
