"""STAVE's plain-PyTorch reference, demo checkpoint and Qwen2-VL converter (no vLLM engine).

The reference is checked against transformers' ``Qwen2VLForConditionalGeneration`` (zero
temporal ``proj`` => stock Qwen2-VL), the temporal sub-layer against hand-written row tables
of the authors' write-back, and the mechanism by perturbing single patches.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from framewise.model_plugins.convert import qwen2vl_to_stave
from framewise.model_plugins.preprocess import Qwen2VLPixelConfig, qwen2vl_preprocess
from framewise.model_plugins.reference.demo_checkpoint import init_random_, write_stave
from framewise.model_plugins.reference.stave import (
    StaveReference,
    TemporalAttention,
    mrope_positions,
)
from tests.conftest import cli

STAVE_KEYS = ("temporal_heads_scale", "temporal_output_layout", "temporal_rope_theta", "fps", "num_frames", "frame_sampling",
              "max_frames")
VIDEO_PROMPT = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens in this video?"}]}]


def rng_frames(seed: int, t: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return write_stave(str(tmp_path_factory.mktemp("stave") / "demo"))


@pytest.fixture(scope="module")
def zero_dir(tmp_path_factory):
    return write_stave(str(tmp_path_factory.mktemp("stave") / "zero"), zero_temporal_proj=True)


def stock_qwen2vl(model_dir):
    """transformers' Qwen2-VL on a STAVE directory (temporal weights ignored as unexpected keys)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    raw = json.loads(Path(model_dir, "config.json").read_text())
    cfg = Qwen2VLConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures", *STAVE_KEYS)})
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, config=cfg, output_loading_info=True)
    return model.eval(), info


def hf_logits(hf, ids, videos=(), images=()):
    """transformers' forward; ``videos``/``images``: (pixel_values, grid_thw) pairs in prompt order."""
    ii = torch.tensor([ids])
    kw = {}
    cfg = hf.config
    types = (ii == cfg.image_token_id).int() + 2 * (ii == cfg.video_token_id).int()
    if videos:
        kw |= dict(pixel_values_videos=torch.cat([p for p, _ in videos]),
                   video_grid_thw=torch.tensor([g for _, g in videos]))
    if images:
        kw |= dict(pixel_values=torch.cat([p for p, _ in images]), image_grid_thw=torch.tensor([g for _, g in images]))
    with torch.no_grad():
        return hf(input_ids=ii, mm_token_type_ids=types, **kw).logits[0].float()


# ---- demo checkpoint ----------------------------------------------------------------------------

