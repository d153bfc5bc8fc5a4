"""TC-LLaVA inside vLLM's engine (CPU, fp32) against the plain-PyTorch reference.

Each engine is a real ``vllm.LLM`` with the plugin loaded through its entry point,
paged KV cache, continuous batching and prefix caching.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from framewise.model_plugins.reference.tc_llava import TCLlavaReference
from tests.conftest import EngineError, _engine, random_video, variant_checkpoint

pytestmark = pytest.mark.engine

TOL = 1e-4
GREEDY = dict(temperature=0.0, max_tokens=16, ignore_eos=True, prompt_logprobs=5, logprobs=5)
VIDEO_PROMPT = "USER: <video>\nWhat happens in this video? ASSISTANT:"


def request(tokenizer, text: str, videos=(), images=()) -> dict:
    mm = {}
    if videos:
        mm["video"] = list(videos) if len(videos) > 1 else videos[0]
    if images:
        mm["image"] = list(images) if len(images) > 1 else images[0]
    return {"prompt_token_ids": tokenizer(text).input_ids, "multi_modal_data": mm}


def prepare(reference: TCLlavaReference, req: dict):
    mm = req["multi_modal_data"]
    videos = mm.get("video", [])
    images = mm.get("image", [])
    videos = videos if isinstance(videos, list) else [videos]
    images = images if isinstance(images, list) else [images]
    return reference.prepare(req["prompt_token_ids"], videos=videos, images=images)


def prompt_logprob_error(result: dict, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per position i >= 1: max |vLLM - reference| over the tokens vLLM returned (top-5 + actual)."""
    errs = [0.0]
    for i, entry in enumerate(result["prompt_logprobs"][1:], start=1):
        errs.append(max(abs(v - ref_logprobs[i - 1, t].item()) for t, v in entry.items()))
    return torch.tensor(errs)


def assert_matches_reference(result: dict, reference: TCLlavaReference, req: dict) -> None:
    prep = prepare(reference, req)
    assert result["prompt_token_ids"] == prep.input_ids
    err = prompt_logprob_error(result, reference.prompt_logprobs(prep))
    assert err.max() <= TOL, f"prompt logprobs differ by {err.max():.3g} at position {int(err.argmax())}"
    tokens, steps = reference.greedy(prep, GREEDY["max_tokens"])
    assert result["token_ids"] == tokens
    step_err = max(abs(v - steps[s][t].item()) for s, d in enumerate(result["logprobs"]) for t, v in d.items())
    assert step_err <= TOL, f"decode logprobs differ by {step_err:.3g}"


def scenarios(tokenizer) -> dict[str, dict]:
    frames = {f"video_{n}_frames": request(tokenizer, VIDEO_PROMPT, videos=[random_video(n, seed=10 + n)])
              for n in (1, 2, 4, 8)}
    return {
        **frames,
        "image": request(tokenizer, "USER: <image>\nWhat is in the picture? ASSISTANT:",
                         images=[random_video(1, seed=20)[0]]),
        "two_videos": request(tokenizer, "USER: <video>\nfirst clip, then <video>\nsecond. What changed? ASSISTANT:",
                              videos=[random_video(3, seed=21), random_video(5, seed=22)]),
        "video_and_image": request(tokenizer, "USER: <image>\nthis is the start; <video>\nwhat happens? ASSISTANT:",
                                   videos=[random_video(2, seed=23)], images=[random_video(1, seed=24)[0]]),
        "text_only": request(tokenizer, "USER: Is it day or night? ASSISTANT:"),
    }


# ---- parity with the reference ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["video_1_frames", "video_2_frames", "video_4_frames", "video_8_frames",
                                  "image", "two_videos", "video_and_image"])
def test_single_request_matches_reference(tc_engine, reference, tokenizer, name):
    req = scenarios(tokenizer)[name]
    [result] = tc_engine.generate([req], GREEDY)
    assert_matches_reference(result, reference, req)


def test_mixed_batch_matches_reference(tc_engine, reference, tokenizer):
    reqs = list(scenarios(tokenizer).values())
    results = tc_engine.generate(reqs, GREEDY)
    for req, result in zip(reqs, results, strict=True):
        assert_matches_reference(result, reference, req)


