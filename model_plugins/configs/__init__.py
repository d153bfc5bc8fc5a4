"""HF config classes of the Framewise architectures (registered with AutoConfig)."""

from model_plugins.configs.tc_llava import TCLlavaConfig

__all__ = ["TCLlavaConfig"]
