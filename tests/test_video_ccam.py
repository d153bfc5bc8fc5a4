"""Video-CCAM: the causal cross-attention mask, the projector, the v1.2 checkpoint layout, and the
vLLM model against the reference (CPU fp32)."""

from __future__ import annotations

import json
import weakref

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from framewise.model_plugins.layers.ccam import CCAMProjector, ccam_mask, visible_frames
from framewise.model_plugins.models.video_ccam import projector_key_report
from framewise.model_plugins.reference.video_ccam import VideoCCAMReference
from tests.conftest import _engine, random_video, variant_checkpoint
from tests.test_vllm_tc_llava import GREEDY, assert_matches_reference, request

VIDEO_PROMPT = "USER: <video>\nWhat happens in this video? ASSISTANT:"


# ---- mask ------------------------------------------------------------------------------------


def test_mask_n8_t4_table():
    expected = [[1, 0, 0, 0]] * 2 + [[1, 1, 0, 0]] * 2 + [[1, 1, 1, 0]] * 2 + [[1, 1, 1, 1]] * 2
    for rule in ("start", "end"):  # T | N: both rules agree
        per_frame = ccam_mask(8, 4, 3, rule)[:, ::3].int().tolist()
        assert per_frame == expected
        assert torch.equal(ccam_mask(8, 4, 3, rule), torch.tensor(expected).bool().repeat_interleave(3, dim=1))


def test_mask_n8_t3_counts():
    assert visible_frames(8, 3, "start").tolist() == [1, 1, 1, 2, 2, 2, 3, 3]
    assert visible_frames(8, 3, "end").tolist() == [1, 1, 2, 2, 2, 3, 3, 3]


def test_single_frame_is_full_attention():
    assert ccam_mask(8, 1, 5).all()
    with pytest.raises(ValueError):
        visible_frames(8, 2, "middle")


def _projector(rule="start"):
    pc = dict(num_query=8, hidden_size=32, cross_hidden_size=16, num_heads=2, num_key_value_heads=2,
              attention_bias=True, intermediate_size=64, hidden_act="swiglu", mlp_bias=True, layer_norm_eps=1e-5,
              output_size=24)
    torch.manual_seed(0)
    proj = CCAMProjector(pc, mask_rule=rule).eval()
    with torch.no_grad():
        for p in proj.parameters():
            p.normal_(0, 0.5)
    return proj


@pytest.mark.parametrize("rule", ["start", "end"])
def test_perturbing_frame_t_changes_only_queries_that_see_it(rule):
    proj = _projector(rule)
    torch.manual_seed(1)
    frames = torch.randn(3, 5, 16)
    base = proj(frames)
    counts = visible_frames(8, 3, rule)
    for t in range(3):
        changed = frames.clone()
        changed[t] += torch.randn(5, 16)
        diff = (proj(changed) - base).abs().amax(-1)
        sees = counts > t
        assert torch.all(diff[~sees] == 0), f"queries that cannot see frame {t} changed"
        assert torch.all(diff[sees] > 1e-4)


def test_projector_key_report_names_keys_and_shapes():
    expected = {"query": (8, 32), "cross_attn.q_proj.weight": (32, 32)}
    assert projector_key_report(expected, dict(expected)) is None
    report = projector_key_report(expected, {"query": (16, 32), "self_attn.q_proj.weight": (32, 32)})
    assert "missing    projector.cross_attn.q_proj.weight (32, 32)" in report
    assert "unexpected projector.self_attn.q_proj.weight (32, 32)" in report
    assert "shape      projector.query: checkpoint (16, 32), model (8, 32)" in report
    assert "query_self_attention" in report


# ---- checkpoint ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ccam_dir(tmp_path_factory):
    from framewise.model_plugins.reference.demo_checkpoint import write_demo_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "video-ccam"
    write_demo_checkpoint("video-ccam", str(out))
    return out


@pytest.fixture(scope="module")
def ccam_reference(ccam_dir):
    return VideoCCAMReference.from_pretrained(str(ccam_dir))


