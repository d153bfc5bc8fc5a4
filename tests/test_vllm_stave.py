"""STAVE inside vLLM's engine (CPU, fp32) against the plain-PyTorch reference
(``model_plugins/reference/stave.py``) and transformers' Qwen2-VL.

Three real ``vllm.LLM`` engines on the demo checkpoint: the ``released`` layout with random
temporal weights (default compilation, as served), the ``paper`` layout (same weights) and zero
``temp_attn.proj`` (= Qwen2-VL), the last two eager to keep the module's start-up short.
Frame sizes are multiples of 28 (no resize) except where a case says otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from framewise.model_plugins.reference.stave import StaveReference
from tests.conftest import _engine, variant_checkpoint

pytestmark = pytest.mark.engine

TOL = 1e-4
GREEDY = dict(temperature=0.0, max_tokens=16, ignore_eos=True, prompt_logprobs=5, logprobs=5)


def frames(n: int, seed: int, h: int = 56, w: int = 84) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def request(tokenizer, text: str, parts: list[str], videos=(), images=()) -> dict:
    """A chat-template prompt whose user turn holds ``parts`` ("video"/"image") then ``text``."""
    content = [{"type": p} for p in parts] + [{"type": "text", "text": text}]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    mm = {}
    if videos:
        mm["video"] = list(videos)
    if images:
        mm["image"] = list(images)
    return {"prompt_token_ids": list(ids), "multi_modal_data": mm}


def scenarios(tokenizer) -> dict[str, dict]:
    ask = "What happens in this video?"
    out = {f"video_{n}_frames": request(tokenizer, ask, ["video"], videos=[frames(n, seed=10 + n)])
           for n in (2, 4, 7, 8)}
    # 16 frames of 62x90: resized (PIL bicubic, both sides) to 56x84
    out["video_16_frames_resized"] = request(tokenizer, ask, ["video"], videos=[frames(16, seed=26, h=62, w=90)])
    out["image"] = request(tokenizer, "What is in the picture?", ["image"], images=[frames(1, seed=20, h=84, w=112)[0]])
    out["two_videos"] = request(tokenizer, "What changed between the clips?", ["video", "video"],
                                videos=[frames(4, seed=21), frames(3, seed=22, h=56, w=56)])
    out["text_only"] = request(tokenizer, "Is it day or night?", [])
    return out


def prepare(reference: StaveReference, req: dict):
    mm = req["multi_modal_data"]
    return reference.prepare(req["prompt_token_ids"], videos=mm.get("video", []), images=mm.get("image", []))


def prompt_logprob_error(result: dict, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per position i >= 1: max |vLLM - reference| over the tokens vLLM returned (top-5 + actual)."""
    errs = [0.0]
    for i, entry in enumerate(result["prompt_logprobs"][1:], start=1):
        errs.append(max(abs(v - ref_logprobs[i - 1, t].item()) for t, v in entry.items()))
    return torch.tensor(errs)


def token_logprobs(result: dict) -> torch.Tensor:
    """log P of each actual prompt token (position 0: nan)."""
    ids = result["prompt_token_ids"]
    return torch.tensor([float("nan")] + [result["prompt_logprobs"][i][ids[i]] for i in range(1, len(ids))])


def assert_matches_reference(result: dict, reference: StaveReference, req: dict) -> None:
    prep = prepare(reference, req)
    assert result["prompt_token_ids"] == list(prep.input_ids)
    err = prompt_logprob_error(result, reference.prompt_logprobs(prep))
    assert err.max() <= TOL, f"prompt logprobs differ by {err.max():.3g} at position {int(err.argmax())}"
    tokens, steps = reference.greedy(prep, GREEDY["max_tokens"])
    assert result["token_ids"] == list(tokens)
    step_err = max(abs(v - steps[s][t].item()) for s, d in enumerate(result["logprobs"]) for t, v in d.items())
    assert step_err <= TOL, f"decode logprobs differ by {step_err:.3g}"


def visual_positions(result: dict, token_ids: set[int]) -> list[int]:
    return [i for i, t in enumerate(result["prompt_token_ids"]) if t in token_ids]


# ---- checkpoints, references and engines (one of each per module) -----------------------------


@pytest.fixture(scope="module")
def stave_dir(tmp_path_factory):
    from framewise.model_plugins.reference.demo_checkpoint import write_stave

    return write_stave(str(tmp_path_factory.mktemp("ckpt") / "stave"), seed=0)


