"""DESIGN 3.1 worked examples and properties of TC-LLaVA's position and mask functions."""

import pytest
import torch

from framewise.model_plugins.layers.frame_block_ranges import frame_block_ranges
from framewise.model_plugins.layers.temporal import (
    VisualSpan,
    apply_rope,
    attention_ends,
    frame_block_causal_mask,
    next_rotary_position,
    rope_cos_sin,
    rope_inv_freq,
    rotary_positions,
    shifted_position_rows,
    split_frame_blocks,
    temporal_ids,
)

# 2 text, 2 frames x 3 visual tokens, 2 text
EXAMPLE = [VisualSpan(start=2, num_frames=2, tokens_per_frame=3)]


def test_worked_example_temporal_ids():
    assert temporal_ids(10, EXAMPLE).tolist() == [0, 1, 2, 2, 2, 3, 3, 3, 4, 5]


def test_worked_example_rotary_positions_gamma_1():
    assert rotary_positions(10, EXAMPLE, 1.0).tolist() == [0, 2, 4, 5, 6, 8, 9, 10, 12, 14]
    assert next_rotary_position(10, EXAMPLE, 1.0) == 16


def test_worked_example_rotary_positions_gamma_half():
    # p = n + 0.5 t
    assert rotary_positions(10, EXAMPLE, 0.5).tolist() == [0, 1.5, 3, 4, 5, 6.5, 7.5, 8.5, 10, 11.5]
    # generated token n = 10: t = 10 - Delta(4) = 6 -> p = 13
    assert next_rotary_position(10, EXAMPLE, 0.5) == 13


def test_gamma_zero_is_plain_rope():
    assert rotary_positions(10, EXAMPLE, 0.0).tolist() == list(range(10))


def test_worked_example_mask():
    expected = torch.ones(10, 10, dtype=torch.bool).tril()
    # F1a->F1b, F1a->F1c, F1b->F1c, F2a->F2b, F2a->F2c, F2b->F2c
    for q, k in [(2, 3), (2, 4), (3, 4), (5, 6), (5, 7), (6, 7)]:
        expected[q, k] = True
    mask = frame_block_causal_mask(10, EXAMPLE)
    assert torch.equal(mask, expected)
    differs = (mask != torch.ones(10, 10, dtype=torch.bool).tril()).nonzero().tolist()
    assert differs == [[2, 3], [2, 4], [3, 4], [5, 6], [5, 7], [6, 7]]


def test_several_spans_each_removes_its_compression():
    # text(1) | video 2x2 (1..4) | text(2) (5,6) | image 1x4 (7..10) | text(1) (11)
    spans = [VisualSpan(1, 2, 2), VisualSpan(7, 1, 4)]
    t = temporal_ids(12, spans).tolist()
    assert t == [0, 1, 1, 2, 2, 3, 4, 5, 5, 5, 5, 6]
    ends = attention_ends(12, spans).tolist()
    assert ends == [0, 2, 2, 4, 4, 5, 6, 10, 10, 10, 10, 11]
    assert next_rotary_position(12, spans, 1.0) == 12 + 7  # t = 12 - (2 + 3)


def test_shifted_rows_are_a_constant_shift_and_continue_at_decode():
    spans = [VisualSpan(3, 4, 5), VisualSpan(30, 2, 5)]
    n, delta = 45, (20 - 4) + (10 - 2)
    rows = shifted_position_rows(n, spans)
    assert rows[0].tolist() == rows[2].tolist() == list(range(n))
    for gamma in (1.0, 0.5, 0.0, 2.0):
        p_shifted = rows[0].double() + gamma * rows[1].double()
        assert torch.allclose(p_shifted - rotary_positions(n, spans, gamma), torch.full((n,), gamma * delta,
                                                                                        dtype=torch.float64))
        # vLLM's decode rows are (n, n, n): p' = (1 + gamma) n = next position + gamma * Delta
        assert (1 + gamma) * n == pytest.approx(next_rotary_position(n, spans, gamma) + gamma * delta)


def test_two_stacked_rotations_equal_one_rotation_at_n_plus_gamma_t():
    torch.manual_seed(0)
    x = torch.randn(10, 2, 64)
    inv = rope_inv_freq(64, 10000.0)
    n = torch.arange(10, dtype=torch.float64)
    t = temporal_ids(10, EXAMPLE).double()
    gamma = 0.5
    twice = apply_rope(apply_rope(x, *rope_cos_sin(n, inv)), *rope_cos_sin(gamma * t, inv))
    once = apply_rope(x, *rope_cos_sin(rotary_positions(10, EXAMPLE, gamma), inv))
    assert torch.allclose(twice, once, atol=1e-5)


def test_split_frame_blocks():
    assert split_frame_blocks([(4, 15)], 4) == [(4, 7), (8, 11), (12, 15)]
    assert split_frame_blocks([(0, 3), (10, 17)], 4) == [(0, 3), (10, 13), (14, 17)]
    assert split_frame_blocks([(4, 7)], 1) == []  # 1-token frames are causal anyway
    with pytest.raises(ValueError, match="whole number"):
        split_frame_blocks([(4, 9)], 4)
    assert frame_block_ranges({0: [(2, 7)], 3: [(10, 12)]}, 3) == {0: [(2, 4), (5, 7)], 3: [(10, 12)]}


def test_invalid_spans_are_rejected():
    with pytest.raises(ValueError):
        temporal_ids(5, [VisualSpan(2, 2, 3)])  # past the end
    with pytest.raises(ValueError):
        temporal_ids(20, [VisualSpan(2, 2, 3), VisualSpan(6, 1, 3)])  # overlap
