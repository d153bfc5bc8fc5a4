"""RED-VILLM inside vLLM's engine (CPU, fp32) against the plain-PyTorch reference
(``model_plugins/reference/red_villm.py``: Qwen-VL's original layout and math, a second
implementation of every option).

Two real ``vllm.LLM`` engines on tiny demo checkpoints cover every value of every option:

- ``default``: ``spatial_path=adapter``, ``temporal_module=linear``, ``token_order=temporal_first``,
  ``vision_layer=last``, ``pad_temporal_to=100`` (356 visual tokens per video);
- ``variant``: ``tokenwise``, ``mlp2``, ``spatial_first``, ``penultimate``, ``pad_temporal_to=null``
  (T + 1024 tokens per video), other random weights.

Both eager (a compiled start spends minutes profiling the encoder on 100-frame dummy videos).
Frames are small and resized to 448 px by the processor, as user media would be.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from framewise.model_plugins.reference.red_villm import RedVillmReference
from tests.conftest import EngineError, EngineHandle

pytestmark = pytest.mark.engine

TOL = 1e-4
GREEDY = dict(temperature=0.0, max_tokens=16, ignore_eos=True, prompt_logprobs=5, logprobs=5)
VARIANT = dict(spatial_path="tokenwise", temporal_module="mlp2", token_order="spatial_first",
               vision_layer="penultimate", pad_temporal_to=None)


def frames(n: int, seed: int, h: int = 40, w: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def request(tokenizer, text: str, parts: list[str], videos=(), images=()) -> dict:
    """A chat-template prompt whose user turn holds ``parts`` ("video"/"image") then ``text``."""
    content = [{"type": p} for p in parts] + [{"type": "text", "text": text}]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    mm = {}
    if videos:
        mm["video"] = list(videos)
    if images:
        mm["image"] = list(images)
    return {"prompt_token_ids": list(ids), "multi_modal_data": mm}


def scenarios(tokenizer) -> dict[str, dict]:
    ask = "What is happening in the video?"
    out = {f"video_{n}_frames": request(tokenizer, ask, ["video"], videos=[frames(n, seed=10 + n)])
           for n in (1, 4, 16, 100)}
    out["image"] = request(tokenizer, "Picture 2: another image.", ["image"], images=[frames(1, seed=7, h=60)[0]])
    out["two_videos"] = request(tokenizer, ask, ["video", "video"], videos=[frames(4, seed=21), frames(9, seed=22)])
    out["image_and_video"] = request(tokenizer, ask, ["image", "video"], images=[frames(1, seed=23)[0]],
                                     videos=[frames(6, seed=24, h=448, w=448)])
    out["text_only"] = request(tokenizer, "What is happening?", [])
    return out


NAMES = ["video_1_frames", "video_4_frames", "video_16_frames", "video_100_frames", "image", "two_videos",
         "image_and_video", "text_only"]


def prompt_logprob_error(result: dict, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per position i >= 1: max |vLLM - reference| over the tokens vLLM returned (top-5 + actual)."""
    errs = [0.0]
    for i, entry in enumerate(result["prompt_logprobs"][1:], start=1):
        errs.append(max(abs(v - ref_logprobs[i - 1, t].item()) for t, v in entry.items()))
    return torch.tensor(errs)


def assert_matches_reference(result: dict, reference: RedVillmReference, req: dict) -> None:
    mm = req["multi_modal_data"]
    prep = reference.expand_prompt(req["prompt_token_ids"], images=mm.get("image", []), videos=mm.get("video", []))
    assert result["prompt_token_ids"] == list(prep.input_ids)
    err = prompt_logprob_error(result, reference.prompt_logprobs(prep))
    assert err.max() <= TOL, f"prompt logprobs differ by {err.max():.3g} at position {int(err.argmax())}"
    tokens, steps = reference.greedy(prep, GREEDY["max_tokens"])
    assert result["token_ids"] == list(tokens)
    step_err = max(abs(v - steps[s][t].item()) for s, d in enumerate(result["logprobs"]) for t, v in d.items())
    assert step_err <= TOL, f"decode logprobs differ by {step_err:.3g}"


