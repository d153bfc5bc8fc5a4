"""`framewise serve` and `framewise worker` take one flag per setting, generated from ``Settings`` (names, types,
help), so the commands, the environment and the settings cannot drift apart."""

from __future__ import annotations

import types
import typing

import pytest

from framewise.server.cli import FLAG_ALIASES, NOT_FLAGS, build_parser, settings_from
from framewise.server.settings import Settings


def _sub(command: str):
    ap = build_parser()
    return next(a for a in ap._actions if a.__class__.__name__ == "_SubParsersAction").choices[command]


def _value(name: str, field) -> tuple[list[str], object]:
    """Command-line words for a value other than the default, and the value the setting must then have."""
    kind = field.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is typing.Annotated:
        kind = typing.get_args(kind)[0]
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        default = field.default
        return [flag if not default else "--no-" + name.replace("_", "-")], not default
    if typing.get_origin(kind) is list:
        return [flag, "a,b", flag, "c"], ["a", "b", "c"]
    if typing.get_origin(kind) is typing.Literal:
        choice = next(c for c in typing.get_args(kind) if c != field.default)
        return [flag, choice], choice
    value = {int: 7, float: 2.5, str: "/some/where"}[kind]
    return [flag, str(value)], value


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_every_setting_is_a_flag_of_both_commands(command):
    options = _sub(command)._option_string_actions
    for name, field in Settings.model_fields.items():
        if name in NOT_FLAGS:
            continue
        flag = "--" + name.replace("_", "-")
        assert flag in options and options[flag].dest == name, flag
        assert options[flag].help and field.description in options[flag].help, flag
        for alias in FLAG_ALIASES.get(name, ()):
            assert options[alias].dest == name


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_each_flag_reaches_its_setting(command, tmp_path):
    for name, field in Settings.model_fields.items():
        if name in NOT_FLAGS:
            continue
        words, expected = _value(name, field)
        settings = settings_from(build_parser().parse_args([command, "--model", str(tmp_path), *words]))
        assert getattr(settings, name) == expected, (name, words)


def test_flags_not_given_leave_the_environment_and_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("FRAMEWISE_FETCH_TIMEOUT_S", "11")
    monkeypatch.setenv("FRAMEWISE_ALLOWED_MEDIA_HOSTS", "x:1,y")
    s = settings_from(build_parser().parse_args(["worker", "--model", str(tmp_path)]))
    assert (s.fetch_timeout_s, s.allowed_media_hosts, s.max_video_mb) == (11.0, ["x:1", "y"], 256.0)
    s = settings_from(build_parser().parse_args(["worker", "--model", str(tmp_path), "--fetch-timeout-s", "3"]))
    assert s.fetch_timeout_s == 3.0  # the flag over the environment
