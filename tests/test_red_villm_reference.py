"""RED-VILLM's plain-PyTorch reference, demo checkpoint, Qwen-1 mapping and preprocessing (no engine).

The video path is checked against hand-pooled features (mean over patches -> temporal, mean over
frames -> spatial, padding before the temporal module, both orders, both spatial paths, both
temporal modules), the image path against the T = 1 video path, the Qwen-1 decoder against
transformers' Qwen2 through ``qwen1_to_qwen2``, and the ViT's interleaved ``in_proj`` reading
against a per-head hand computation and the naive contiguous split.
"""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from framewise.model_plugins.configs.red_villm import RedVillmConfig
from framewise.model_plugins.preprocess import CLIP_MEAN, CLIP_STD, qwen_vl_preprocess
from framewise.model_plugins.qwen1 import is_visual, qwen1_state_to_qwen2, qwen1_to_qwen2
from framewise.model_plugins.reference.demo_checkpoint import (
    build_qwen_vl_tokenizer,
    init_random_,
    red_villm_config,
    write_demo_checkpoint,
)
from framewise.model_plugins.reference.red_villm import RedVillmReference, VisualAttention, sincos_2d


def rng_frames(seed: int, t: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return write_demo_checkpoint("red-villm", str(tmp_path_factory.mktemp("red_villm") / "demo"))


@pytest.fixture(scope="module")
def demo(demo_dir):
    return RedVillmReference.from_pretrained(demo_dir)


@pytest.fixture(scope="module")
def tokenizer():
    return build_qwen_vl_tokenizer()


def small_model(tokenizer, seed: int = 0, **overrides) -> RedVillmReference:
    """In memory, 28 px frames (a 2x2 patch grid) so that 100-frame videos stay cheap."""
    cfg = red_villm_config(tokenizer, visual={"image_size": 28, **overrides.pop("visual", {})}, **overrides)
    torch.manual_seed(seed)
    model = RedVillmReference(cfg)
    init_random_(model, seed)
    return model.eval()


# ---- the video path, by hand ----------------------------------------------------------------------

def hand_token_module(module: torch.nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "linear":
        return x @ module.weight.T + module.bias
    h = x @ module[0].weight.T + module[0].bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    return h @ module[2].weight.T + module[2].bias


@pytest.mark.parametrize("spatial_path", ["adapter", "tokenwise"])
@pytest.mark.parametrize("temporal_module", ["linear", "mlp2"])
@pytest.mark.parametrize("token_order", ["temporal_first", "spatial_first"])
def test_pooling_padding_and_order_hand_checked(tokenizer, spatial_path, temporal_module, token_order):
    ref = small_model(tokenizer, spatial_path=spatial_path, temporal_module=temporal_module,
                      token_order=token_order, pad_temporal_to=5, num_frames=3)
    vis, cfg = ref.visual, ref.config
    t_, n_, w_ = 3, 4, 64  # T != N, so a swapped pooling cannot pass
    feats = torch.randn(t_, n_, w_, generator=torch.Generator().manual_seed(1))
    temporal = torch.stack([sum(feats[f, n] for n in range(n_)) / n_ for f in range(t_)])  # mean over patches
    spatial = torch.stack([sum(feats[f, n] for f in range(t_)) / t_ for n in range(n_)])  # mean over frames
    padded = torch.cat([temporal, torch.zeros(2, w_)])  # zero rows BEFORE the temporal module
    with torch.no_grad():
        qt = hand_token_module(vis.temporal_module, padded, temporal_module)
        qz = (vis.adapter(spatial[None])[0] if spatial_path == "adapter"
              else hand_token_module(vis.spatial_module, spatial, temporal_module))
        out = vis.video_from_features(feats)
    n_spatial = 256 if spatial_path == "adapter" else n_
    assert out.shape == (cfg.video_tokens(t_), 128) == (5 + n_spatial, 128)
    got_t, got_z = (out[:5], out[5:]) if token_order == "temporal_first" else (out[n_spatial:], out[:n_spatial])
    torch.testing.assert_close(got_t, qt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_z, qz, atol=1e-5, rtol=1e-5)
    # padded rows are the module applied to zeros (not zero rows: padding happens before the module)
    zero_row = hand_token_module(vis.temporal_module, torch.zeros(1, w_), temporal_module)
    assert zero_row.abs().max() > 1e-3
    torch.testing.assert_close(got_t[3:], zero_row.expand(2, -1), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got_t[:3], zero_row.expand(3, -1), atol=1e-3)


def test_no_padding_keeps_t_temporal_tokens(tokenizer):
    ref = small_model(tokenizer, pad_temporal_to=None, max_frames=8, num_frames=8)
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    assert ref.video_embeds(pixels).shape[0] == ref.config.video_tokens(3) == 3 + 256


def test_penultimate_layer_is_one_block_fewer(tokenizer):
    last = small_model(tokenizer, visual={"layers": 3})
    pen = small_model(tokenizer, visual={"layers": 3}, vision_layer="penultimate")
    pen.load_state_dict(last.state_dict())
    two = small_model(tokenizer, visual={"layers": 2})  # the same weights without the last block
    two.load_state_dict({k: v for k, v in last.state_dict().items() if ".resblocks.2." not in k})
    pixels = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    v_last, v_pen, v_two = last.video_embeds(pixels), pen.video_embeds(pixels), two.video_embeds(pixels)
    assert (v_last - v_pen).abs().max() > 1e-3
    assert torch.equal(v_pen, v_two)
    # images always take Qwen-VL's own (last-layer) path
    assert torch.equal(pen.image_embeds(pixels[:1]), last.image_embeds(pixels[:1]))
    assert not torch.allclose(pen.image_embeds(pixels[:1]), two.image_embeds(pixels[:1]), atol=1e-3)


@pytest.mark.parametrize("token_order", ["temporal_first", "spatial_first"])
def test_one_frame_spatial_tokens_are_the_image_embedding(demo_dir, token_order):
    ref = RedVillmReference.from_pretrained(demo_dir, token_order=token_order)
    pixels = ref.preprocess(rng_frames(4, 1, 240, 320))
    assert pixels.shape == (1, 3, 448, 448)
    video, image = ref.video_embeds(pixels), ref.image_embeds(pixels)
    assert video.shape == (356, 128) and image.shape == (256, 128)
    spatial = video[100:] if token_order == "temporal_first" else video[:256]
    assert torch.equal(spatial, image)
    pen = RedVillmReference.from_pretrained(demo_dir, token_order=token_order, vision_layer="penultimate")
    p_spatial = pen.video_embeds(pixels)
    p_spatial = p_spatial[100:] if token_order == "temporal_first" else p_spatial[:256]
    assert not torch.allclose(p_spatial, image, atol=1e-3)


def test_video_token_counts_and_frame_limit(tokenizer):
    ref = small_model(tokenizer)
    assert ref.config.max_frames == 100
    g = torch.Generator().manual_seed(5)
    for t in (1, 4, 16, 100):
        out = ref.video_embeds(torch.randn(t, 3, 28, 28, generator=g))
        assert out.shape == (ref.config.video_tokens(t), 128) == (356, 128)
    with pytest.raises(ValueError, match="101 frames, more than max_frames=100"):
        ref.video_embeds(torch.randn(101, 3, 28, 28))
    limited = small_model(tokenizer, max_frames=8, num_frames=8)
    with pytest.raises(ValueError, match="max_frames=8"):
        limited.video_embeds(torch.randn(9, 3, 28, 28))
    tokenwise = small_model(tokenizer, spatial_path="tokenwise")
    assert tokenwise.video_embeds(torch.randn(4, 3, 28, 28)).shape[0] == tokenwise.config.video_tokens(4) == 104


# ---- Qwen-VL's ViT attention layout ----------------------------------------------------------------

def test_interleaved_in_proj_per_head_and_not_contiguous(demo):
    attn: VisualAttention = demo.visual.transformer.resblocks[0].attn
    heads, hd = attn.heads, attn.head_dim
    x = torch.randn(10, 2, heads * hd, generator=torch.Generator().manual_seed(6))  # (L, B, W)
    with torch.no_grad():
        got = attn(x)
        w, b = attn.in_proj.weight, attn.in_proj.bias
        outs = []
        for h in range(heads):  # head h owns rows [h*3hd, (h+1)*3hd) = q_h | k_h | v_h
            rows = [slice(h * 3 * hd + i * hd, h * 3 * hd + (i + 1) * hd) for i in range(3)]
            q, k, v = (x @ w[r].T + b[r] for r in rows)  # (L, B, hd)
            att = torch.softmax(torch.einsum("lbd,mbd->blm", q, k) / math.sqrt(hd), dim=-1)
            outs.append(torch.einsum("blm,mbd->lbd", att, v))
        hand = attn.out_proj(torch.cat(outs, dim=-1))
        torch.testing.assert_close(got, hand, atol=1e-5, rtol=1e-5)
        # the naive reading (q | k | v blocks, as nn.MultiheadAttention stores them) is a different model
        mha = torch.nn.MultiheadAttention(heads * hd, heads)
        mha.in_proj_weight.copy_(w)
        mha.in_proj_bias.copy_(b)
        mha.out_proj.load_state_dict(attn.out_proj.state_dict())
        naive = mha(x, x, x, need_weights=False)[0]
        assert (naive - got).abs().max() > 1e-2
        # ... and de-interleaving the rows to q | k | v blocks makes it the same model
        order = torch.arange(3 * heads * hd).view(heads, 3, hd).transpose(0, 1).reshape(-1)
        mha.in_proj_weight.copy_(w[order])
        mha.in_proj_bias.copy_(b[order])
        torch.testing.assert_close(mha(x, x, x, need_weights=False)[0], got, atol=1e-5, rtol=1e-5)


# ---- Qwen-1 LLM vs transformers' Qwen2 ----------------------------------------------------------------

def test_qwen1_mapping_into_transformers_qwen2_gives_the_same_logits(demo_dir, demo):
    from transformers import Qwen2ForCausalLM

    state = load_file(os.path.join(demo_dir, "model.safetensors"))
    qwen2_state = qwen1_state_to_qwen2(state)
    cfg = copy.deepcopy(demo.config.text_config)
    cfg._attn_implementation = "eager"
    hf = Qwen2ForCausalLM(cfg).eval()
    hf.load_state_dict(qwen2_state, strict=True)
    ids = torch.randint(0, demo.config.vocab_size, (48,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = hf(input_ids=ids[None]).logits[0]
    got = demo.logits(demo.transformer.wte(ids))
    assert (got - want).abs().max() <= 1e-5
    # swapping gate and up (w2 <-> w1) breaks parity: the mapping's MLP reading matters
    swapped = {k.replace("gate_proj", "TMP").replace("up_proj", "gate_proj").replace("TMP", "up_proj"): v
               for k, v in qwen2_state.items()}
    hf.load_state_dict(swapped, strict=True)
    with torch.no_grad():
        assert (hf(input_ids=ids[None]).logits[0] - got).abs().max() > 1e-2


def test_qwen1_mapping_names_and_errors():
    t = torch.arange(12.0).view(6, 2)
    out = dict(qwen1_to_qwen2("transformer.h.3.attn.c_attn.weight", t))
    assert list(out) == [f"model.layers.3.self_attn.{p}_proj.weight" for p in "qkv"]
    assert torch.equal(out["model.layers.3.self_attn.k_proj.weight"], t[2:4])
    assert qwen1_to_qwen2("transformer.h.0.mlp.w2.weight", t)[0][0] == "model.layers.0.mlp.gate_proj.weight"
    assert qwen1_to_qwen2("transformer.h.0.mlp.w1.weight", t)[0][0] == "model.layers.0.mlp.up_proj.weight"
    assert qwen1_to_qwen2("transformer.rotary_emb.inv_freq", t[:, 0]) == []
    for bad in ("transformer.h.0.attn.c_proj.bias", "transformer.h.0.mlp.w3.weight", "model.norm.weight"):
        with pytest.raises(KeyError, match=bad.replace(".", r"\.")):
            qwen1_to_qwen2(bad, t)
    assert is_visual("transformer.visual.conv1.weight") and not is_visual("transformer.wte.weight")
    with pytest.raises(KeyError, match="is_visual"):
        qwen1_to_qwen2("transformer.visual.conv1.weight", t)


# ---- preprocessing and the demo checkpoint ---------------------------------------------------------

def test_qwen_vl_preprocess_is_pil_bicubic_and_clip_normalised():
    frames = rng_frames(8, 2, 37, 53)
    got = qwen_vl_preprocess(frames, 56)
    assert got.shape == (2, 3, 56, 56) and got.dtype == torch.float32
    for i in range(2):
        img = np.asarray(Image.fromarray(frames[i]).resize((56, 56), Image.BICUBIC)).astype(np.float32) / 255.0
        hand = (img - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
        np.testing.assert_allclose(got[i].permute(1, 2, 0).numpy(), hand, atol=1e-6, rtol=0)
    # no aspect-keeping, no crop: a plain bilinear/antialiased torch resize would differ
    torch_resized = F.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(56, 56),
                                  mode="bilinear", align_corners=False)
    assert not torch.allclose(got, ((torch_resized / 255 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
                                    / torch.tensor(CLIP_STD).view(1, 3, 1, 1)), atol=1e-2)
    pil = [Image.fromarray(f) for f in frames]
    assert torch.equal(qwen_vl_preprocess(pil, 56), got)
    assert torch.equal(qwen_vl_preprocess(frames[0], 56), got[:1])


def test_demo_checkpoint_round_trip(demo_dir, demo, tokenizer):
    cfg = RedVillmConfig.from_pretrained(demo_dir)
    assert cfg.model_type == "red_villm" and cfg.architectures == ["RedVillmForConditionalGeneration"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir)
    img, end, pad = (tok.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<imgpad>"))
    assert (cfg.image_start_id, cfg.image_end_id, cfg.image_pad_id) == (img, end, pad) == (img, img + 1, img + 2)
    assert tok.eos_token == "<|im_end|>"
    state = load_file(os.path.join(demo_dir, "model.safetensors"))
    assert set(state) == set(demo.state_dict())
    h, w, d = cfg.hidden_size, cfg.visual["width"], cfg.visual["output_dim"]
    shapes = {
        "transformer.h.0.attn.c_attn.weight": (3 * h, h), "transformer.h.0.attn.c_attn.bias": (3 * h,),
        "transformer.h.1.mlp.w1.weight": (256, h), "transformer.visual.conv1.weight": (w, 3, 14, 14),
        "transformer.visual.positional_embedding": (256, w),
        "transformer.visual.transformer.resblocks.1.attn.in_proj.weight": (3 * w, w),
        "transformer.visual.attn_pool.kv_proj.weight": (d, w), "transformer.visual.attn_pool.attn.in_proj_weight":
        (3 * d, d), "transformer.visual.attn_pool.pos_embed": (256, d), "transformer.visual.proj": (d, d),
        "transformer.visual.temporal_module.weight": (d, w), "lm_head.weight": (cfg.vocab_size, h),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("transformer.visual.spatial_module") for k in state)
    # the stored adapter positions are MAE's 2-D sin-cos table: (row i, col j) -> [w-half | h-half]
    pos = state["transformer.visual.attn_pool.pos_embed"]
    assert torch.equal(pos, sincos_2d(d, 16))
    i, j, c = 3, 5, 7
    omega = 1 / 10000 ** (c / (d // 4))
    assert math.isclose(float(pos[i * 16 + j, c]), math.sin(j * omega), abs_tol=1e-6)
    assert math.isclose(float(pos[i * 16 + j, d // 2 + d // 4 + c]), math.cos(i * omega), abs_tol=1e-6)
    # the chat template renders Qwen-VL's tags, and they survive tokenisation as single tokens
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Hi"}]}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert "Picture 1: <img></img>\nVideo 1: <img><imgpad></img>\nHi" in text
    ids = tok(text)["input_ids"]
    assert [i for i in ids if i in (img, end, pad)] == [img, end, img, pad, end]


def test_demo_checkpoint_options_and_missing_key(tmp_path):
    out = write_demo_checkpoint("red-villm", str(tmp_path / "opts"), spatial_path="tokenwise",
                                temporal_module="mlp2", pad_temporal_to=8, token_order="spatial_first",
                                vision_layer="penultimate", num_frames=4, max_frames=6, visual={"image_size": 56})
    cfg = RedVillmConfig.from_pretrained(out)
    assert (cfg.spatial_path, cfg.temporal_module, cfg.pad_temporal_to, cfg.token_order, cfg.vision_layer,
            cfg.num_frames, cfg.max_frames, cfg.visual["image_size"]) == (
        "tokenwise", "mlp2", 8, "spatial_first", "penultimate", 4, 6, 56)
    state = load_file(os.path.join(out, "model.safetensors"))
    extra = sorted(k for k in state if k.startswith(("transformer.visual.temporal_module",
                                                      "transformer.visual.spatial_module")))
    assert extra == [f"transformer.visual.{m}.{i}.{p}" for m in ("spatial_module", "temporal_module")
                     for i in (0, 2) for p in ("bias", "weight")]
    ref = RedVillmReference.from_pretrained(out)
    assert ref.video_embeds(torch.randn(5, 3, 56, 56)).shape == (cfg.video_tokens(5), 128) == (16 + 8, 128)
    del state["transformer.visual.temporal_module.2.weight"]
    save_file(state, os.path.join(out, "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['transformer\.visual\.temporal_module\.2\.weight'\]"):
        RedVillmReference.from_pretrained(out)


# ---- prompt expansion and decoding -------------------------------------------------------------------

def test_expand_prompt_places_embeddings_on_pads_only(demo):
    cfg = demo.config
    img, end, pad = cfg.image_start_id, cfg.image_end_id, cfg.image_pad_id
    video, image = rng_frames(9, 3, 64, 80), rng_frames(10, 1, 50, 50)
    ids = [1, 40, img, end, 41, img, pad, end, 42]
    p = demo.expand_prompt(ids, images=[image], videos=[video])
    assert p.input_ids == [1, 40, img] + [pad] * 256 + [end, 41, img] + [pad] * 356 + [end, 42]
    assert p.vision_spans == [(3, 256), (262, 356)]
    assert torch.equal(p.embeds[3:259], demo.image_embeds(demo.preprocess(image)))
    assert torch.equal(p.embeds[262:618], demo.video_embeds(demo.preprocess(video)))
    with torch.no_grad():
        text_pos = [i for i, t in enumerate(p.input_ids) if t != pad]
        assert torch.equal(p.embeds[text_pos], demo.transformer.wte(torch.tensor(p.input_ids)[text_pos]))
    for bad_ids, kw, msg in (([img, end], {}, "more image placeholders"),
                             ([img, pad, end], {"images": [image]}, "more video placeholders"),
                             ([40], {"videos": [video]}, "more media than placeholders"),
                             ([40, pad], {}, "outside"), ([img, 40], {}, "not followed")):
        with pytest.raises(ValueError, match=msg):
            demo.expand_prompt(bad_ids, **kw)
    lp = demo.prompt_logprobs(p)
    assert lp.shape == (len(p.input_ids), cfg.vocab_size)
    tokens, steps = demo.greedy(p, max_new_tokens=3)
    assert len(tokens) == 3 and torch.equal(steps[0], lp[-1]) and tokens[0] == int(lp[-1].argmax())
    # the visual tokens matter: another video changes the next-token distribution
    other = demo.expand_prompt(ids, images=[image], videos=[rng_frames(11, 3, 64, 80)])
    assert (demo.prompt_logprobs(other)[-1] - lp[-1]).abs().max() > 1e-3
