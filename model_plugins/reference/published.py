"""Random checkpoints laid out like the published repositories, at their published token geometry.

A tiny demo checkpoint hides the arithmetic a real one meets first (576 tokens per frame, a 152k-row
vocabulary, special tokens at ids past 151k, a chat template that only takes string content). These
writers keep every width tiny (a CPU test loads them in seconds) but copy what decides token counts and
prompts from the published repositories (notes/spec-*.md):

=============  ===================================  ==========================================================
family         source layout                         published geometry kept
=============  ===================================  ==========================================================
TC-LLaVA       llava-hf/llava-1.5-7b-hf             CLIP-L/14 at 336 px (24 x 24 = 576 per frame), vocab 32064,
                                                    ``<image>`` 32000, ``<pad>`` 32001, context 4096
Video-CCAM     JaronTHU/Video-CCAM-7B-v1.2           SigLIP/14 at 384 px (27 x 27 = 729), 1024 queries, Qwen2.5
                                                    vocab 152064, ``<image>`` 151665, ``<video>`` 151666
STAVE          Qwen/Qwen2-VL-7B-Instruct             patch 14, merge 2, temporal patch 2, vocab 152064,
                                                    vision/pad ids 151652-151656, context 32768
RED-VILLM      Qwen/Qwen-VL-Chat                     448 px, 256 queries, ``qwen.tiktoken`` with 151643 ranks,
                                                    ``<img>`` 151857, vocab 151936
=============  ===================================  ==========================================================

The vocabularies have the published sizes and special-token ids; their ordinary tokens are a small
byte-level BPE padded with unreachable filler entries (the real merges cannot be downloaded here).
Chat templates are the published ones (Qwen2.5's without its tool-calling branch: tools are refused).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from framewise.model_plugins.reference.demo_checkpoint import _CHATML_CORPUS, _CORPUS, init_random_

# llava-hf/llava-1.5-7b-hf chat_template.json: images first, then the text of each turn
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen/Qwen2-VL-7B-Instruct chat_template.json
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] "
    "== 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value "
    "+ 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
    "video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|>"
    "<|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-7B-Instruct's template (what Video-CCAM-7B-v1.2 ships), its tool-calling branch left out: content
# is concatenated as a string, so a list of typed parts does not render (the gateway sends strings then)
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\") %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

QWEN2_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
               "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
               "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # 151643..151656
QWEN25_ADDED = QWEN2_ADDED + ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                              "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]  # .. 151664
QWEN_RANKS = 151643  # ordinary tokens of Qwen's byte-level BPE (qwen.tiktoken's lines)
LLAMA_PIECES = 32000


def _trained_bpe(head: list[str], corpus: list[str], size: int = 700) -> dict:
    """A small byte-level BPE (``head`` tokens at ids 0..) as ``tokenizer.json`` data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=head[0] if head else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=head, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 20, trainer)
    return json.loads(tok.to_str())


def padded_tokenizer(*, pieces: int, head: list[str], added: list[str], not_special: tuple[str, ...] = (),
                     corpus: list[str], chat_template: str, bos: str | None, eos: str, pad: str | None,
                     unk: str | None = None, extra_special_tokens: dict | None = None):
    """A fast tokenizer with exactly ``pieces`` ordinary entries (``head`` first, a trained BPE, then unreachable
    fillers) and the ``added`` tokens at ids ``pieces``, ``pieces + 1``, ...: the published ids."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    data = _trained_bpe(head, corpus)
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), pieces):
        vocab[f"<|filler_{i}|>"] = i  # no merge builds these: never produced from text
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in head]
    for i, content in enumerate(added):
        data["added_tokens"].append({"id": pieces + i, "content": content, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": content not in not_special})
    tok = Tokenizer.from_str(json.dumps(data))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    for i, content in enumerate(added):
        if tok.token_to_id(content) != pieces + i:
            raise AssertionError(f"{content!r} landed on {tok.token_to_id(content)}, not {pieces + i}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=unk, chat_template=chat_template, clean_up_tokenization_spaces=False,
                                   **({"extra_special_tokens": extra_special_tokens} if extra_special_tokens else {}))
    return fast


def save_sharded(out: Path, state: dict[str, torch.Tensor], shards: int, dtype=torch.bfloat16) -> None:
    """``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, as the hub repositories are."""
    keys = sorted(state)
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i * per:(i + 1) * per]
        save_file({k: state[k].detach().to(dtype).contiguous() for k in part}, out / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    size = sum(v.numel() * v.element_size() for v in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2))


def _json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _fresh(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    return out


# ---- llava-hf/llava-1.5-7b-hf (-> convert-llava -> TC-LLaVA) ----------------------------------------------


def llava_hf_tokenizer():
    """Llama-2's 32000 pieces (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2), then ``<image>`` 32000 and ``<pad>`` 32001."""
    return padded_tokenizer(pieces=LLAMA_PIECES, head=["<unk>", "<s>", "</s>"], added=["<image>", "<pad>"],
                            corpus=_CORPUS, chat_template=LLAVA_HF_CHAT_TEMPLATE, bos="<s>", eos="</s>",
                            pad="<pad>", unk="<unk>", extra_special_tokens={"image_token": "<image>"})


