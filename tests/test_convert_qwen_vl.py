"""``framewise convert-qwen-vl``: a Qwen-VL(-Chat) checkpoint (Qwen-1 + ``visual``, ``qwen.tiktoken``)
-> a servable RED-VILLM checkpoint, and ``framewise demo-model --arch red-villm``.

The source is built here in Qwen-VL's own layout: a tiktoken rank file trained on a small corpus
(single bytes in shuffled rank order, then merges), Qwen's remote-code files, ``model_type: qwen``,
bf16 weights in two shards (the demo checkpoint's, less the RED-VILLM modules).
"""

from __future__ import annotations

import base64
import collections
import json
import os
import random
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from framewise.model_plugins.convert import qwen_vl_to_red_villm
from framewise.model_plugins.tiktoken_convert import QWEN_VL_SPECIAL_TOKENS, qwen_vl_special_tokens
from framewise.model_plugins.weights import iter_safetensors
from tests.conftest import cli

# Qwen-VL's tokenization_qwen.py PAT_STR, verbatim: digits one at a time (GPT-4's pattern takes up to 3)
QWEN_PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
MODULES = ("transformer.visual.temporal_module.", "transformer.visual.spatial_module.")
TRAIN = [
    "The quick brown fox jumps over the lazy dog. What happens in this video? A person walks in.",
    "Describe the image in detail: a red ball rolls across the wooden floor, then stops.",
    "It's what they're saying: we'll see, I'd say, you've got it, I'm sure. DON'T SHOUT!",
    "视频里发生了什么？一个人走进房间，打开了门。这是一张图片，图片里有三只猫。",
    "def frames(n):\n    return [i * 2 for i in range(n)]  # 12345 67890\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
    "Picture 1: <img></img>\nVideo 1: <img><imgpad></img>\n",
    "emoji 😀🎉👍🏽 and   spaces\t\ttabs\n\n\nnewlines   ",
]
CORPUS = [
    *TRAIN,
    "Completely unseen words plugh: xylophone, quizzical, juxtaposition, Zürich, naïve, façade, résumé.",
    "中文分词：今天天气很好，我们去公园散步吧！繁體中文也可以。日本語のテキストも。한국어 문장.",
    "emoji 🇨🇳🇺🇸 family 👨‍👩‍👧‍👦 skin tones 👋🏻👋🏿 and ZWJ sequences; symbols ©®™ ∑∫√ →⇒",
    "digits 0 1 22 333 4444 55555 3.14159 1e-6 -42 +7 2024-11-30 12:30:45",
    "   leading\n\n\n   mixed \t whitespace \r\n runs\t\t\t\n   trailing   ",
    "<img>https://example.com/a.jpg</img><ref>the cat</ref><box>(1,2),(3,4)</box><quad>q</quad>",
    "<|im_start|>user\nPicture 1: <img></img>\nVideo 1: <img><imgpad></img>\nWhat?<|im_end|>\n"
    "<|im_start|>assistant\nA cat.<|im_end|>\n<|endoftext|><|extra_0|><|extra_204|>",
    "bytes \x00\x01\x7f and lone marks \u0300 + 'apostrophes' 'S 'T 'RE 'LL",
    "",
]
NOT_NFC = "cafe\u0301 A\u030a o\u0308"  # Qwen's tokenizer NFC-normalises before tiktoken


def train_ranks(texts: list[str], merges: int, seed: int = 0) -> dict[bytes, int]:
    """A tiktoken rank table: the 256 bytes (shuffled ranks), then the most frequent pair merges
    within Qwen-pattern pre-tokens, each new token ranked after its parts; then digit runs, which
    Qwen's pattern never lets a text reach (a 3-digit pattern would), and a word no merge reaches."""
    import regex

    order = list(range(256))
    random.Random(seed).shuffle(order)
    ranks = {bytes([b]): i for i, b in enumerate(order)}
    words = collections.Counter(tuple(bytes([b]) for b in m.encode())
                                for text in texts for m in regex.findall(QWEN_PAT_STR, text))
    for _ in range(merges):
        pairs = collections.Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:], strict=False):
                pairs[pair] += c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        merged = collections.Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    for run in (b"12", b"123", b"45", b"202", b"2024"):
        ranks.setdefault(run, len(ranks))
    ranks.setdefault(b" plugh", len(ranks))  # no merge path leads to it: tiktoken takes whole pieces
    return ranks


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    return train_ranks(TRAIN * 3, 400)