def pad_runs(ids: list[int], start: int, pad: int, end: int) -> list[int]:
    """Lengths of the ``<img>`` <imgpad>* ``</img>`` spans, in prompt order (every pad inside one)."""
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == start:
            j = i + 1
            while ids[j] == pad:
                j += 1
            assert ids[j] == end, f"<img> at {i} is closed by {ids[j]}, not </img>"
            runs.append(j - i - 1)
            i = j
        else:
            assert ids[i] not in (pad, end), f"stray visual token {ids[i]} at {i}"
        i += 1
    return runs


# ---- checkpoints, references and engines (one of each per module) -----------------------------


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory) -> str:
    from framewise.model_plugins.reference.demo_checkpoint import write_red_villm

    return write_red_villm(str(tmp_path_factory.mktemp("ckpt") / "red-villm"), seed=0)


@pytest.fixture(scope="module")
def variant_dir(tmp_path_factory) -> str:
    from framewise.model_plugins.reference.demo_checkpoint import write_red_villm

    return write_red_villm(str(tmp_path_factory.mktemp("ckpt") / "red-villm-variant"), seed=1, **VARIANT)


@pytest.fixture(scope="module")
def tokenizer(default_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_dir)


@pytest.fixture(scope="module")
def default_ref(default_dir) -> RedVillmReference:
    return RedVillmReference.from_pretrained(default_dir)


@pytest.fixture(scope="module")
def variant_ref(variant_dir) -> RedVillmReference:
    return RedVillmReference.from_pretrained(variant_dir)


def _engine(model: str, tmp_path_factory, name: str):
    log = tmp_path_factory.mktemp("logs") / f"{name}.log"
    # 4096: two tokenwise videos are 2 x (T + 1024) tokens
    handle = EngineHandle(model, log, max_model_len=4096, seed=0, enforce_eager=True)
    yield handle
    handle.close()


@pytest.fixture(scope="module")
def default_engine(default_dir, tmp_path_factory):
    yield from _engine(default_dir, tmp_path_factory, "red-villm-default")


@pytest.fixture(scope="module")
def variant_engine(variant_dir, tmp_path_factory):
    yield from _engine(variant_dir, tmp_path_factory, "red-villm-variant")


@pytest.fixture(scope="module")
def default_batch(default_engine, tokenizer):
    """Every scenario in ONE engine call (continuous batching, text-only request included)."""
    reqs = scenarios(tokenizer)
    return reqs, dict(zip(reqs, default_engine.generate(list(reqs.values()), GREEDY), strict=True))


@pytest.fixture(scope="module")
def variant_batch(variant_engine, tokenizer):
    reqs = scenarios(tokenizer)
    return reqs, dict(zip(reqs, variant_engine.generate(list(reqs.values()), GREEDY), strict=True))


# ---- vLLM == reference -----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_default_options_match_reference(default_batch, default_ref, name):
    reqs, results = default_batch
    assert_matches_reference(results[name], default_ref, reqs[name])


@pytest.mark.parametrize("name", NAMES)
def test_other_option_values_match_reference(variant_batch, variant_ref, name):
    """tokenwise spatial path, mlp2 modules, spatial first, penultimate layer, no temporal padding."""
    reqs, results = variant_batch
    assert_matches_reference(results[name], variant_ref, reqs[name])


# ---- the prompt layout ------------------------------------------------------------------------