def write_llava_hf(out: str | os.PathLike, *, seed: int = 0) -> Path:
    """llava-1.5-7b-hf's repository at its geometry: 3 shards with the legacy key names it ships
    (``language_model.model.*``, ``vision_tower.*``, ``multi_modal_projector.*``), 32064 embedding rows."""
    from framewise.model_plugins.preprocess import ImageProcessorConfig
    from framewise.model_plugins.reference.demo_checkpoint import tc_llava_config
    from framewise.model_plugins.reference.tc_llava import TCLlavaReference

    out = _fresh(out)
    tokenizer = llava_hf_tokenizer()
    cfg = tc_llava_config(tokenizer, vocab_size=32064, image_seq_length=576, video_token_index=32064)
    cfg.vision_config.image_size = 336
    cfg.text_config.max_position_embeddings = 4096
    ipc = ImageProcessorConfig(shortest_edge=336, crop_size=336)
    torch.manual_seed(seed)
    model = TCLlavaReference(cfg, ipc)
    init_random_(model, seed)
    save_sharded(out, model.state_dict(), 3)
    vision = {k: v for k, v in cfg.vision_config.to_dict().items()
              if k in ("hidden_size", "image_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                       "patch_size", "projection_dim", "hidden_act", "layer_norm_eps")}
    text = {k: v for k, v in cfg.text_config.to_dict().items()
            if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "vocab_size",
                     "tie_word_embeddings")}
    _json(out / "config.json", {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "ignore_index": -100,
        "image_token_index": 32000, "pad_token_id": 32001, "image_seq_length": 576, "projector_hidden_act": "gelu",
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "torch_dtype": "float16",
        "tie_word_embeddings": False, "transformers_version": "4.36.0.dev0",
        "vision_config": {"model_type": "clip_vision_model", **vision},
        "text_config": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "rope_theta": 10000.0,
                        "torch_dtype": "float16", **text},
    })
    tokenizer.save_pretrained(out)
    _json(out / "chat_template.json", {"chat_template": LLAVA_HF_CHAT_TEMPLATE})
    _json(out / "preprocessor_config.json", {
        "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336}})
    _json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001})
    return out


# ---- Qwen2-VL-7B-Instruct (-> convert-qwen2vl -> STAVE) ---------------------------------------------------


def qwen2_tokenizer(added: list[str], template: str, *, extra_corpus: list[str] = ()):
    not_special = tuple(t for t in QWEN25_ADDED[len(QWEN2_ADDED):])
    return padded_tokenizer(pieces=QWEN_RANKS, head=[], added=added, not_special=not_special,
                            corpus=_CORPUS + _CHATML_CORPUS + list(extra_corpus), chat_template=template, bos=None,
                            eos="<|im_end|>", pad="<|endoftext|>")