@pytest.fixture(scope="module")
def ccam_tokenizer(ccam_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ccam_dir)


def test_checkpoint_layout(ccam_dir, ccam_tokenizer):
    cfg = json.loads((ccam_dir / "config.json").read_text())
    assert cfg["model_type"] == "videoccam" and cfg["architectures"] == ["VideoCCAM"]
    assert cfg["vision_config"]["model_type"] == "siglip_vision_model"
    assert cfg["text_config"]["model_type"] == "qwen2"
    assert {"num_query", "hidden_size", "cross_hidden_size", "num_heads", "num_key_value_heads", "attention_bias",
            "intermediate_size", "hidden_act", "mlp_bias", "layer_norm_eps", "dropout", "attention_dropout",
            "output_size"} <= set(cfg["projector_config"])
    assert ccam_tokenizer.convert_tokens_to_ids("<video>") == cfg["video_token_id"]
    assert ccam_tokenizer.convert_tokens_to_ids("<image>") == cfg["image_token_id"]
    with safe_open(ccam_dir / "model.safetensors", "pt") as f:
        keys = list(f.keys())  # noqa: SIM118 - safe_open
    assert all(k.startswith(("vision_encoder.vision_model.", "projector.", "llm.model.", "llm.lm_head.")) for k in keys)
    pre = json.loads((ccam_dir / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "SiglipImageProcessor" and pre["image_mean"] == [0.5, 0.5, 0.5]


class AliveTensors:
    """Wraps a ``(name, tensor)`` stream and records how many of its tensors (and bytes) were
    alive at once: a loader that materialises the stream keeps every one of them."""

    def __init__(self, weights):
        self.weights, self.refs, self.peak, self.peak_bytes = weights, [], 0, 0

    def __iter__(self):
        for name, tensor in self.weights:
            self.refs.append((weakref.ref(tensor), tensor.numel() * tensor.element_size()))
            alive = [size for ref, size in self.refs if ref() is not None]
            self.peak, self.peak_bytes = max(self.peak, len(alive)), max(self.peak_bytes, sum(alive))
            yield name, tensor
            del tensor


def test_weights_stream_into_the_model_one_tensor_at_a_time(ccam_dir, tmp_path):
    """vLLM passes ``load_weights`` a generator over the shards (as in its loader, tensor by
    tensor); the model consumes it lazily, so loading holds ~one checkpoint tensor beyond the model."""
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator

    from framewise.model_plugins.models.video_ccam import VideoCCAMForConditionalGeneration
    from framewise.model_plugins.weights import ShardWriter, iter_safetensors, safetensors_files

    sharded = variant_checkpoint(ccam_dir, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    writer = ShardWriter(sharded, max_shard_bytes=(ccam_dir / "model.safetensors").stat().st_size // 3)
    for name, tensor in iter_safetensors(ccam_dir):
        writer.add(name, tensor)
    assert len(writer.close()) >= 3 and (sharded / "model.safetensors.index.json").exists()

    # the reference has the checkpoint's parameter names: it stands in for the vLLM module tree
    config = VideoCCAMReference.from_pretrained(str(ccam_dir)).config
    target = VideoCCAMReference(config)
    stream = AliveTensors(safetensors_weights_iterator([str(f) for f in safetensors_files(sharded)], False))
    loaded = VideoCCAMForConditionalGeneration.load_weights(target, iter(stream))
    expected = load_file(ccam_dir / "model.safetensors")
    assert len(stream.refs) == len(expected) > 100 and loaded == set(expected)
    assert stream.peak <= 2, f"{stream.peak} checkpoint tensors were alive at once"
    state = target.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    # the reference loads the shards the same way
    streamed = VideoCCAMReference.from_pretrained(str(sharded)).state_dict()
    assert all(torch.equal(streamed[k], v) for k, v in expected.items())


def test_every_item_is_num_query_tokens(ccam_reference, ccam_tokenizer):
    ids = ccam_tokenizer(VIDEO_PROMPT).input_ids
    for t in (1, 7, 40):
        prep = ccam_reference.prepare(ids, videos=[random_video(t, seed=t, size=40)])
        assert len(prep.input_ids) == len(ids) - 1 + ccam_reference.config.num_query


# ---- vLLM ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ccam_engine(ccam_dir, tmp_path_factory):
    yield from _engine(ccam_dir, tmp_path_factory, "video-ccam", enable_prefix_caching=True)


def scenarios(tok) -> dict[str, dict]:
    # num_query = 32: T = 3, 5 and 12 do not divide it
    out = {f"video_{t}_frames": request(tok, VIDEO_PROMPT, videos=[random_video(t, seed=100 + t, size=40)])
           for t in (1, 3, 4, 5, 12, 16)}
    out["image"] = request(tok, "USER: <image>\nWhat is in the picture? ASSISTANT:",
                           images=[random_video(1, seed=120, size=50)[0]])
    out["two_videos"] = request(tok, "USER: <video>\nthen <video>\nWhat changed? ASSISTANT:",
                                videos=[random_video(2, seed=121, size=40), random_video(9, seed=122, size=40)])
    out["text_only"] = request(tok, "USER: Is it day or night? ASSISTANT:")
    return out


@pytest.mark.engine
@pytest.mark.parametrize("name", ["video_1_frames", "video_4_frames", "video_16_frames", "video_3_frames",
                                  "video_12_frames", "image", "two_videos"])
def test_vllm_matches_reference(ccam_engine, ccam_reference, ccam_tokenizer, name):
    req = scenarios(ccam_tokenizer)[name]
    [result] = ccam_engine.generate([req], GREEDY)
    assert_matches_reference(result, ccam_reference, req)


@pytest.mark.engine
def test_vllm_mixed_batch_matches_reference(ccam_engine, ccam_reference, ccam_tokenizer):
    reqs = list(scenarios(ccam_tokenizer).values())
    for req, result in zip(reqs, ccam_engine.generate(reqs, GREEDY), strict=True):
        assert_matches_reference(result, ccam_reference, req)


@pytest.mark.engine
def test_causal_mask_is_applied_in_vllm(ccam_engine, ccam_reference, ccam_tokenizer):
    """A later frame changes only the visual tokens of queries allowed to see it."""
    video = random_video(4, seed=130, size=40)
    changed = video.copy()
    changed[3] = 255 - changed[3]
    a, b = ccam_engine.generate([request(ccam_tokenizer, VIDEO_PROMPT, videos=[video]),
                                 request(ccam_tokenizer, VIDEO_PROMPT, videos=[changed])], GREEDY)
    start = a["prompt_token_ids"].index(ccam_reference.config.video_token_id)
    n = ccam_reference.config.num_query
    sees_last = int((visible_frames(n, 4) > 3).nonzero()[0])  # first query that sees frame 3

    def lp(r, i):
        return r["prompt_logprobs"][i][r["prompt_token_ids"][i]]

    # the log-prob of token i is the output at position i - 1
    assert max(abs(lp(a, i) - lp(b, i)) for i in range(1, start + sees_last + 1)) < 1e-6
    assert abs(lp(a, start + sees_last + 1) - lp(b, start + sees_last + 1)) > 1e-5


def test_wrong_projector_key_fails_at_load_naming_it(ccam_dir, tmp_path_factory):
    """vLLM's loader (what an engine start runs first) on a checkpoint with a renamed projector key, without an
    engine (tests/model_load.py): the load fails naming both keys and their shapes."""
    from tests.model_load import load_checkpoint

    bad = variant_checkpoint(ccam_dir, tmp_path_factory.mktemp("ckpt") / "bad")
    state = load_file(bad / "model.safetensors")
    state["projector.extra_norm.weight"] = state.pop("projector.ffn_norm.weight")
    (bad / "model.safetensors").unlink()
    save_file(state, bad / "model.safetensors")
    assert load_checkpoint(ccam_dir, max_model_len=1024) is not None  # the unedited checkpoint loads
    with pytest.raises(ValueError) as e:
        load_checkpoint(bad, max_model_len=1024)
    assert "missing    projector.ffn_norm.weight (64,)" in str(e.value)
    assert "unexpected projector.extra_norm.weight (64,)" in str(e.value)


def test_reference_rejects_too_few_placeholders(ccam_reference, ccam_tokenizer):
    with pytest.raises(ValueError, match="more media items"):
        ccam_reference.prepare(ccam_tokenizer("no placeholder").input_ids, videos=[np.zeros((1, 8, 8, 3), np.uint8)])


# ---- v1.0 -> v1.2 conversion (LoRA merge) ----------------------------------------------------

R, ALPHA = 4, 8


@pytest.fixture(scope="module")
def v10_release(tmp_path_factory):
    """A tiny Video-CCAM v1.0 release: base Qwen2 + SigLIP, projector/, and PEFT LoRA adapters on the
    LLM's and SigLIP's q/v projections (keys ``base_model.model.<module>.lora_{A,B}.weight``)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from framewise.model_plugins.reference.demo_checkpoint import build_tokenizer, init_random_

    d = tmp_path_factory.mktemp("v10")
    tok = build_tokenizer(video_token=False)
    llm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=520, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    init_random_(llm, 1)
    llm.save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    vis = SiglipVisionModel(SiglipVisionConfig(image_size=28, patch_size=14, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=3, num_attention_heads=2, vision_use_head=False))
    init_random_(vis, 2)
    vis.save_pretrained(d / "siglip")
    pc = dict(num_query=32, hidden_size=64, cross_hidden_size=64, num_heads=2, num_key_value_heads=2,
              attention_bias=True, intermediate_size=128, hidden_act="swiglu", mlp_bias=True, layer_norm_eps=1e-5,
              dropout=0.1, attention_dropout=0.1, output_size=128, visual_select_layer=-2)
    proj = CCAMProjector(pc)
    init_random_(proj, 3)
    (d / "v1.0" / "projector").mkdir(parents=True)
    save_file(dict(proj.state_dict()), d / "v1.0" / "projector" / "model.safetensors")
    (d / "v1.0" / "projector" / "config.json").write_text(json.dumps({**pc, "model_type": "ccam_projector"}))
    g = torch.Generator().manual_seed(4)
    adapters = {"llm_adapter": ("model.layers", 2, 128, {"q_proj": 128, "v_proj": 64}),
                "visual_encoder_adapter": ("vision_model.encoder.layers", 3, 64, {"q_proj": 64, "v_proj": 64})}
    for name, (path, layers, width, outs) in adapters.items():
        weights = {}
        for i in range(layers):
            for m, out_dim in outs.items():
                key = f"base_model.model.{path}.{i}.self_attn.{m}"
                weights[f"{key}.lora_A.weight"] = torch.randn(R, width, generator=g) * 0.3
                weights[f"{key}.lora_B.weight"] = torch.randn(out_dim, R, generator=g) * 0.3
        (d / "v1.0" / name).mkdir()
        save_file(weights, d / "v1.0" / name / "adapter_model.safetensors")
        (d / "v1.0" / name / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_modules": ["q_proj", "v_proj"]}))
    return d


class LoRALinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.base, self.a, self.b, self.scale = base, a, b, scale

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.a.T) @ self.b.T


def test_v10_conversion_equals_unmerged_adapters(v10_release, tmp_path):
    from framewise.model_plugins.convert import _load_safetensors_dir
    from framewise.server.cli import main

    out = tmp_path / "converted"
    assert main(["convert-checkpoint", "--v10", str(v10_release / "v1.0"), "--base-llm", str(v10_release / "base"),
                 "--vision", str(v10_release / "siglip"), "--out", str(out)]) == 0
    merged = VideoCCAMReference.from_pretrained(str(out))
    cfg = merged.config
    assert (cfg.image_token_id, cfg.video_token_id) == (4, 512)  # <video> added inside the padded vocabulary

    # the oracle: base weights, adapters applied on the fly
    unmerged = VideoCCAMReference(cfg, merged.image_processor).eval()
    base = {f"llm.{k}": v for k, v in _load_safetensors_dir(v10_release / "base").items()}
    base.update({f"vision_encoder.{k if k.startswith('vision_model.') else 'vision_model.' + k}": v
                 for k, v in _load_safetensors_dir(v10_release / "siglip").items()})
    base.update({f"projector.{k}": v for k, v in _load_safetensors_dir(v10_release / "v1.0" / "projector").items()})
    unmerged.load_state_dict(base, strict=True)
    plain = VideoCCAMReference(cfg, merged.image_processor).eval()
    plain.load_state_dict(base, strict=True)
    for adapter, root in (("llm_adapter", unmerged.llm), ("visual_encoder_adapter", unmerged.vision_encoder.vision_model)):
        lora = load_file(v10_release / "v1.0" / adapter / "adapter_model.safetensors")
        for key in [k for k in lora if ".lora_A." in k]:
            path = key[len("base_model.model."):].split(".lora_A.")[0]
            if adapter == "visual_encoder_adapter":
                path = path[len("vision_model."):] if not hasattr(root, "vision_model") else path
            parent_path, attr = path.rsplit(".", 1)
            parent = root.get_submodule(parent_path)
            setattr(parent, attr, LoRALinear(getattr(parent, attr), lora[key], lora[key.replace("lora_A", "lora_B")],
                                             ALPHA / R))

    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(out)(VIDEO_PROMPT).input_ids
    video = random_video(5, seed=7, size=40)
    logits = {name: m.logits(m.prepare(ids, videos=[video]).embeds)
              for name, m in (("merged", merged), ("unmerged", unmerged), ("plain", plain))}
    assert (logits["merged"] - logits["unmerged"]).abs().max() < 1e-4
    assert (logits["merged"] - logits["plain"]).abs().max() > 1e-2  # the adapters matter


def test_v10_conversion_streams_into_shards(v10_release, tmp_path, monkeypatch):
    """The converter never holds the whole model: at most one output shard of source tensors."""
    import framewise.model_plugins.convert as convert

    args = (v10_release / "v1.0", v10_release / "base", v10_release / "siglip")
    whole = convert.video_ccam_v10_to_v12(*args, tmp_path / "whole")
    streams = []

    def tracked(path):
        streams.append(AliveTensors(convert_iter(path)))
        return iter(streams[-1])

    convert_iter = convert.iter_safetensors
    monkeypatch.setattr(convert, "iter_safetensors", tracked)
    shard = 256 << 10
    sharded = convert.video_ccam_v10_to_v12(*args, tmp_path / "sharded", max_shard_bytes=shard)
    total = sum(sum(size for _, size in s.refs) for s in streams)
    largest = max(size for s in streams for _, size in s.refs)
    bound = max(shard, largest) + largest  # the shard being filled (or one bigger tensor) + the one being read
    assert total > 3 * bound
    assert max(s.peak_bytes for s in streams) <= bound
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 4
    monkeypatch.setattr(convert, "iter_safetensors", convert_iter)
    a, b = convert._load_safetensors_dir(whole), convert._load_safetensors_dir(sharded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model_type", ["phi3", "llama"])
def test_other_decoders_are_selectable_through_text_config(model_type, tmp_path):
    """v1.0/v1.1 used Phi-3 and Yi (Llama): the decoder comes from text_config alone."""
    from framewise.model_plugins.reference.demo_checkpoint import build_tokenizer, video_ccam_config

    tok = build_tokenizer()
    text = dict(model_type=model_type, vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                pad_token_id=tok.pad_token_id)
    cfg = video_ccam_config(tok, text_config=text)
    cfg.save_pretrained(tmp_path)
    from framewise.model_plugins.configs import VideoCCAMConfig

    loaded = VideoCCAMConfig.from_pretrained(tmp_path)
    assert loaded.text_config.model_type == model_type
    ref = VideoCCAMReference(loaded).eval()
    prep = ref.prepare(tok(VIDEO_PROMPT).input_ids, videos=[random_video(3, seed=1, size=40)])
    assert ref.logits(prep.embeds).shape == (len(prep.input_ids), len(tok))
