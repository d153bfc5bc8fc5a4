"""The demo checkpoint's layout and the reference model's mechanisms (no vLLM engine)."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from framewise.model_plugins.configs import TCLlavaConfig
from framewise.model_plugins.preprocess import (
    InvalidMediaError,
    as_frames,
    clip_preprocess,
    load_image_processor_config,
)
from framewise.model_plugins.reference.tc_llava import TCLlavaReference
from tests.conftest import random_video, variant_checkpoint

PROMPT = "USER: <video>\nWhat happens in this video? ASSISTANT:"


def test_checkpoint_layout(tc_llava_dir, tokenizer):
    files = {p.name for p in tc_llava_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json"} <= files
    cfg = json.loads((tc_llava_dir / "config.json").read_text())
    assert cfg["architectures"] == ["TCLlavaForConditionalGeneration"]
    assert cfg["model_type"] == "tc_llava"
    assert cfg["vision_config"]["model_type"] == "clip_vision_model"
    assert cfg["text_config"]["model_type"] == "llama"
    for key in ("image_token_index", "video_token_index", "temporal_rope_gamma", "frame_block_mask",
                "is_mm_prefix_lm"):
        assert key in cfg
    # head_dim 64 for vLLM's CPU attention; 56 px / patch 14 -> 16 tokens per frame
    assert cfg["text_config"]["head_dim"] == 64
    assert TCLlavaConfig.from_pretrained(tc_llava_dir).tokens_per_frame == 16

    with safe_open(tc_llava_dir / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    prefixes = ("vision_tower.vision_model.", "multi_modal_projector.linear_1.", "multi_modal_projector.linear_2.",
                "language_model.model.", "language_model.lm_head.")
    assert all(k.startswith(prefixes) for k in keys), [k for k in keys if not k.startswith(prefixes)]
    for p in prefixes:
        assert any(k.startswith(p) for k in keys), p

    assert tokenizer.convert_tokens_to_ids("<video>") == cfg["video_token_index"]
    assert tokenizer.convert_tokens_to_ids("<image>") == cfg["image_token_index"]
    ids = tokenizer("a <video> b <image>").input_ids
    assert ids.count(cfg["video_token_index"]) == 1 and ids.count(cfg["image_token_index"]) == 1
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
        add_generation_prompt=True, tokenize=False)
    assert chat == "USER: <video>\nWhat happens? ASSISTANT:"

    pre = json.loads((tc_llava_dir / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "CLIPImageProcessor"
    assert pre["crop_size"] == {"height": 56, "width": 56} and pre["size"] == {"shortest_edge": 56}


def test_transformers_llava_loads_checkpoint_unchanged(tc_llava_dir):
    """The published llava-hf key names: transformers' LLaVA loads every weight."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig.from_dict({k: v for k, v in json.loads((tc_llava_dir / "config.json").read_text()).items()
                                 if k not in ("model_type", "architectures")})
    model, info = LlavaForConditionalGeneration.from_pretrained(tc_llava_dir, config=cfg, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def _llava_hf_logits(model_dir, reference, ids_with_placeholders, frames):
    """transformers' LlavaForConditionalGeneration forward, every frame as an image."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    raw = json.loads((model_dir / "config.json").read_text())
    cfg = LlavaConfig.from_dict({k: v for k, v in raw.items() if k not in ("model_type", "architectures")})
    hf = LlavaForConditionalGeneration.from_pretrained(model_dir, config=cfg).eval()
    pixels = clip_preprocess(torch.from_numpy(frames), reference.image_processor)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([ids_with_placeholders]), pixel_values=pixels)
    return out.logits[0].float()


def test_gamma_zero_mask_off_is_transformers_llava(plain_llava_dir, tokenizer):
    plain = TCLlavaReference.from_pretrained(str(plain_llava_dir))
    assert plain.config.temporal_rope_gamma == 0 and not plain.config.frame_block_mask
    video = random_video(4, seed=1)
    prep = plain.prepare(tokenizer(PROMPT).input_ids, videos=[video])
    ours = plain.logits(prep.embeds, prep.spans)
    # LLaVA sees the frames as 4 images: the same tokens with the image id
    vid, img = plain.config.video_token_index, plain.config.image_token_index
    ids = [img if t == vid else t for t in prep.input_ids]
    theirs = _llava_hf_logits(plain_llava_dir, plain, ids, video)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_later_frame_never_changes_earlier_positions(reference, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    video = random_video(4, seed=2)
    changed = video.copy()
    changed[2] = 255 - changed[2]  # frame 2 of 0..3
    a = reference.prepare(ids, videos=[video])
    b = reference.prepare(ids, videos=[changed])
    la, lb = reference.logits(a.embeds, a.spans), reference.logits(b.embeds, b.spans)
    first_changed = a.spans[0].frame_ranges()[2][0]
    assert torch.equal(la[:first_changed], lb[:first_changed])
    assert (la[first_changed:] - lb[first_changed:]).abs().amax(-1).min() > 1e-4


def test_frame_mask_changes_outputs_from_the_first_visual_token(tc_llava_dir, tokenizer, tmp_path):
    on = TCLlavaReference.from_pretrained(str(tc_llava_dir))
    off = TCLlavaReference.from_pretrained(str(variant_checkpoint(tc_llava_dir, tmp_path / "off",
                                                                  frame_block_mask=False)))
    prep = on.prepare(tokenizer(PROMPT).input_ids, videos=[random_video(3, seed=3)])
    la, lb = on.logits(prep.embeds, prep.spans), off.logits(prep.embeds, prep.spans)
    span = prep.spans[0]
    diff = (la - lb).abs().amax(-1)
    assert torch.equal(la[: span.start], lb[: span.start])  # text before the video: causal either way
    # from the first visual token on, hidden states see more of their frame (directly in layer 1,
    # through the changed keys of earlier layers after that)
    assert diff[span.start :].min() > 1e-3


def test_frame_pooling_averages_2x2(tc_llava_dir, tmp_path):
    pooled = TCLlavaReference.from_pretrained(str(variant_checkpoint(tc_llava_dir, tmp_path / "pool",
                                                                     frame_pooling=2)))
    full = TCLlavaReference.from_pretrained(str(tc_llava_dir))
    assert pooled.config.tokens_per_frame == 4
    frames = torch.from_numpy(random_video(2, seed=4))
    emb_p = pooled.encode_frames(frames).view(2, 4, -1)
    emb_f = full.encode_frames(frames).view(2, 4, 4, -1)  # (T, row, col, D)
    expected = emb_f.view(2, 2, 2, 2, 2, -1).mean(dim=(2, 4)).reshape(2, 4, -1)
    assert torch.allclose(emb_p, expected, atol=1e-5)


@pytest.mark.parametrize(
    "media, message",
    [
        (np.zeros((0, 56, 56, 3), np.uint8), "zero frames"),
        (np.zeros((2, 56, 56, 3), np.float32), "uint8"),
        (np.zeros((2, 56, 56), np.uint8), r"shape \(T, H, W, 3\)"),
        (np.zeros((2, 56, 56, 4), np.uint8), "RGB"),
        ([], "zero frames"),
        ("not a video", "must be uint8 frames"),
    ],
)
def test_bad_frames_are_rejected_with_clear_errors(media, message):
    with pytest.raises(InvalidMediaError, match=message):
        as_frames(media)


def test_preprocess_follows_clip_semantics(tc_llava_dir):
    cfg = load_image_processor_config(str(tc_llava_dir), 56)
    frame = torch.full((1, 80, 112, 3), 128, dtype=torch.uint8)
    frame[0, :, :56] = 0
    x = clip_preprocess(frame, cfg)
    assert x.shape == (1, 3, 56, 56)  # shortest edge 80 -> 56, then center crop 56
    mean, std = torch.tensor(cfg.image_mean), torch.tensor(cfg.image_std)
    assert torch.allclose(x[0, :, 28, 40], (128 / 255 - mean) / std, atol=1e-5)
    assert torch.allclose(x[0, :, 28, 0], (0 - mean) / std, atol=1e-5)