def write_qwen2_vl(out: str | os.PathLike, *, seed: int = 0) -> Path:
    """Qwen2-VL-7B-Instruct's repository at its token geometry: transformers' original key names
    (``visual.*``, ``model.*``, ``lm_head.*``) in 5 shards, vocab 152064, its preprocessor (min/max pixels
    3136 / 12845056) and chat template."""
    from framewise.model_plugins.reference.demo_checkpoint import qwen2vl_preprocessor_config, stave_config
    from framewise.model_plugins.reference.stave import StaveReference, to_original_qwen2vl_keys

    out = _fresh(out)
    tokenizer = qwen2_tokenizer(QWEN2_ADDED, QWEN2_VL_CHAT_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    cfg = stave_config(tokenizer)
    cfg.text_config.vocab_size = cfg.vocab_size = 152064
    cfg.text_config.max_position_embeddings = 32768
    torch.manual_seed(seed)
    model = StaveReference(cfg)
    init_random_(model, seed)
    state = {k: v for k, v in to_original_qwen2vl_keys(model.state_dict()).items()
             if ".norm3." not in k and ".temp_attn." not in k}  # stock Qwen2-VL: no temporal layers
    save_sharded(out, state, 5)
    vc = {k: cfg.vision_config.to_dict()[k] for k in ("depth", "embed_dim", "hidden_size", "hidden_act",
                                                      "mlp_ratio", "num_heads", "in_channels", "patch_size",
                                                      "spatial_merge_size", "temporal_patch_size")}
    tc = cfg.text_config
    _json(out / "config.json", {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "attention_dropout": 0.0, "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
        "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>"),
        "vision_token_id": ids("<|vision_pad|>"), "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"), "hidden_act": "silu", "hidden_size": tc.hidden_size,
        "initializer_range": 0.02, "intermediate_size": tc.intermediate_size, "max_position_embeddings": 32768,
        "max_window_layers": 28, "num_attention_heads": tc.num_attention_heads,
        "num_hidden_layers": tc.num_hidden_layers, "num_key_value_heads": tc.num_key_value_heads,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
        "vision_config": vc, "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
        "vocab_size": 152064,
    })
    tokenizer.save_pretrained(out)
    _json(out / "chat_template.json", {"chat_template": QWEN2_VL_CHAT_TEMPLATE})
    _json(out / "preprocessor_config.json", qwen2vl_preprocessor_config(3136, 12845056))
    _json(out / "generation_config.json", {
        "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
        "repetition_penalty": 1.05, "temperature": 0.1, "top_k": 1, "top_p": 0.001})
    return out


# ---- Video-CCAM-7B-v1.2 (served as it is published) ------------------------------------------------------


def write_video_ccam_v12(out: str | os.PathLike, *, seed: int = 0) -> Path:
    """Video-CCAM-7B-v1.2's layout (model_type ``videoccam``, 4 shards) at its geometry: SigLIP/14 at 384 px
    (729 patches per frame), a 1024-query projector, Qwen2.5's vocabulary (152064 rows) with ``<image>`` 151665
    and ``<video>`` 151666, eos 151645/151643, Qwen2.5's chat template (string content)."""
    from framewise.model_plugins.preprocess import ImageProcessorConfig
    from framewise.model_plugins.reference.demo_checkpoint import video_ccam_config
    from framewise.model_plugins.reference.video_ccam import VideoCCAMReference

    out = _fresh(out)
    tokenizer = qwen2_tokenizer(QWEN25_ADDED + ["<image>", "<video>"], QWEN25_CHAT_TEMPLATE)
    config = video_ccam_config(tokenizer)
    config.vision_config.image_size = 384
    config.text_config.vocab_size = 152064
    config.text_config.max_position_embeddings = 32768
    config.text_config.bos_token_id = None
    config.text_config.eos_token_id = 151645
    config.projector_config["num_query"] = 1024
    ipc = ImageProcessorConfig.siglip(384)
    torch.manual_seed(seed)
    model = VideoCCAMReference(config, ipc)
    init_random_(model, seed)
    save_sharded(out, model.state_dict(), 4)
    config.architectures = ["VideoCCAM"]
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _json(out / "preprocessor_config.json", ipc.to_dict())
    _json(out / "generation_config.json", {"bos_token_id": 151643, "eos_token_id": [151645, 151643],
                                           "pad_token_id": 151643})
    return out


# ---- Qwen-VL-Chat (-> convert-qwen-vl -> RED-VILLM) -------------------------------------------------------


def qwen_tiktoken_ranks() -> dict[bytes, int]:
    """151643 ranks: a small byte-level BPE in merge order, then fillers that begin with 0xF8 (a byte UTF-8
    text never holds, so no text reaches them)."""
    from framewise.model_plugins.tiktoken_convert import _byte_to_unicode

    unbyte = {c: b for b, c in _byte_to_unicode().items()}
    data = _trained_bpe([], _CORPUS + _CHATML_CORPUS + ["Picture 1: <img></img>\nVideo 1: <img><imgpad></img>\n"])
    ranks = {bytes(unbyte[c] for c in token): i for token, i in sorted(data["model"]["vocab"].items(),
                                                                         key=lambda kv: kv[1])}
    assert sorted(ranks.values()) == list(range(len(ranks)))
    for i in range(len(ranks), QWEN_RANKS):
        ranks[b"\xf8" + i.to_bytes(3, "big")] = i
    return ranks