@pytest.fixture(scope="module")
def paper_dir(stave_dir, tmp_path_factory):
    return str(variant_checkpoint(Path(stave_dir), tmp_path_factory.mktemp("ckpt") / "paper",
                                  temporal_output_layout="paper"))


@pytest.fixture(scope="module")
def zero_dir(tmp_path_factory):
    from framewise.model_plugins.reference.demo_checkpoint import write_stave

    return write_stave(str(tmp_path_factory.mktemp("ckpt") / "zero"), seed=0, zero_temporal_proj=True)


@pytest.fixture(scope="module")
def tokenizer(stave_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stave_dir)


@pytest.fixture(scope="module")
def config(stave_dir) -> dict:
    return json.loads(open(f"{stave_dir}/config.json").read())


@pytest.fixture(scope="module")
def released_ref(stave_dir):
    return StaveReference.from_pretrained(stave_dir)


@pytest.fixture(scope="module")
def paper_ref(paper_dir):
    return StaveReference.from_pretrained(paper_dir)


@pytest.fixture(scope="module")
def released_engine(stave_dir, tmp_path_factory):
    yield from _engine(Path(stave_dir), tmp_path_factory, "stave-released", enable_prefix_caching=False)


@pytest.fixture(scope="module")
def paper_engine(paper_dir, tmp_path_factory):
    yield from _engine(Path(paper_dir), tmp_path_factory, "stave-paper", enable_prefix_caching=False,
                       enforce_eager=True)


@pytest.fixture(scope="module")
def zero_engine(zero_dir, tmp_path_factory):
    yield from _engine(Path(zero_dir), tmp_path_factory, "stave-zero", enable_prefix_caching=False,
                       enforce_eager=True)


@pytest.fixture(scope="module")
def released_batch(released_engine, tokenizer):
    """Every scenario in ONE engine call (continuous batching, text-only request included)."""
    reqs = scenarios(tokenizer)
    return reqs, dict(zip(reqs, released_engine.generate(list(reqs.values()), GREEDY), strict=True))


@pytest.fixture(scope="module")
def paper_batch(paper_engine, tokenizer):
    reqs = scenarios(tokenizer)
    return reqs, dict(zip(reqs, paper_engine.generate(list(reqs.values()), GREEDY), strict=True))


# ---- vLLM == reference -----------------------------------------------------------------------

NAMES = ["video_2_frames", "video_4_frames", "video_7_frames", "video_8_frames", "video_16_frames_resized",
         "image", "two_videos", "text_only"]


@pytest.mark.parametrize("name", ["video_7_frames", "two_videos"])
def test_single_request_matches_reference(released_engine, released_ref, tokenizer, name):
    req = scenarios(tokenizer)[name]
    [result] = released_engine.generate([req], GREEDY)
    assert_matches_reference(result, released_ref, req)


@pytest.mark.parametrize("name", NAMES)
def test_released_layout_batch_matches_reference(released_batch, released_ref, name):
    reqs, results = released_batch
    assert_matches_reference(results[name], released_ref, reqs[name])


@pytest.mark.parametrize("name", NAMES)
def test_paper_layout_batch_matches_reference(paper_batch, paper_ref, name):
    reqs, results = paper_batch
    assert_matches_reference(results[name], paper_ref, reqs[name])


def test_layouts_differ_exactly_when_a_video_has_several_temporal_steps(released_batch, paper_batch, config):
    """T' = 1 (an image, and text): the two write-backs are the same permutation (identity);
    T' > 1: they differ at the visual tokens and after."""
    _, rel = released_batch
    _, pap = paper_batch
    vis = {config["image_token_id"], config["video_token_id"]}
    for name in ("image", "text_only"):
        assert torch.nan_to_num(token_logprobs(rel[name]) - token_logprobs(pap[name])).abs().max() < 1e-5
    for name in ("video_4_frames", "video_8_frames", "two_videos"):
        diff = torch.nan_to_num(token_logprobs(rel[name]) - token_logprobs(pap[name])).abs()
        pos = visual_positions(rel[name], vis)
        assert diff[: pos[0] + 1].max() < 1e-5  # before the first visual embedding is read
        assert diff[pos[1]:].max() > 1e-3, f"{name}: released and paper layouts agree"


# ---- zero proj == Qwen2-VL; random proj != Qwen2-VL --------------------------------------------


