"""STAVE's fps sampling follows the authors' evaluation path (issue 23, item 6; notes A.4): qwen-vl-utils 0.0.8's
frame count (2 fps, clamped to [4, 768], even) and index rule (torch's float32 ``linspace``, rounded), then the
lmms-eval class's 32-frame cap. The rule is the checkpoint's (``frame_sampling``); other models keep DESIGN 2's
midpoints. Pure functions plus the planner; the STAVE gateway test serves it end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from framewise.model_plugins.configs import StaveQwen2VLConfig
from framewise.server.video.sampling import FrameSampling, _torch_linspace_round, plan_timestamps, qwen2vl_eval_indices


def authors(total: int, video_fps: float, fps: float = 2.0, cap: int = 32) -> list[int]:
    """The authors' path written with torch and numpy as they call them (qwen-vl-utils 0.0.8, lmms-eval class)."""
    n = total / video_fps * fps
    n = min(max(n, 4), (min(768, total) // 2) * 2)
    n = round(n / 2) * 2
    idx = torch.linspace(0, total - 1, n).round().long().tolist()
    if len(idx) > cap:
        idx = [idx[i] for i in dict.fromkeys(np.linspace(0, len(idx) - 1, cap).astype(int).tolist())]
    return idx


def test_linspace_matches_torch_bit_for_bit():
    for last in range(1, 3000, 11):
        for n in range(2, min(last + 1, 800), 7):
            assert _torch_linspace_round(last, n) == torch.linspace(0, last, n).round().long().tolist(), (last, n)


@pytest.mark.parametrize(("total", "rate"), [(96, 24), (97, 24), (10, 30), (60, 30), (240, 25), (14_400, 24),
                                             (172_800, 24), (25, 25), (7, 24), (3, 1), (130, 29.97)])
def test_indices_are_the_authors(total, rate):
    got = qwen2vl_eval_indices(total, rate, 2.0, 32)
    assert got == authors(total, rate)
    assert len(got) % 2 == 0 and len(got) <= 32 and got == sorted(set(got))


def test_the_worked_examples():
    assert qwen2vl_eval_indices(96, 24, 2.0, 32) == [0, 14, 27, 41, 54, 68, 81, 95]  # 4 s at 24 fps: 8 frames
    assert len(qwen2vl_eval_indices(14_400, 24, 2.0, 32)) == 32  # 10 minutes: 1200 -> capped at 32
    assert len(qwen2vl_eval_indices(48, 24, 2.0, 32)) == 4  # 2 s would be 4 frames; at least 4 anyway
    assert qwen2vl_eval_indices(1, 24, 2.0, 32) == [0]  # qwen-vl-utils raises; the gateway gives the frame


def test_the_planner_returns_those_frames_instants():
    """The decoder takes the frame on screen at each instant: index + 1/2 frame, offset by ``start``."""
    rule = FrameSampling(fps=2.0, fps_rule="qwen2vl_eval")
    got = plan_timestamps(4.0, 24.0, rule, default_frames=32, max_frames=32)
    assert [round(t * 24 - 0.5) for t in got] == [0, 14, 27, 41, 54, 68, 81, 95]
    window = plan_timestamps(10.0, 24.0, FrameSampling(fps=2.0, start=2.0, end=6.0, fps_rule="qwen2vl_eval"),
                             default_frames=32, max_frames=32)
    assert [round(t * 24 - 0.5) for t in window] == [48 + i for i in (0, 14, 27, 41, 54, 68, 81, 95)]
    midpoints = plan_timestamps(4.0, 24.0, FrameSampling(fps=2.0), default_frames=32, max_frames=32)
    assert midpoints == [0.25 + 0.5 * k for k in range(8)]  # DESIGN 2 unchanged for the other models
    assert rule.cache_key() != FrameSampling(fps=2.0).cache_key()  # cached frames never cross rules


def test_stave_checkpoints_take_the_authors_rule_by_default():
    assert StaveQwen2VLConfig().frame_sampling == "qwen2vl_eval"
    with pytest.raises(ValueError, match="frame_sampling"):
        StaveQwen2VLConfig(frame_sampling="nearest")