def test_engine_applies_the_frame_mask(tc_engine, reference, tc_llava_dir, tokenizer, tmp_path):
    """vLLM matches the masked reference and is far from the unmasked one at visual positions."""
    req = scenarios(tokenizer)["video_4_frames"]
    [result] = tc_engine.generate([req], GREEDY)
    off = TCLlavaReference.from_pretrained(str(variant_checkpoint(tc_llava_dir, tmp_path / "off",
                                                                  frame_block_mask=False)))
    prep = prepare(reference, req)
    err_on = prompt_logprob_error(result, reference.prompt_logprobs(prep))
    err_off = prompt_logprob_error(result, off.prompt_logprobs(prep))
    span = prep.spans[0]
    assert err_on.max() <= TOL
    assert err_off[span.start + 1 : span.end].min() > 1e-3  # outputs of visual tokens 0..L-2


def test_later_frame_does_not_change_earlier_positions(tc_engine, tokenizer, reference):
    video = random_video(4, seed=30)
    changed = video.copy()
    changed[2] = 255 - changed[2]
    a, b = tc_engine.generate([request(tokenizer, VIDEO_PROMPT, videos=[video]),
                               request(tokenizer, VIDEO_PROMPT, videos=[changed])], GREEDY)
    span = prepare(reference, request(tokenizer, VIDEO_PROMPT, videos=[video])).spans[0]
    first_changed = span.frame_ranges()[2][0]

    def lp(result, i):  # log-prob of the actual prompt token i (output of position i - 1)
        return result["prompt_logprobs"][i][result["prompt_token_ids"][i]]

    before = [abs(lp(a, i) - lp(b, i)) for i in range(1, first_changed + 1)]
    after = [abs(lp(a, i) - lp(b, i)) for i in range(first_changed + 1, len(a["prompt_token_ids"]))]
    assert max(before) < 1e-6, "a later frame leaked into earlier positions"
    assert min(after) > 1e-4, "the perturbed frame should change its own and later positions"


def test_prefix_cache_hit_gives_the_uncached_result(tc_engine, reference, tokenizer):
    """Same 8-frame video, another question: the second request reuses cached blocks and
    still matches the (uncached) reference. Prompt logprobs bypass the cache, so compare
    greedy tokens and their log-probs."""
    video = random_video(8, seed=40)
    params = {k: v for k, v in GREEDY.items() if k != "prompt_logprobs"}
    first = request(tokenizer, "USER: <video>\nWhat happens in this video? ASSISTANT:", videos=[video])
    second = request(tokenizer, "USER: <video>\nHow many people are in the video? ASSISTANT:", videos=[video])
    tc_engine.generate([first], params)
    [result] = tc_engine.generate([second], params)
    assert result["num_cached_tokens"] > 0, "the second request did not hit the prefix cache"
    prep = prepare(reference, second)
    tokens, steps = reference.greedy(prep, params["max_tokens"])
    assert result["token_ids"] == tokens
    err = max(abs(v - steps[s][t].item()) for s, d in enumerate(result["logprobs"]) for t, v in d.items())
    assert err <= TOL


@pytest.mark.parametrize(
    "video, message",
    [
        (np.zeros((0, 56, 56, 3), np.uint8), "zero frames"),
        (np.zeros((2, 56, 56, 3), np.float32), "uint8"),
        (np.zeros((2, 56, 56), np.uint8), "shape"),
        (random_video(17, seed=0), "at most 16"),
    ],
    ids=["zero-frames", "float-frames", "no-channel-dim", "too-many-frames"],
)
def test_bad_video_is_rejected_before_the_engine(tc_engine, tokenizer, video, message):
    req = {"prompt_token_ids": tokenizer(VIDEO_PROMPT).input_ids, "multi_modal_data": {"video": video}}
    with pytest.raises(EngineError, match=message):
        tc_engine.generate([req], GREEDY)
    # the engine keeps serving
    [ok] = tc_engine.generate([request(tokenizer, VIDEO_PROMPT, videos=[random_video(2, seed=1)])],
                              dict(temperature=0.0, max_tokens=2))
    assert len(ok["token_ids"]) == 2


# ---- gamma = 0, mask off: LLaVA-1.5 -------------------------------------------------------