def test_visual_token_counts_are_what_the_config_implies(default_batch, variant_batch, tokenizer):
    """356 <imgpad> per video whatever T with the defaults (100 padded temporal + 256 adapter
    tokens); T + 1024 with tokenwise and no padding; 256 per image in both; nothing else changes."""
    ids = tokenizer.convert_tokens_to_ids
    marks = (ids("<img>"), ids("<imgpad>"), ids("</img>"))
    reqs, default = default_batch
    _, variant = variant_batch
    expected = {"video_1_frames": ([356], [1025]), "video_4_frames": ([356], [1028]),
                "video_16_frames": ([356], [1040]), "video_100_frames": ([356], [1124]),
                "image": ([256], [256]), "two_videos": ([356, 356], [1028, 1033]),
                "image_and_video": ([256, 356], [256, 1030]), "text_only": ([], [])}
    for name, (want_default, want_variant) in expected.items():
        assert pad_runs(default[name]["prompt_token_ids"], *marks) == want_default, name
        assert pad_runs(variant[name]["prompt_token_ids"], *marks) == want_variant, name
        prompt = reqs[name]["prompt_token_ids"]
        placeholders = len(reqs[name]["multi_modal_data"].get("image", [])) * 2 + \
            len(reqs[name]["multi_modal_data"].get("video", [])) * 3
        assert len(default[name]["prompt_token_ids"]) == len(prompt) - placeholders + sum(
            n + 2 for n in want_default)


# ---- media the model refuses ------------------------------------------------------------------


def test_more_frames_than_max_frames_is_refused(default_engine, tokenizer):
    """101 frames (max_frames = pad_temporal_to = 100), and a video or an image that is not RGB,
    are refused before the engine with a message that says why; the engine keeps serving."""
    too_long = request(tokenizer, "What?", ["video"], videos=[frames(101, seed=3, h=8, w=8)])
    with pytest.raises(EngineError) as info:
        default_engine.generate([too_long], GREEDY)
    assert "video 0 has 101 frames; this model takes at most 100 (max_frames in config.json)" in info.value.message
    rgba = request(tokenizer, "What?", ["video"], videos=[np.zeros((4, 32, 32, 4), dtype=np.uint8)])
    with pytest.raises(EngineError) as info:
        default_engine.generate([rgba], GREEDY)
    assert "video 0 frames must be RGB with shape (T, H, W, 3), got (4, 32, 32, 4)" in info.value.message
    two_channels = request(tokenizer, "What?", ["image"], images=[np.zeros((32, 32, 2), dtype=np.uint8)])
    with pytest.raises(EngineError) as info:
        default_engine.generate([two_channels], GREEDY)
    assert "image frames must be RGB with shape (T, H, W, 3), got (1, 32, 32, 2)" in info.value.message
    [ok] = default_engine.generate([request(tokenizer, "What?", ["video"], videos=[frames(2, seed=4)])], GREEDY)
    assert len(ok["token_ids"]) == GREEDY["max_tokens"]


# ---- loading ----------------------------------------------------------------------------------


def test_checkpoint_keys_that_do_not_fit_fail_the_load_naming_them(default_dir, tmp_path):
    """A checkpoint without ``temporal_module`` and with keys of another variant / unknown LLM keys
    does not load: the error names every such key (the missing temporal weights included)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "broken"
    out.mkdir()
    for f in Path(default_dir).iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    state = load_file(f"{default_dir}/model.safetensors")
    weight = state.pop("transformer.visual.temporal_module.weight")
    state.pop("transformer.visual.temporal_module.bias")
    state["transformer.visual.temporal_module.0.weight"] = weight  # an mlp2 key in a linear config
    state["transformer.h.0.mlp.w3.weight"] = torch.ones(8, 8)  # not a Qwen-1 weight
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    from tests.model_load import load_checkpoint  # vLLM's loader, as an engine start runs it, without the engine

    assert load_checkpoint(default_dir) is not None  # the unedited checkpoint loads
    with pytest.raises(ValueError) as info:
        load_checkpoint(str(out))
    text = str(info.value)
    assert ("checkpoint keys with no place in this model: ['transformer.h.0.mlp.w3.weight', "
            "'transformer.visual.temporal_module.0.weight']") in text
    assert ("checkpoint lacks ['transformer.visual.temporal_module.bias', "
            "'transformer.visual.temporal_module.weight']") in text