def test_demo_checkpoint_layout(demo_dir):
    from transformers import AutoTokenizer

    from framewise.model_plugins.configs import StaveQwen2VLConfig

    d = demo_dir
    files = set(os.listdir(d))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
            "generation_config.json"} <= files
    raw = json.loads(Path(d, "config.json").read_text())
    assert raw["model_type"] == "stave_qwen2_vl" and raw["architectures"] == ["StaveQwen2VLForConditionalGeneration"]
    assert (raw["temporal_heads_scale"], raw["temporal_output_layout"], raw["temporal_rope_theta"]) == (
        0.25, "released", 10000.0)
    cfg = StaveQwen2VLConfig.from_pretrained(d)
    vc, tc = cfg.vision_config, cfg.text_config
    assert (vc.embed_dim, vc.num_heads, vc.depth, vc.mlp_ratio, vc.hidden_size) == (160, 2, 2, 2, 128)
    assert (cfg.temporal_num_heads, cfg.temporal_head_dim) == (1, 80)
    assert (tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads, tc.num_hidden_layers) == (128, 2, 1, 2)
    assert tc.rope_parameters["mrope_section"] == [8, 12, 12] and tc.rope_parameters["rope_theta"] == 1e6

    # the names transformers writes for Qwen2-VL, plus the temporal ones
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        proj = f.get_tensor("visual.blocks.0.temp_attn.proj.weight")
    assert all(k.startswith(("visual.", "model.layers.", "model.embed_tokens.", "model.norm.", "lm_head."))
               for k in shapes), sorted(shapes)
    for i in range(2):
        p = f"visual.blocks.{i}."
        assert shapes[p + "norm3.weight"] == shapes[p + "norm3.bias"] == (160,)
        assert shapes[p + "temp_attn.qkv.weight"] == (240, 160) and shapes[p + "temp_attn.qkv.bias"] == (240,)
        assert shapes[p + "temp_attn.proj.weight"] == (160, 80) and shapes[p + "temp_attn.proj.bias"] == (160,)
    assert proj.std() > 1e-2  # random, not zero: the mechanism shows

    tok = AutoTokenizer.from_pretrained(d)
    for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"):
        assert tok.convert_tokens_to_ids(name) < tc.vocab_size
    assert tok.convert_tokens_to_ids("<|video_pad|>") == cfg.video_token_id
    assert tok.convert_tokens_to_ids("<|image_pad|>") == cfg.image_token_id
    assert tok.convert_tokens_to_ids("<|vision_start|>") == cfg.vision_start_token_id
    assert tok.eos_token == "<|im_end|>" and tc.eos_token_id == tok.eos_token_id
    chat = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "Hi?"}]}],
        add_generation_prompt=True, tokenize=False)
    assert chat == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|video_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>Hi?"
                    "<|im_end|>\n<|im_start|>assistant\n")
    pre = json.loads(Path(d, "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor"
    assert (pre["min_pixels"], pre["max_pixels"], pre["patch_size"], pre["temporal_patch_size"],
            pre["merge_size"]) == (3136, 200704, 14, 2, 2)


def test_demo_model_cli(tmp_path):
    out = tmp_path / "cli-demo"
    res = cli("demo-model", "--arch", "stave", "--out", str(out))
    assert res.returncode == 0, res.stderr
    ref = StaveReference.from_pretrained(str(out))
    assert ref.config.model_type == "stave_qwen2_vl"


# ---- parity with transformers' Qwen2-VL ----------------------------------------------------------

def _video_image_prompt(tok):
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Compare"},
                                         {"type": "image"}, {"type": "text", "text": "What happens?"}]}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def test_zero_proj_reference_equals_transformers_qwen2vl(zero_dir):
    """Vision embeddings and logits of a video + image prompt, proj = 0: <= 1e-4 from transformers."""
    from transformers import AutoTokenizer

    ref = StaveReference.from_pretrained(zero_dir)
    hf, info = stock_qwen2vl(zero_dir)
    assert not info["missing_keys"] and all(".temp_attn." in k or ".norm3." in k for k in info["unexpected_keys"])
    video, image = rng_frames(1, 6, 84, 112), rng_frames(2, 1, 56, 84)[0]  # T' = 3 <= max(h', w') = 4
    vpix, vgrid = ref.preprocess(video, video=True)
    ipix, igrid = ref.preprocess(image, video=False)
    assert vgrid == (3, 6, 8) and igrid == (1, 4, 6)
    with torch.no_grad():
        ours = ref.vision_embeddings(torch.cat([vpix, ipix]), [vgrid, igrid])
        theirs = hf.model.visual(torch.cat([vpix, ipix]), grid_thw=torch.tensor([vgrid, igrid])).pooler_output
    assert ours.shape == (3 * 6 * 8 // 4 + 6, 128)
    assert (ours - theirs).abs().max() <= 1e-4

    tok = AutoTokenizer.from_pretrained(zero_dir)
    prompt = ref.prepare(_video_image_prompt(tok), videos=[video], images=[image])
    ours = ref.logits(prompt.embeds, prompt.positions)
    theirs = hf_logits(hf, prompt.input_ids, videos=[(vpix, vgrid)], images=[(ipix, igrid)])
    assert ours.shape == theirs.shape and ours.abs().max() > 1
    assert (ours - theirs).abs().max() <= 1e-4


def test_random_proj_changes_visual_token_logprobs(demo_dir):
    """The demo's random temporal layers move visual-position log-probs by > 1e-3 from stock."""
    from transformers import AutoTokenizer

    ref = StaveReference.from_pretrained(demo_dir)
    hf, _ = stock_qwen2vl(demo_dir)
    tok = AutoTokenizer.from_pretrained(demo_dir)
    video = rng_frames(3, 4, 56, 84)
    ids = tok.apply_chat_template(VIDEO_PROMPT, add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    prompt = ref.prepare(ids, videos=[video])
    ours = ref.prompt_logprobs(prompt)
    theirs = torch.log_softmax(hf_logits(hf, prompt.input_ids, videos=[ref.preprocess(video)]), -1)
    off, n = prompt.vision_spans[0]
    assert (ours[:off] - theirs[:off]).abs().max() <= 1e-4  # text before the video: unaffected
    assert (ours[off:off + n] - theirs[off:off + n]).abs().max() > 1e-3


def test_mrope_positions_hand_computed():
    """Two text tokens, a video with T'=3, h'=1, w'=2, one text token: text resumes at max + 1."""
    ids = [7, 8] + [6] * 6 + [9]
    pos = mrope_positions(ids, [(2, 3, 1, 2)])
    assert pos.tolist() == [[0, 1, 2, 2, 3, 3, 4, 4, 5],
                            [0, 1, 2, 2, 2, 2, 2, 2, 5],
                            [0, 1, 2, 3, 2, 3, 2, 3, 5]]


def test_greedy_matches_full_recompute(demo_dir):
    """Each greedy step's log-probs equal the prompt log-probs of the prompt extended by the tokens."""
    from transformers import AutoTokenizer

    ref = StaveReference.from_pretrained(demo_dir)
    tok = AutoTokenizer.from_pretrained(demo_dir)
    video = rng_frames(4, 3, 56, 56)  # odd frame count
    ids = tok.apply_chat_template(VIDEO_PROMPT, add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    prompt = ref.prepare(ids, videos=[video])
    tokens, steps = ref.greedy(prompt, 4)
    assert len(tokens) == 4 and len(set(tokens)) > 1
    longer = ref.prepare(prompt.input_ids + tokens[:3], videos=[video])
    lp = ref.prompt_logprobs(longer)
    for i in range(4):
        assert torch.allclose(lp[len(prompt.input_ids) - 1 + i], steps[i], atol=1e-5)


# ---- preprocessing --------------------------------------------------------------------------------

def test_preprocessing_matches_transformers_image_processor():
    """The plugin's preprocessing (the engine's and the reference's): resize (smart_resize + PIL bicubic),
    normalisation and patch order equal transformers'
    Qwen2VLImageProcessorPil; a video's temporal patches pair consecutive frames, the odd last
    frame repeated."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pc = Qwen2VLPixelConfig(min_pixels=3136, max_pixels=200704)  # the demo's and STAVE's eval setting
    hf = Qwen2VLImageProcessorPil(min_pixels=pc.min_pixels, max_pixels=pc.max_pixels)
    for h, w in ((50, 70), (33, 200), (560, 700)):  # upscale, odd aspect, downscale past max_pixels
        img = rng_frames(h, 1, h, w)
        ours, grid = qwen2vl_preprocess(torch.from_numpy(img), pc)
        out = hf(images=[img[0]], return_tensors="pt")
        assert tuple(grid) == tuple(out["image_grid_thw"][0].tolist())
        assert grid[1] * grid[2] * 196 <= pc.max_pixels
        assert (ours - out["pixel_values"]).abs().max() <= 1e-5, (h, w)

    video = rng_frames(9, 5, 84, 56)
    ours, (t, gh, gw) = qwen2vl_preprocess(torch.from_numpy(video), pc)
    assert (t, gh, gw) == (3, 6, 4)
    rows = ours.view(t, gh * gw, 3, 2, 14, 14)
    for f in range(6):
        frame = hf(images=[video[min(f, 4)]], return_tensors="pt")["pixel_values"].view(gh * gw, 3, 2, 14, 14)
        assert torch.allclose(rows[f // 2, :, :, f % 2], frame[:, :, 0], atol=1e-6), f


# ---- the temporal sub-layer: the authors' write-back, by hand -------------------------------------

# T' = 3 temporal patches, N = 4 patches each; rows are frame-major, r = t * N + n.
# The authors' code computes O[n, t] (patch n's output at step t), flattens it patch-major
# (n, t) and adds it to the frame-major rows as is, so row r receives O[r // 3, r % 3]:
RELEASED_ROWS = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)]
# The paper (and `paper`): row r = t * N + n receives its own O[n, t] = O[r % 4, r // 4].
PAPER_ROWS = [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (2, 1), (3, 1), (0, 2), (1, 2), (2, 2), (3, 2)]
# They agree only on the first and the last row.
SAME_ROWS = [0, 11]


def naive_patch_attention(attn: TemporalAttention, x: torch.Tensor, t: int, theta: float = 10000.0):
    """O[n][s]: patch n's temporal attention output at step s, computed one patch at a time with
    the rotation written out pair by pair (dimension j with j + d/2, angle s * theta^(-2j/d))."""
    n_patches = x.shape[0] // t
    heads, d = attn.heads, attn.head_dim
    out = {}
    for n in range(n_patches):
        rows = x[[s * n_patches + n for s in range(t)]]
        q, k, v = attn.qkv(rows).view(t, 3, heads, d).unbind(1)

        def rot(z):
            z = z.clone()
            for s in range(t):
                for j in range(d // 2):
                    a = s * theta ** (-2 * j / d)
                    x1, x2 = z[s, :, j].clone(), z[s, :, j + d // 2].clone()
                    z[s, :, j], z[s, :, j + d // 2] = x1 * math.cos(a) - x2 * math.sin(a), x2 * math.cos(a) + x1 * math.sin(a)
            return z

        q, k = rot(q), rot(k)
        for s in range(t):
            w = torch.softmax(torch.stack([(q[s] * k[u]).sum(-1) for u in range(t)], -1) / math.sqrt(d), -1)
            out[n, s] = sum(w[:, u, None] * v[u] for u in range(t)).reshape(-1)
    return out


@pytest.mark.parametrize("layout,table", [("released", RELEASED_ROWS), ("paper", PAPER_ROWS)])
def test_temporal_write_back_hand_computed(layout, table):
    torch.manual_seed(0)
    attn = TemporalAttention(dim=32, heads=2, head_dim=8)
    x = torch.randn(12, 32)
    t = 3
    ft = torch.arange(t).float()[:, None] / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    ft = torch.cat([ft, ft], -1)
    got = attn(x, t, ft.cos(), ft.sin(), layout)
    o = naive_patch_attention(attn, x, t)
    for r, (n, s) in enumerate(table):
        assert torch.allclose(got[r], attn.proj(o[n, s]), atol=1e-5), (layout, r)
    other = attn(x, t, ft.cos(), ft.sin(), "paper" if layout == "released" else "released")
    differs = [r for r in range(12) if not torch.allclose(got[r], other[r], atol=1e-4)]
    assert differs == [r for r in range(12) if r not in SAME_ROWS]


def test_layouts_agree_for_one_temporal_patch():
    torch.manual_seed(1)
    attn = TemporalAttention(dim=32, heads=2, head_dim=8)
    x = torch.randn(4, 32)
    one = (torch.ones(1, 8), torch.zeros(1, 8))
    released, paper = attn(x, 1, *one, "released"), attn(x, 1, *one, "paper")
    assert torch.equal(released, paper)
    # softmax over one key is 1, RoPE at 0 is the identity: the branch is proj(v) for every token
    v = attn.qkv(x)[:, 32:]  # [q (2 heads x 8) | k | v]
    assert torch.allclose(released, attn.proj(v), atol=1e-6)


def test_whole_model_layouts(demo_dir):
    """Through the tower: images (T' = 1) agree across layouts, videos with T' > 1 do not."""
    ref = StaveReference.from_pretrained(demo_dir)
    ipix, igrid = ref.preprocess(rng_frames(5, 1, 56, 56)[0], video=False)
    assert torch.equal(ref.vision_embeddings(ipix, [igrid], "released"), ref.vision_embeddings(ipix, [igrid], "paper"))
    vpix, vgrid = ref.preprocess(rng_frames(6, 4, 56, 56))
    diff = (ref.vision_embeddings(vpix, [vgrid], "released") - ref.vision_embeddings(vpix, [vgrid], "paper")).abs()
    assert diff.max() > 1e-3


def test_items_do_not_mix(demo_dir):
    """Two videos in one call give each one's embeddings alone: time never runs across items."""
    ref = StaveReference.from_pretrained(demo_dir)
    a, b = ref.preprocess(rng_frames(7, 4, 56, 56)), ref.preprocess(rng_frames(8, 6, 56, 56))
    both = ref.vision_embeddings(torch.cat([a[0], b[0]]), [a[1], b[1]])
    alone = torch.cat([ref.vision_embeddings(*a[:1], [a[1]]), ref.vision_embeddings(b[0], [b[1]])])
    assert (both - alone).abs().max() <= 1e-5


# ---- the mechanism: one perturbed patch ----------------------------------------------------------

def _perturbed_pair(pix: torch.Tensor, row: int) -> torch.Tensor:
    bumped = pix.clone()
    bumped[row] += 1.0
    return bumped


def _changed_tokens(a: torch.Tensor, b: torch.Tensor) -> set[int]:
    diff = (a - b).abs().amax(-1)
    assert ((diff > 1e-4) | (diff < 1e-6)).all(), "a change neither clearly there nor clearly absent"
    return {int(i) for i in torch.nonzero(diff > 1e-4)}


T, H, W = 4, 4, 4  # temporal patches and patch grid per step; N = 16 rows, 4 merged tokens per step
N, PER_STEP = H * W, H * W // 4


def test_perturbing_one_patch_reaches_every_step_only_with_stave(demo_dir):
    ref = StaveReference.from_pretrained(demo_dir)
    hf, _ = stock_qwen2vl(demo_dir)
    pix, grid = ref.preprocess(rng_frames(10, 2 * T, 14 * H, 14 * W))
    assert grid == (T, H, W)
    t0, n0 = 1, 6
    bumped = _perturbed_pair(pix, t0 * N + n0)
    with torch.no_grad():
        stock = [hf.model.visual(p, grid_thw=torch.tensor([grid])).pooler_output for p in (pix, bumped)]
    stave = [ref.vision_embeddings(p, [grid]) for p in (pix, bumped)]
    stock_steps = {i // PER_STEP for i in _changed_tokens(*stock)}
    stave_steps = {i // PER_STEP for i in _changed_tokens(*stave)}
    assert stock_steps == {t0}
    assert stave_steps == set(range(T))


@pytest.mark.parametrize("layout", ["paper", "released"])
def test_one_block_perturbation_lands_where_the_layout_says(demo_dir, layout):
    """One block, spatial attention output zeroed (so it cannot spread the bump within its step):
    the only cross-row path is the temporal sub-layer. ``paper``: at other steps only the merged
    token holding patch n0 changes. ``released``: exactly the rows the authors' write-back sends
    patch n0's trajectory to (rows n0*T' .. n0*T'+T'-1), plus the bumped row itself."""
    from framewise.model_plugins.configs import StaveQwen2VLConfig

    cfg = StaveQwen2VLConfig.from_pretrained(demo_dir, temporal_output_layout=layout)
    cfg.vision_config.depth = 1
    ref = StaveReference(cfg).eval()
    init_random_(ref, 3)
    with torch.no_grad():
        ref.model.visual.blocks[0].attn.proj.weight.zero_()
    pix, grid = ref.preprocess(rng_frames(11, 2 * T, 14 * H, 14 * W))
    t0, n0 = 2, 2  # released: patch 2's trajectory lands in rows 8..11, inside step 0
    bumped = _perturbed_pair(pix, t0 * N + n0)
    changed = _changed_tokens(ref.vision_embeddings(pix, [grid]), ref.vision_embeddings(bumped, [grid]))
    paper_rows = {t * N + n0 for t in range(T)}
    released_rows = {t0 * N + n0} | {n0 * T + s for s in range(T)}
    rows = paper_rows if layout == "paper" else released_rows
    assert changed == {r // 4 for r in rows}
    # and the stock tower (temporal proj zero) changes only the bumped row's merged token
    with torch.no_grad():
        ref.model.visual.blocks[0].temp_attn.proj.weight.zero_()
        ref.model.visual.blocks[0].temp_attn.proj.bias.zero_()
    assert _changed_tokens(ref.vision_embeddings(pix, [grid]), ref.vision_embeddings(bumped, [grid])) == {
        (t0 * N + n0) // 4}


# ---- loading checks --------------------------------------------------------------------------------

def _rewrite(src: str, dst, edit) -> str:
    """``src`` with its single weight file's state dict edited in place by ``edit``."""
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f != "model.safetensors":
            os.link(os.path.join(src, f), os.path.join(dst, f))
    state = load_file(os.path.join(src, "model.safetensors"))
    edit(state)
    save_file(state, os.path.join(dst, "model.safetensors"))
    return str(dst)


def test_missing_or_misshaped_temporal_weight_names_the_key(demo_dir, tmp_path):
    key = "visual.blocks.1.temp_attn.proj.weight"
    missing = _rewrite(demo_dir, tmp_path / "missing", lambda s: s.pop(key))
    with pytest.raises(ValueError, match=f"lacks temporal weight {key.replace('.', '[.]')}"):
        StaveReference.from_pretrained(missing)
    bad = "visual.blocks.0.temp_attn.qkv.weight"
    misshaped = _rewrite(demo_dir, tmp_path / "misshaped",
                         lambda s: s.__setitem__(bad, s[bad][:160]))
    with pytest.raises(ValueError, match=rf"{bad.replace('.', '[.]')} has shape \(160, 160\), expected \(240, 160\)"):
        StaveReference.from_pretrained(misshaped)


def _nested(state: dict) -> None:
    """Rename to the nested layout (``model.visual.*``, ``model.language_model.*``)."""
    for k in list(state):
        new = "model." + k if k.startswith("visual.") else (
            "model.language_model." + k[len("model."):] if k.startswith("model.") else k)
        state[new] = state.pop(k)


def test_nested_key_layout_loads(demo_dir, tmp_path):
    """A checkpoint with transformers 5's in-memory names (``model.visual.blocks.{i}.temp_attn...``,
    ``model.language_model.layers...``) gives the same model."""
    nested = _rewrite(demo_dir, tmp_path / "nested", _nested)
    with safe_open(os.path.join(nested, "model.safetensors"), "pt") as f:
        keys = set(f.keys())  # noqa: SIM118
    assert "model.visual.blocks.0.temp_attn.qkv.weight" in keys and "model.language_model.norm.weight" in keys
    a, b = StaveReference.from_pretrained(demo_dir), StaveReference.from_pretrained(nested)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


# ---- converter: stock Qwen2-VL -> STAVE ------------------------------------------------------------

def _stock_checkpoint(base_dir: str, out, *, nested_sharded: bool):
    """A stock Qwen2-VL checkpoint (no temporal weights) as transformers saves it (one file,
    ``visual.*``/``model.*``), or renamed to the nested layout and split into two shards with an
    index."""
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    raw = json.loads(Path(base_dir, "config.json").read_text())
    cfg = Qwen2VLConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures", *STAVE_KEYS)})
    cfg.architectures = ["Qwen2VLForConditionalGeneration"]
    torch.manual_seed(5)
    model = Qwen2VLForConditionalGeneration(cfg)
    init_random_(model, 5)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    for f in ("preprocessor_config.json", "generation_config.json"):
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
        os.link(os.path.join(base_dir, f), os.path.join(out, f))
    if nested_sharded:
        state = load_file(os.path.join(out, "model.safetensors"))
        os.remove(os.path.join(out, "model.safetensors"))
        _nested(state)
        names = sorted(state)
        shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for fname, keys in shards.items():
            save_file({k: state[k] for k in keys}, os.path.join(out, fname), metadata={"format": "pt"})
        Path(out, "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    return out


@pytest.mark.parametrize("nested_sharded", [False, True], ids=["as-transformers-saves", "nested-sharded"])
def test_converter_output_equals_stock(demo_dir, tmp_path, nested_sharded):
    from transformers import AutoTokenizer

    src = _stock_checkpoint(demo_dir, tmp_path / "stock", nested_sharded=nested_sharded)
    before = {f: os.path.getmtime(src / f) for f in os.listdir(src)}
    out = tmp_path / "stave"
    res = cli("convert-qwen2vl", "--src", str(src), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert {f: os.path.getmtime(src / f) for f in os.listdir(src)} == before  # source untouched

    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "stave_qwen2_vl" and raw["architectures"] == ["StaveQwen2VLForConditionalGeneration"]
    assert (raw["temporal_output_layout"], raw["temporal_heads_scale"]) == ("released", 0.25)
    for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes(), f
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    prefix = "model.visual." if nested_sharded else "visual."
    temporal = {k: load_file(out / index[k])[k] for k in index if ".temp_attn." in k or ".norm3." in k}
    assert len(temporal) == 12 and all(k.startswith(prefix) for k in temporal)
    assert all(temporal[f"{prefix}blocks.{i}.temp_attn.proj.{p}"].abs().max() == 0 for i in range(2)
               for p in ("weight", "bias"))
    assert all(torch.equal(temporal[f"{prefix}blocks.{i}.norm3.weight"], torch.ones(160)) for i in range(2))
    assert temporal[f"{prefix}blocks.0.temp_attn.qkv.weight"].std() > 0.01

    ref = StaveReference.from_pretrained(str(out))
    hf, _ = stock_qwen2vl(src)
    tok = AutoTokenizer.from_pretrained(out)
    video, image = rng_frames(12, 7, 56, 84), rng_frames(13, 1, 84, 56)[0]  # 7 frames: odd, T' = 4
    ids = _video_image_prompt(tok)
    prompt = ref.prepare(ids, videos=[video], images=[image])
    # T' = 4 > max(h', w') = 3: transformers 5's get_rope_index differs from vLLM here, so
    # both models get the reference's (vLLM / transformers 4.46) positions for the logits
    ours = ref.logits(prompt.embeds, prompt.positions)
    with torch.no_grad():
        vpix, vgrid = ref.preprocess(video)
        ipix, igrid = ref.preprocess(image, video=False)
        theirs_vis = hf.model.visual(torch.cat([vpix, ipix]), grid_thw=torch.tensor([vgrid, igrid])).pooler_output
        off_v, n_v = prompt.vision_spans[0]
        emb = hf.model.language_model.embed_tokens(torch.tensor([prompt.input_ids]))
        emb[0, off_v:off_v + n_v] = theirs_vis[:n_v]
        off_i, n_i = prompt.vision_spans[1]
        emb[0, off_i:off_i + n_i] = theirs_vis[n_v:]
        theirs = hf(inputs_embeds=emb, position_ids=prompt.positions[:, None]).logits[0]
    assert (ref.vision_embeddings(torch.cat([vpix, ipix]), [vgrid, igrid]) - theirs_vis).abs().max() <= 1e-4
    assert (ours - theirs).abs().max() <= 1e-4


def test_converter_keeps_trained_temporal_weights_and_rejects_partial(demo_dir, tmp_path):
    """An authors'-style checkpoint (``qwen2_vl`` config, temporal weights present) keeps its own
    weights; one with only some temporal weights fails naming the missing key."""
    src = _rewrite(demo_dir, tmp_path / "authors", lambda s: None)
    raw = json.loads(Path(src, "config.json").read_text())
    raw.update(model_type="qwen2_vl", architectures=["CustomQwen2VLForConditionalGeneration"])
    for k in STAVE_KEYS:
        raw.pop(k, None)
    os.remove(os.path.join(src, "config.json"))
    Path(src, "config.json").write_text(json.dumps(raw))
    out = qwen2vl_to_stave(src, tmp_path / "out")
    a = StaveReference.from_pretrained(demo_dir)
    b = StaveReference.from_pretrained(str(out))
    assert all(torch.equal(va, vb) for va, vb in zip(a.state_dict().values(), b.state_dict().values(), strict=True))

    key = "visual.blocks.1.norm3.bias"
    partial = _rewrite(src, tmp_path / "partial", lambda s: s.pop(key))
    with pytest.raises(ValueError, match=f"lacks {key.replace('.', '[.]')}"):
        qwen2vl_to_stave(partial, tmp_path / "out2")