def write_qwen_vl_chat(out: str | os.PathLike, *, seed: int = 0) -> Path:
    """Qwen-VL-Chat's repository at its geometry: ``qwen.tiktoken`` (151643 ranks; ``<img>`` at 151857),
    vocab 151936, 448 px / patch 14 / 256 queries, ``transformer.*`` weights in 10 shards, its remote-code
    file names (not run: the converter writes a ``tokenizer.json``)."""
    import base64

    from framewise.model_plugins.reference.demo_checkpoint import (
        build_qwen_vl_tokenizer,
        random_red_villm,
        red_villm_config,
    )
    from framewise.model_plugins.tiktoken_convert import qwen_vl_special_tokens

    out = _fresh(out)
    ranks = qwen_tiktoken_ranks()
    special = qwen_vl_special_tokens(len(ranks))
    config = red_villm_config(build_qwen_vl_tokenizer(), vocab_size=151936, seq_length=2048,
                              max_position_embeddings=8192, visual={"image_start_id": special["<img>"]},
                              bos_token_id=special["<|endoftext|>"], eos_token_id=special["<|im_end|>"],
                              pad_token_id=special["<|endoftext|>"])
    model = random_red_villm(config, seed)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith(("transformer.visual.temporal_module.", "transformer.visual.spatial_module."))}
    save_sharded(out, state, 10)
    visual = {k: v for k, v in config.visual.items() if k != "n_queries"}  # Qwen-VL does not write it
    keep = ("hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels", "intermediate_size",
            "layer_norm_epsilon", "rotary_emb_base", "seq_length", "max_position_embeddings", "use_dynamic_ntk",
            "use_logn_attn", "no_bias", "vocab_size", "tie_word_embeddings")
    _json(out / "config.json", {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "visual": visual, "rotary_pct": 1.0,
        **{k: getattr(config, k) for k in keep},
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "bf16": True, "fp16": False, "fp32": False, "attn_dropout_prob": 0.0, "emb_dropout_prob": 0.0,
        "initializer_range": 0.02, "onnx_safe": None, "scale_attn_weights": True,
        "tokenizer_type": "QWenTokenizer", "use_cache": True, "use_flash_attn": "auto",
        "transformers_version": "4.31.0"})
    _json(out / "generation_config.json", {
        "chat_format": "chatml", "eos_token_id": special["<|endoftext|>"], "pad_token_id": special["<|endoftext|>"],
        "max_window_size": 6144, "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.3})
    _json(out / "tokenizer_config.json", {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
                                          "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}})
    with open(out / "qwen.tiktoken", "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    for name in ("tokenization_qwen.py", "modeling_qwen.py", "configuration_qwen.py", "visual.py",
                 "qwen_generation_utils.py"):
        (out / name).write_text("# Qwen's remote code (not used by the converted checkpoint)\n")
    return out


SOURCES = {"tc-llava": write_llava_hf, "stave": write_qwen2_vl, "red-villm": write_qwen_vl_chat,
           "video-ccam": write_video_ccam_v12}


def write_real_shape(arch: str, out: str | os.PathLike, *, seed: int = 0) -> tuple[Path, Path | None]:
    """The published-layout repository of ``arch`` at real shape, converted where the family needs it:
    returns ``(servable, source)``: the source is written beside ``out`` as ``<out>.source`` (the converters
    link its weights) and is None for Video-CCAM v1.2, which is served as published."""
    from framewise.model_plugins import convert

    out = Path(out)
    if arch not in SOURCES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(SOURCES)}")
    if arch == "video-ccam":
        return write_video_ccam_v12(out, seed=seed), None
    src = SOURCES[arch](out.with_name(out.name + ".source"), seed=seed)
    if arch == "tc-llava":
        convert.llava_to_tc_llava(src, out)
    elif arch == "stave":
        convert.qwen2vl_to_stave(src, out, seed=seed)
    else:
        convert.qwen_vl_to_red_villm(src, out, seed=seed)
    return out, src
