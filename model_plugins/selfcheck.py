"""Startup self-check: fail loudly where vLLM would only log a broken plugin.

vLLM loads ``vllm.general_plugins`` entry points and, if one raises, logs
"Failed to load plugin" and carries on; the user then sees an unrelated error
much later ("does not recognize this architecture"). :func:`check_plugin`
performs the same steps as vLLM and raises :class:`PluginSelfCheckError`
naming the actual cause.
"""

from __future__ import annotations

import os
import sys
from importlib import import_module
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "vllm.general_plugins"
ENTRY_POINT_NAME = "framewise"


class PluginSelfCheckError(RuntimeError):
    pass


def _shadowing_hint() -> str:
    mod = sys.modules.get("model_plugins")
    if mod is not None and getattr(mod, "__file__", None) is None:
        paths = list(getattr(mod, "__path__", []))
        return (f" 'model_plugins' was imported as a namespace package from {paths}: a directory of that "
                "name in the working directory shadows the installed package; run from elsewhere.")
    return ""


def check_plugin(*, import_models: bool = True) -> list[str]:
    """Verify the plugin is installed, enabled, registers, and its models import.

    Returns the registered architecture names; raises PluginSelfCheckError otherwise.
    """
    eps = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == ENTRY_POINT_NAME]
    if not eps:
        raise PluginSelfCheckError(
            f"the '{ENTRY_POINT_NAME}' entry point is missing from group '{ENTRY_POINT_GROUP}': the framewise "
            "package is not installed in this environment (pip install -e .)"
        )
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and ENTRY_POINT_NAME not in [p.strip() for p in allowed.split(",")]:
        raise PluginSelfCheckError(
            f"VLLM_PLUGINS={allowed!r} excludes '{ENTRY_POINT_NAME}', so vLLM will not register the Framewise models"
        )
    try:
        register = eps[0].load()
        register()
    except Exception as e:  # what vLLM would only log
        raise PluginSelfCheckError(
            f"the vLLM plugin failed to register: {type(e).__name__}: {e}.{_shadowing_hint()}"
        ) from e

    from vllm import ModelRegistry

    from framewise.model_plugins import ARCHITECTURES

    supported = set(ModelRegistry.get_supported_archs())
    missing = [a for a in ARCHITECTURES if a not in supported]
    if missing:
        raise PluginSelfCheckError(f"architectures not registered with vLLM after register(): {missing}")
    if import_models:
        for arch, (_, target) in ARCHITECTURES.items():
            module, cls = target.split(":")
            try:
                getattr(import_module(module), cls)
            except Exception as e:
                raise PluginSelfCheckError(
                    f"model class for {arch} ({target}) failed to import: {type(e).__name__}: {e}"
                ) from e
    return list(ARCHITECTURES)