@pytest.fixture(scope="module")
def encoding(ranks):
    import tiktoken

    return tiktoken.Encoding("qwen-test", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks,
                             special_tokens=qwen_vl_special_tokens(len(ranks)))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    from framewise.model_plugins.reference.demo_checkpoint import write_red_villm

    out = tmp_path_factory.mktemp("rv") / "demo"
    return Path(write_red_villm(str(out), vocab_size=1024))  # room for the test tokenizer's 873 ids


def write_source(demo: Path, ranks: dict[bytes, int], out: Path, *, weights: str = "safetensors",
                 keep_modules: bool = False) -> Path:
    """The demo checkpoint in Qwen-VL(-Chat)'s release layout."""
    out.mkdir(parents=True)
    state = {k: v.to(torch.bfloat16) for k, v in iter_safetensors(demo)
             if keep_modules or not k.startswith(MODULES)}
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        if weights == "safetensors":
            name = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({k: state[k].contiguous() for k in part}, out / name, metadata={"format": "pt"})
        else:
            name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
            torch.save({k: state[k] for k in part}, out / name)
        weight_map |= dict.fromkeys(part, name)
    index = "model.safetensors.index.json" if weights == "safetensors" else "pytorch_model.bin.index.json"
    (out / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    demo_cfg = json.loads((demo / "config.json").read_text())
    visual = {k: v for k, v in demo_cfg["visual"].items() if k != "n_queries"}  # Qwen-VL does not write it
    visual["image_start_id"] = qwen_vl_special_tokens(len(ranks))["<img>"]
    cfg = {k: demo_cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels",
                                    "intermediate_size", "layer_norm_epsilon", "rotary_emb_base", "seq_length",
                                    "max_position_embeddings", "use_dynamic_ntk", "use_logn_attn", "no_bias",
                                    "vocab_size", "tie_word_embeddings")}
    cfg |= {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "visual": visual, "rotary_pct": 1.0,
            "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                         "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
            "bf16": True, "fp16": False, "fp32": False, "attn_dropout_prob": 0.0, "emb_dropout_prob": 0.0,
            "initializer_range": 0.02, "onnx_safe": None, "scale_attn_weights": True,
            "tokenizer_type": "QWenTokenizer", "use_cache": True, "use_flash_attn": "auto",
            "transformers_version": "4.32.0"}
    if keep_modules:
        cfg |= {k: demo_cfg[k] for k in ("temporal_module", "spatial_path")}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"chat_format": "chatml", "eos_token_id": len(ranks), "pad_token_id": len(ranks), "max_window_size": 6144,
         "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.3}))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
         "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}))
    with open(out / "qwen.tiktoken", "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    for name in ("tokenization_qwen.py", "modeling_qwen.py", "configuration_qwen.py", "visual.py"):
        (out / name).write_text("# Qwen's remote code (not used by the converted checkpoint)\n")
    return out


@pytest.fixture(scope="module")
def source(demo_dir, ranks, tmp_path_factory) -> Path:
    return write_source(demo_dir, ranks, tmp_path_factory.mktemp("qwen-vl") / "Qwen-VL-Chat")


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> Path:
    return qwen_vl_to_red_villm(source, tmp_path_factory.mktemp("out") / "red-villm")


@pytest.fixture(scope="module")
def tokenizer(converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors.index.json").exists() or list(path.glob("*.safetensors")):
        return dict(iter_safetensors(path))
    out = {}
    for f in sorted(path.glob("pytorch_model*.bin")):
        out |= torch.load(f, weights_only=True)
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(a.contiguous().view(torch.uint8).flatten().numpy()) \
        == bytes(b.contiguous().view(torch.uint8).flatten().numpy())


# ---- tokenizer -------------------------------------------------------------------------------


def test_special_token_ids_are_qwen_vls():
    """Qwen-VL's layout: the specials follow the 151643 ranks of qwen.tiktoken, <img> at 151857."""
    ids = qwen_vl_special_tokens(151643)
    assert (ids["<|endoftext|>"], ids["<|im_start|>"], ids["<|im_end|>"]) == (151643, 151644, 151645)
    assert (ids["<|extra_0|>"], ids["<|extra_204|>"], ids["<ref>"]) == (151646, 151850, 151851)
    assert (ids["<img>"], ids["</img>"], ids["<imgpad>"]) == (151857, 151858, 151859)
    assert len(QWEN_VL_SPECIAL_TOKENS) == 217


def test_tokenizer_encodes_exactly_as_tiktoken(tokenizer, encoding, ranks):
    """Every corpus string (seen and unseen words, Chinese/Japanese/Korean, emoji with ZWJ, digits,
    whitespace runs, the image/ref/box tags, ChatML) gets tiktoken's ids and decodes back."""
    merged = 0
    for text in [*CORPUS, "".join(CORPUS)]:
        expected = encoding.encode(text, allowed_special="all")
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == expected, f"{text[:40]!r}: {ids[:24]} != {expected[:24]}"
        assert tokenizer.decode(ids) == text
        merged += len(ids) < len(text.encode())
    assert merged >= len(CORPUS) - 2  # the merges are really exercised, not just bytes
    special = qwen_vl_special_tokens(len(ranks))
    assert tokenizer.convert_tokens_to_ids("<img>") == special["<img>"] == len(ranks) + 214
    assert tokenizer.encode("<img></img><imgpad>", add_special_tokens=False) == [len(ranks) + i for i in (214, 215, 216)]


def test_tokenizer_normalises_to_nfc_like_qwen(tokenizer, encoding):
    nfc = unicodedata.normalize("NFC", NOT_NFC)
    assert nfc != NOT_NFC and encoding.encode(NOT_NFC) != encoding.encode(nfc)
    assert tokenizer.encode(NOT_NFC, add_special_tokens=False) == encoding.encode(nfc)


def test_chat_template_places_qwen_vl_tags(tokenizer, converted, ranks):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Hi"}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "Picture 1: <img></img>\nVideo 1: <img><imgpad></img>\nHi<|im_end|>\n<|im_start|>assistant\n")
    n = len(ranks)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == n + 1 and ids.count(n + 214) == 2 and ids.count(n + 216) == 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    gen = json.loads((converted / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [n + 2, n] and gen["top_p"] == 0.3  # the source's sampling defaults kept
    tok_cfg = json.loads((converted / "tokenizer_config.json").read_text())
    assert "auto_map" not in tok_cfg and tok_cfg["chat_template"] == tokenizer.chat_template


# ---- weights and config ----------------------------------------------------------------------


def test_converted_checkpoint_loads_in_reference_with_source_weights_unchanged(source, converted):
    from framewise.model_plugins.configs.red_villm import RedVillmConfig
    from framewise.model_plugins.reference.red_villm import RedVillmReference

    ref = RedVillmReference.from_pretrained(str(converted))  # raises on any missing/unexpected key
    src, out = tensors(source), tensors(converted)
    assert set(out) - set(src) == {"transformer.visual.temporal_module.weight",
                                   "transformer.visual.temporal_module.bias"}
    for key, tensor in src.items():
        assert same_bytes(out[key], tensor), key
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert os.stat(converted / name).st_ino == os.stat(source / name).st_ino  # linked, not copied
    w = out["transformer.visual.temporal_module.weight"]
    assert w.shape == (128, 64) and w.dtype == torch.bfloat16 and w.abs().max() <= 64 ** -0.5 and w.std() > 0.05

    cfg = json.loads((converted / "config.json").read_text())
    qwen = json.loads((source / "config.json").read_text())
    changed = {"model_type", "architectures", "auto_map", "transformers_version", "visual"}
    assert {k: v for k, v in qwen.items() if k not in changed} == {k: cfg[k] for k in qwen if k not in changed}
    assert qwen["visual"].items() <= cfg["visual"].items() and "auto_map" not in cfg
    assert (cfg["model_type"], cfg["architectures"], cfg["dtype"]) == (
        "red_villm", ["RedVillmForConditionalGeneration"], "bfloat16")
    config = RedVillmConfig.from_pretrained(converted)
    assert (config.temporal_module, config.spatial_path, config.num_frames, config.video_tokens(7)) == (
        "linear", "adapter", 100, 356)
    assert ref.video_embeds(torch.rand(2, 3, 448, 448)).shape == (356, 128)
    assert not list(converted.glob("*.py")) and (converted / "qwen.tiktoken").exists()


def test_temporal_init_is_seeded(source, converted, tmp_path):
    again = qwen_vl_to_red_villm(source, tmp_path / "same")
    other = qwen_vl_to_red_villm(source, tmp_path / "other", seed=1)
    key = "transformer.visual.temporal_module.weight"
    base = tensors(converted)[key]
    assert same_bytes(tensors(again)[key], base) and not torch.equal(tensors(other)[key], base)


def test_cli_mlp2_tokenwise_layout(source, tmp_path):
    from framewise.model_plugins.reference.red_villm import RedVillmReference

    out = tmp_path / "mlp2"
    res = cli("convert-qwen-vl", "--src", str(source), "--out", str(out),
                          "--temporal-module", "mlp2", "--spatial-path", "tokenwise", "--pad-temporal-to", "none",
                          "--num-frames", "8", "--max-frames", "64", "--seed", "3")
    assert res.returncode == 0, res.stderr
    new = {k: tuple(v.shape) for k, v in tensors(out).items() if k.startswith(MODULES)}
    assert new == {f"transformer.visual.{m}.{k}": s for m in ("temporal_module", "spatial_module")
                   for k, s in (("0.weight", (128, 64)), ("0.bias", (128,)), ("2.weight", (128, 128)),
                                ("2.bias", (128,)))}
    ref = RedVillmReference.from_pretrained(str(out))
    cfg = ref.config
    assert (cfg.temporal_module, cfg.spatial_path, cfg.pad_temporal_to, cfg.num_frames, cfg.max_frames) == (
        "mlp2", "tokenwise", None, 8, 64)
    assert cfg.video_tokens(3) == 3 + 1024


def test_bin_weights_are_streamed_to_safetensors(demo_dir, ranks, tmp_path):
    from framewise.model_plugins.reference.red_villm import RedVillmReference

    src = write_source(demo_dir, ranks, tmp_path / "bin-src", weights="bin")
    out = qwen_vl_to_red_villm(src, tmp_path / "bin-out")
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    converted = tensors(out)
    for key, tensor in tensors(src).items():
        assert same_bytes(converted[key], tensor), key
    RedVillmReference.from_pretrained(str(out))


def test_trained_modules_in_the_source_are_kept(demo_dir, ranks, tmp_path):
    src = write_source(demo_dir, ranks, tmp_path / "trained", keep_modules=True)
    out = qwen_vl_to_red_villm(src, tmp_path / "kept")
    assert same_bytes(tensors(out)["transformer.visual.temporal_module.weight"],
                      tensors(src)["transformer.visual.temporal_module.weight"])
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in src.glob("*.safetensors"))
    with pytest.raises(ValueError, match="already holds a linear temporal_module; --temporal-module mlp2"):
        qwen_vl_to_red_villm(src, tmp_path / "contradiction", temporal_module="mlp2")


def test_non_qwen_vl_sources_are_refused(source, tmp_path):
    def variant(name: str, edit) -> Path:
        d = tmp_path / name
        d.mkdir()
        for f in source.iterdir():
            os.link(f, d / f.name)
        cfg = json.loads((source / "config.json").read_text())
        edit(cfg)
        (d / "config.json").unlink()
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    llava = variant("llava", lambda c: c.update(model_type="llava"))
    with pytest.raises(ValueError, match="'llava' checkpoint, not Qwen-VL"):
        qwen_vl_to_red_villm(llava, tmp_path / "o1")
    qwen7b = variant("qwen7b", lambda c: c.pop("visual"))
    with pytest.raises(ValueError, match="a Qwen\\(-1\\) LLM without 'visual' checkpoint, not Qwen-VL"):
        qwen_vl_to_red_villm(qwen7b, tmp_path / "o2")
    gptq = variant("gptq", lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}))
    with pytest.raises(ValueError, match="quantized \\(gptq\\)"):
        qwen_vl_to_red_villm(gptq, tmp_path / "o3")
    deeper = variant("deeper", lambda c: c.update(num_hidden_layers=3))
    with pytest.raises(ValueError, match="missing transformer.h.2.attn.c_attn.bias"):
        qwen_vl_to_red_villm(deeper, tmp_path / "o4")
    shifted = variant("shifted", lambda c: c["visual"].update(image_start_id=c["visual"]["image_start_id"] - 1))
    with pytest.raises(ValueError, match="qwen.tiktoken puts <img> at .* but config visual.image_start_id is"):
        qwen_vl_to_red_villm(shifted, tmp_path / "o6")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("o")]  # refused before writing anything
    res = cli("convert-qwen-vl", "--src", str(llava),
                          "--out", str(tmp_path / "o5"))
    assert res.returncode == 2 and "not Qwen-VL" in res.stderr and not (tmp_path / "o5").exists()


def test_demo_model_cli_red_villm(tmp_path):
    from framewise.model_plugins.reference.red_villm import RedVillmReference

    out = tmp_path / "demo"
    res = cli("demo-model", "--arch", "red-villm", "--out", str(out))
    assert res.returncode == 0, res.stderr
    ref = RedVillmReference.from_pretrained(str(out))
    assert json.loads((out / "config.json").read_text())["architectures"] == ["RedVillmForConditionalGeneration"]
    assert ref.config.video_tokens(4) == 356