def transformers_qwen2vl(model_dir: str):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig.from_pretrained(model_dir)
    return cfg, Qwen2VLForConditionalGeneration.from_pretrained(model_dir, config=cfg, dtype=torch.float32).eval()


def transformers_logprobs(model, cfg, reference: StaveReference, req: dict) -> torch.Tensor:
    """transformers' Qwen2-VL (which has no temporal layers) on the expanded prompt and the same pixels."""
    prep = prepare(reference, req)
    ids = torch.tensor([list(prep.input_ids)])
    kinds = torch.tensor([[2 if t == cfg.video_token_id else 1 if t == cfg.image_token_id else 0
                           for t in prep.input_ids]])
    kw = {}
    mm = req["multi_modal_data"]
    for key, items, video in (("video", mm.get("video", []), True), ("image", mm.get("image", []), False)):
        if items:
            done = [reference.preprocess(x, video=video) for x in items]
            kw["pixel_values_videos" if video else "pixel_values"] = torch.cat([p for p, _ in done])
            kw[f"{key}_grid_thw"] = torch.tensor([list(g) for _, g in done])
    with torch.no_grad():
        logits = model(input_ids=ids, mm_token_type_ids=kinds, **kw).logits[0]
    return torch.log_softmax(logits.float(), -1)


def test_zero_proj_equals_transformers_qwen2vl(zero_engine, zero_dir, tokenizer):
    """temp_attn.proj = 0: vLLM STAVE is exactly transformers' Qwen2VLForConditionalGeneration on the same
    weights (the temporal keys are unused there). Videos with T' <= max(h', w'), where transformers 5.19's
    text-after-video positions agree with Qwen2-VL's (see the reference's note)."""
    cfg, hf = transformers_qwen2vl(zero_dir)
    ref = StaveReference.from_pretrained(zero_dir)
    all_cases = scenarios(tokenizer)
    reqs = [all_cases[n] for n in ("video_2_frames", "video_4_frames", "image", "two_videos", "text_only")]
    for req, result in zip(reqs, zero_engine.generate(reqs, GREEDY), strict=True):
        err = prompt_logprob_error(result, transformers_logprobs(hf, cfg, ref, req))
        assert err.max() <= TOL, f"differs from transformers' Qwen2-VL by {err.max():.3g}"
        assert_matches_reference(result, ref, req)


def test_random_proj_changes_visual_token_logprobs(released_batch, zero_engine, config):
    """Same weights except temp_attn.proj: outputs agree up to the first visual embedding, then differ."""
    reqs, rel = released_batch
    vis = {config["image_token_id"], config["video_token_id"]}
    for name in ("video_4_frames", "video_8_frames", "image"):
        [stock] = zero_engine.generate([reqs[name]], GREEDY)
        diff = torch.nan_to_num(token_logprobs(rel[name]) - token_logprobs(stock)).abs()
        pos = visual_positions(stock, vis)
        assert diff[: pos[0] + 1].max() < 1e-5
        assert diff[pos[1]: pos[-1] + 1].max() > 1e-3, f"{name}: the temporal layers changed nothing"


# ---- loading --------------------------------------------------------------------------------


def _edited_checkpoint(src: str, out, edit) -> str:
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    state = load_file(f"{src}/model.safetensors")
    edit(state)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def _load_fails(model: str) -> str:
    """vLLM's loader (what an engine start runs first) on the checkpoint, without an engine (tests/model_load.py)."""
    from tests.model_load import load_checkpoint

    with pytest.raises(ValueError) as info:
        load_checkpoint(model)
    return str(info.value)


def test_missing_or_misshaped_temporal_weight_fails_naming_the_key(stave_dir, tmp_path):
    from tests.model_load import load_checkpoint

    assert load_checkpoint(stave_dir) is not None  # the unedited checkpoint loads
    key = "visual.blocks.1.temp_attn.proj.weight"
    missing = _edited_checkpoint(stave_dir, tmp_path / "missing", lambda s: s.pop(key))
    assert f"STAVE checkpoint lacks 1 temporal weight(s), e.g. ['{key}']" in _load_fails(missing)
    bad = "visual.blocks.0.temp_attn.qkv.weight"
    misshaped = _edited_checkpoint(stave_dir, tmp_path / "misshaped", lambda s: s.update({bad: s[bad][:-8]}))
    assert f"temporal weight '{bad}' has shape (232, 160), expected (240, 160)" in _load_fails(misshaped)


# ---- the gateway -----------------------------------------------------------------------------
