"""TC-LLaVA's positions and rotary table (issue 23, item 4): the visual ranges vLLM reports are whole frames or an
error (as ``split_frame_blocks`` requires; the row arithmetic floored them before), and the float64 rotary table is
computed once per forward and given to every layer (it was recomputed in each). The numbers themselves are
checked against the reference implementation by tests/test_vllm_tc_llava.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from framewise.model_plugins.layers.temporal import VisualSpan, shifted_position_rows
from framewise.model_plugins.models import tc_llava


def _positions(m: int, ranges: list[tuple[int, int]], n_tokens: int):
    features = [SimpleNamespace(mm_position=SimpleNamespace(extract_embeds_range=lambda r=r: [r])) for r in ranges]
    model = SimpleNamespace(config=SimpleNamespace(tokens_per_frame=m))
    return tc_llava.TCLlavaForConditionalGeneration.get_mrope_input_positions(model, list(range(n_tokens)), features)


def test_tc_llava_positions_take_whole_frames_only():
    positions, delta = _positions(4, [(2, 9)], 12)  # 2 frames of 4 tokens
    assert positions.shape == (3, 12) and delta == 0
    assert positions.equal(shifted_position_rows(12, [VisualSpan(2, 2, 4)]))
    for bad in ([(2, 8)], [(2, 10)]):  # 7 and 9 tokens: not whole 4-token frames (was floored silently)
        with pytest.raises(ValueError, match="whole number of 4-token frames"):
            _positions(4, bad, 12)


def test_the_rotary_table_is_computed_once_per_forward(monkeypatch):
    """The model's forward makes one table and hands it to the layers as their ``positions``."""
    made, given = [], []
    rotary = tc_llava.TemporalRotaryEmbedding(head_dim=32, theta=10000.0, gamma=0.5)
    table = tc_llava.TemporalRotaryEmbedding.table

    def counted(self, p):
        made.append(p)
        return table(self, p)

    monkeypatch.setattr(tc_llava.TemporalRotaryEmbedding, "table", counted)
    monkeypatch.setattr(tc_llava.LlamaModel, "forward", lambda self, ids, positions, *a, **k: given.append(positions))
    model = tc_llava.TCLlavaLlamaModel.__new__(tc_llava.TCLlavaLlamaModel)  # the forward alone, no vLLM config
    torch.nn.Module.__init__(model)
    model.rotary = rotary
    positions = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 1], [0, 1, 2, 3]])
    tc_llava.TCLlavaLlamaModel.forward(model, None, positions, None)
    assert len(made) == 1 and len(given) == 1 and given[0].shape == (2, 4, 16)
    table = given[0]
    p = positions[0].double() + 0.5 * positions[1].double()
    assert torch.equal(table[0], torch.cos(p[:, None] * rotary.inv_freq[None, :]).float())
    assert torch.equal(table[1], torch.sin(p[:, None] * rotary.inv_freq[None, :]).float())


def test_a_layer_applies_the_table_it_is_given():
    """What the layer does with the table is the rope it did with the positions before (same math, same bits)."""
    from framewise.model_plugins.layers.temporal import apply_rope, rope_cos_sin

    rotary = tc_llava.TemporalRotaryEmbedding(head_dim=32, theta=10000.0, gamma=0.5)
    positions = torch.tensor([[0, 1, 2, 5], [0, 0, 1, 3], [0, 1, 2, 5]])
    q, k = torch.randn(4, 2 * 32), torch.randn(4, 1 * 32)
    rq, rk = rotary(rotary.table(positions), q, k)
    cos, sin = rope_cos_sin(positions[0].double() + 0.5 * positions[1].double(), rotary.inv_freq)
    assert torch.equal(rq, apply_rope(q.view(4, 2, 32), cos, sin).flatten(1))
    assert torch.equal(rk, apply_rope(k.view(4, 1, 32), cos, sin).flatten(1))
    with pytest.raises(RuntimeError, match="multi-row"):
        rotary.table(positions[0])