def test_plain_config_equals_transformers_llava(plain_engine, plain_llava_dir, tokenizer):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from framewise.model_plugins.preprocess import clip_preprocess, load_image_processor_config

    raw = json.loads((plain_llava_dir / "config.json").read_text())
    hf = LlavaForConditionalGeneration.from_pretrained(
        plain_llava_dir,
        config=LlavaConfig.from_dict({k: v for k, v in raw.items() if k not in ("model_type", "architectures")}),
    ).eval()
    ipc = load_image_processor_config(str(plain_llava_dir), 56)
    video = random_video(4, seed=50)
    reqs = [request(tokenizer, VIDEO_PROMPT, videos=[video]),
            request(tokenizer, "USER: <image>\nWhat is in the picture? ASSISTANT:", images=[video[0]])]
    results = plain_engine.generate(reqs, GREEDY)
    for result, frames in zip(results, [video, video[:1]], strict=True):
        ids = [raw["image_token_index"] if t == raw["video_token_index"] else t for t in result["prompt_token_ids"]]
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([ids]), pixel_values=clip_preprocess(torch.from_numpy(frames), ipc))
        err = prompt_logprob_error(result, torch.log_softmax(logits.logits[0].float(), -1))
        assert err.max() <= TOL, f"differs from transformers' LLaVA by {err.max():.3g}"


def test_plain_config_has_no_frame_mask(plain_engine, plain_llava_dir, tc_llava_dir, tokenizer, tmp_path):
    """With frame_block_mask off the engine is causal: it matches the unmasked reference and
    not the masked one (same gamma = 0)."""
    req = request(tokenizer, VIDEO_PROMPT, videos=[random_video(3, seed=51)])
    [result] = plain_engine.generate([req], GREEDY)
    off = TCLlavaReference.from_pretrained(str(plain_llava_dir))
    on = TCLlavaReference.from_pretrained(str(variant_checkpoint(tc_llava_dir, tmp_path / "g0on",
                                                                 temporal_rope_gamma=0.0)))
    prep = prepare(off, req)
    assert prompt_logprob_error(result, off.prompt_logprobs(prep)).max() <= TOL
    span = prep.spans[0]
    assert prompt_logprob_error(result, on.prompt_logprobs(prep))[span.start + 1 : span.end].min() > 1e-3


# ---- gamma = 0.5, 2x2 frame pooling, a small token budget ------------------------------------


@pytest.fixture(scope="module")
def pooled_dir(tc_llava_dir, tmp_path_factory):
    return variant_checkpoint(tc_llava_dir, tmp_path_factory.mktemp("ckpt") / "pooled",
                              temporal_rope_gamma=0.5, frame_pooling=2)


@pytest.fixture(scope="module")
def pooled_engine(pooled_dir, tmp_path_factory):
    # 96 tokens per step: a 16-frame video (64 tokens) after a long text cannot share a step
    # with it, so the scheduler must move the whole video to the next step (never cut a frame).
    yield from _engine(pooled_dir, tmp_path_factory, "pooled", enable_prefix_caching=False,
                       max_num_batched_tokens=96, enforce_eager=True)


def test_fractional_gamma_pooling_and_whole_video_scheduling(pooled_engine, pooled_dir, tokenizer):
    reference = TCLlavaReference.from_pretrained(str(pooled_dir))
    assert reference.config.tokens_per_frame == 4
    long_text = "Describe the video in detail, then summarize the events in order. " * 4
    reqs = [
        request(tokenizer, VIDEO_PROMPT, videos=[random_video(4, seed=60)]),
        request(tokenizer, f"USER: {long_text}<video>\nWhat happens? ASSISTANT:", videos=[random_video(16, seed=61)]),
        request(tokenizer, "USER: <video>\nand <video>\nWhat changed? ASSISTANT:",
                videos=[random_video(3, seed=62), random_video(7, seed=63)]),
        request(tokenizer, "USER: <image>\nWhat is in the picture? ASSISTANT:", images=[random_video(1, seed=64)[0]]),
    ]
    assert len(prepare(reference, reqs[1]).input_ids) > 96
    results = pooled_engine.generate(reqs, GREEDY)
    for req, result in zip(reqs, results, strict=True):
        assert_matches_reference(result, reference, req)
