"""Tiny random checkpoints in the real layout (config, safetensors, tokenizer, preprocessor).

Used by ``framewise demo-model`` and by the tests: nothing can be downloaded here,
and a tiny model keeps a CPU test fast while exercising the exact code paths a
real llava-hf checkpoint takes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from framewise.model_plugins.chat_template import LLAVA_15_CHAT_TEMPLATE

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]

CHAT_TEMPLATE = LLAVA_15_CHAT_TEMPLATE

_CORPUS = [
    "USER: What happens in this video? ASSISTANT: A person walks across the room and opens a door.",
    "Describe the video in detail. The camera pans left while a red ball rolls over the floor.",
    "What is the man holding? He is holding a cup of coffee and a newspaper.",
    "How many people are in the image? There are three people standing next to a car.",
    "What color is the cat? The cat is black with white paws, sitting on the sofa.",
    "Summarize the events in order: first, then, after that, finally, the end of the clip.",
    "Is it day or night? It is night; the street lights are on and the sky is dark.",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 , . ? ! : ; ' \"",
]


def build_tokenizer(vocab_size: int = 512, *, video_token: bool = True):
    """A byte-level BPE tokenizer with ``<image>``/``<video>`` and a chat template.

    ``video_token=False`` gives an image-only llava-hf style tokenizer (tests of the converter).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS if video_token else [t for t in SPECIAL_TOKENS if t != "<video>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", **({"video_token": "<video>"} if video_token else {})},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def init_random_(model: torch.nn.Module, seed: int) -> None:
    """Scale-aware random init that gives the tiny model confident, varied logits
    (so greedy decoding has clear winners) and non-trivial norms and biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                std = 1.0 if "embed_tokens" in name or "position_embedding" in name else 1 / math.sqrt(fan_in)
                if "lm_head" in name:
                    std = 3 / math.sqrt(fan_in)
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("weight"):  # norms
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:  # biases
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def tc_llava_config(tokenizer, *, vocab_size: int | None = None, **overrides):
    from framewise.model_plugins.configs import TCLlavaConfig

    vocab = vocab_size or len(tokenizer)
    cfg = dict(
        architectures=["TCLlavaForConditionalGeneration"],
        vision_config=dict(
            model_type="clip_vision_model", image_size=56, patch_size=14, hidden_size=64,
            intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, projection_dim=64,
            hidden_act="quick_gelu", layer_norm_eps=1e-5,
        ),
        text_config=dict(
            model_type="llama", vocab_size=vocab, hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
            max_position_embeddings=4096, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>") if "<video>" in tokenizer.get_vocab() else vocab,
        image_seq_length=16,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        temporal_rope_gamma=1.0,
        frame_block_mask=True,
        is_mm_prefix_lm=True,
        frame_pooling=1,
        num_frames=8,
        max_frames=16,
        dtype="float32",
    )
    cfg.update(overrides)
    return TCLlavaConfig(**cfg)


def write_tc_llava(out_dir: str, *, seed: int = 0, video_token: bool = True, vocab_size: int | None = None,
                   **config_overrides) -> str:
    """Write a tiny random TC-LLaVA checkpoint to ``out_dir`` (atomically) and return it."""
    from framewise.model_plugins.preprocess import ImageProcessorConfig
    from framewise.model_plugins.reference.tc_llava import TCLlavaReference

    tokenizer = build_tokenizer(video_token=video_token)
    config = tc_llava_config(tokenizer, vocab_size=vocab_size, **config_overrides)
    size = config.vision_config.image_size
    ipc = ImageProcessorConfig(shortest_edge=size, crop_size=size)
    torch.manual_seed(seed)
    model = TCLlavaReference(config, ipc)
    init_random_(model, seed)
    return save_checkpoint(out_dir, config, tokenizer, model, ipc)


def save_checkpoint(out_dir: str, config, tokenizer, model: torch.nn.Module, ipc,
                    json_files: dict[str, dict] | None = None, rename=None) -> str:
    """Write config, tokenizer, safetensors, preprocessor and generation config atomically.

    ``json_files``: more (or replacement) JSON files, by name (a non-CLIP preprocessor config);
    ``rename``: maps the state dict to the on-disk key names."""
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=parent)
    try:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if rename is not None:
            state = rename(state)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if ipc is not None:
            with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
                json.dump(ipc.to_dict(), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                       "pad_token_id": tokenizer.pad_token_id}, f, indent=2)
        for name, data in (json_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(data, f, indent=2)
        for _ in range(5):  # another writer (a second `make demo-model`) may replace out_dir meanwhile
            if os.path.exists(out_dir):
                old = tempfile.mkdtemp(prefix=".old-", dir=parent)
                with contextlib.suppress(FileNotFoundError):
                    os.replace(out_dir, old)
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.replace(tmp, out_dir)
                break
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        else:
            raise OSError(f"{out_dir} kept being replaced by another writer")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def video_ccam_config(tokenizer, **overrides):
    from framewise.model_plugins.configs import VideoCCAMConfig

    cfg = dict(
        architectures=["VideoCCAM"],
        vision_config=dict(
            model_type="siglip_vision_model", image_size=28, patch_size=14, hidden_size=64, intermediate_size=128,
            num_hidden_layers=3, num_attention_heads=2, layer_norm_eps=1e-6, vision_use_head=False,
        ),
        text_config=dict(
            model_type="qwen2", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
            rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        ),
        projector_config=dict(
            num_query=32, hidden_size=64, cross_hidden_size=64, num_heads=2, num_key_value_heads=2,
            attention_bias=True, intermediate_size=128, hidden_act="swiglu", mlp_bias=True, layer_norm_eps=1e-5,
            dropout=0.1, attention_dropout=0.1, output_size=128, query_self_attention=False, output_norm=False,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_select_layer=-2,
        ccam_mask_rule="start",
        num_frames=16,
        max_frames=96,
        dtype="float32",
    )
    cfg.update(overrides)
    return VideoCCAMConfig(**cfg)


def write_video_ccam(out_dir: str, *, seed: int = 0, **config_overrides) -> str:
    """A tiny random Video-CCAM checkpoint in the v1.2 layout."""
    from framewise.model_plugins.preprocess import ImageProcessorConfig
    from framewise.model_plugins.reference.video_ccam import VideoCCAMReference

    tokenizer = build_tokenizer()
    config = video_ccam_config(tokenizer, **config_overrides)
    ipc = ImageProcessorConfig.siglip(config.vision_config.image_size)
    torch.manual_seed(seed)
    model = VideoCCAMReference(config, ipc)
    init_random_(model, seed)
    return save_checkpoint(out_dir, config, tokenizer, model, ipc)


# ---- STAVE (Qwen2-VL layout) -------------------------------------------------------------------

QWEN2VL_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                          "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL's ChatML shape: default system turn, each image/video part rendered in place as
# <|vision_start|><|image_pad|/<|video_pad|><|vision_end|>, text parts verbatim.
QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] in ('video', 'video_url') or 'video' in part or 'video_url' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CHATML_CORPUS = [
    "system\nYou are a helpful assistant.", "user\nWhat happens in this video?", "assistant\n",
    "Describe this image.", "What is different between the two videos?",
]


def build_qwen2vl_tokenizer(vocab_size: int = 600):
    """A byte-level BPE tokenizer with Qwen2-VL's special tokens and ChatML template (no BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN2VL_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((_CORPUS + _CHATML_CORPUS) * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=QWEN2VL_SPECIAL_TOKENS[1:])
    fast.chat_template = QWEN2VL_CHAT_TEMPLATE
    return fast


def qwen2vl_preprocessor_config(min_pixels: int = 3136, max_pixels: int = 200704) -> dict:
    from framewise.model_plugins.preprocess import CLIP_MEAN, CLIP_STD

    return {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
        "min_pixels": min_pixels, "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "resample": 3,
    }


def stave_config(tokenizer, **overrides):
    from framewise.model_plugins.configs import StaveQwen2VLConfig

    ids = tokenizer.convert_tokens_to_ids
    cfg = dict(
        architectures=["StaveQwen2VLForConditionalGeneration"],
        vision_config=dict(depth=2, embed_dim=160, hidden_size=128, hidden_act="quick_gelu", mlp_ratio=2,
                           num_heads=2, in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1000000.0},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
            tie_word_embeddings=False, use_sliding_window=False,
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
        tie_word_embeddings=False,
        temporal_heads_scale=0.25,
        temporal_output_layout="released",
        temporal_rope_theta=10000.0,
        dtype="float32",
    )
    cfg.update(overrides)
    return StaveQwen2VLConfig(**cfg)


def write_stave(out_dir: str, *, seed: int = 0, zero_temporal_proj: bool = False, **config_overrides) -> str:
    """A tiny random STAVE checkpoint in the Qwen2-VL layout, with the key names transformers writes
    (``visual.*``, ``model.*``, ``lm_head.*``) plus ``visual.blocks.{i}.{norm3,temp_attn.*}``.
    Temporal weights are random too, unless ``zero_temporal_proj``: then ``temp_attn.proj`` is
    zero and the model is plain Qwen2-VL."""
    from framewise.model_plugins.reference.stave import StaveReference, to_original_qwen2vl_keys

    tokenizer = build_qwen2vl_tokenizer()
    config = stave_config(tokenizer, **config_overrides)
    torch.manual_seed(seed)
    model = StaveReference(config)
    init_random_(model, seed)
    if zero_temporal_proj:
        with torch.no_grad():
            for blk in model.model.visual.blocks:
                blk.temp_attn.proj.weight.zero_()
                blk.temp_attn.proj.bias.zero_()
    ids = tokenizer.convert_tokens_to_ids
    generation = {"bos_token_id": ids("<|endoftext|>"), "eos_token_id": [ids("<|im_end|>"), ids("<|endoftext|>")],
                  "pad_token_id": ids("<|endoftext|>")}
    return save_checkpoint(out_dir, config, tokenizer, model, None,
                           {"preprocessor_config.json": qwen2vl_preprocessor_config(),
                            "generation_config.json": generation}, rename=to_original_qwen2vl_keys)


# ---- RED-VILLM (Qwen-VL layout) ------------------------------------------------------------------

QWEN_VL_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<imgpad>"]

_QWEN_VL_CORPUS = ["Picture 1: a frame.", "Video 1: a clip.", "Picture 2: another image.",
                   "What is happening in the video?"]


def build_qwen_vl_tokenizer(vocab_size: int = 600):
    """A byte-level BPE tokenizer with Qwen-VL's ChatML specials and its image tags ``<img>``,
    ``</img>``, ``<imgpad>`` (consecutive ids, as in Qwen-VL), eos ``<|im_end|>``, Qwen-VL's chat
    template (no BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from framewise.model_plugins.chat_template import QWEN_VL_CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_VL_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((_CORPUS + _CHATML_CORPUS + _QWEN_VL_CORPUS) * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=QWEN_VL_SPECIAL_TOKENS[1:])
    fast.chat_template = QWEN_VL_CHAT_TEMPLATE
    ids = [fast.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<imgpad>")]
    if ids != [ids[0], ids[0] + 1, ids[0] + 2]:
        raise AssertionError(f"<img>, </img>, <imgpad> must have consecutive ids, got {ids}")
    return fast


def red_villm_config(tokenizer, **overrides):
    """A tiny ``red_villm`` config; ``visual`` overrides merge into the tiny vision defaults."""
    from framewise.model_plugins.configs.red_villm import RedVillmConfig

    ids = tokenizer.convert_tokens_to_ids
    visual = dict(heads=4, image_size=448, image_start_id=ids("<img>"), layers=2, mlp_ratio=2.0,
                  output_dim=128, patch_size=14, width=64, n_queries=256)
    visual.update(overrides.pop("visual", None) or {})
    cfg = dict(
        architectures=["RedVillmForConditionalGeneration"],
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=2, kv_channels=64,
        intermediate_size=512, layer_norm_epsilon=1e-6, rotary_emb_base=10000.0, seq_length=4096,
        max_position_embeddings=8192, use_dynamic_ntk=True, use_logn_attn=True, no_bias=True,
        tie_word_embeddings=False, visual=visual,
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        dtype="float32",
    )
    cfg.update(overrides)
    return RedVillmConfig(**cfg)


def random_red_villm(config, seed: int):
    """A randomly initialised RED-VILLM reference model; the adapter's ``pos_embed`` keeps its sin-cos table."""
    from framewise.model_plugins.reference.red_villm import RedVillmReference, sincos_2d

    torch.manual_seed(seed)
    model = RedVillmReference(config)
    init_random_(model, seed)
    pool = model.transformer.visual.attn_pool
    with torch.no_grad():
        pool.pos_embed.copy_(sincos_2d(pool.pos_embed.shape[1], math.isqrt(pool.pos_embed.shape[0])))
    return model


def write_red_villm(out_dir: str, *, seed: int = 0, **config_overrides) -> str:
    """A tiny random RED-VILLM checkpoint in Qwen-VL's layout (``transformer.*``, ``lm_head.*``) plus
    ``transformer.visual.temporal_module.*`` (and ``spatial_module.*`` for ``spatial_path=tokenwise``).
    Every RED-VILLM config key can be overridden; the adapter's ``pos_embed`` keeps its sin-cos table."""
    tokenizer = build_qwen_vl_tokenizer()
    config = red_villm_config(tokenizer, **config_overrides)
    model = random_red_villm(config, seed)
    ids = tokenizer.convert_tokens_to_ids
    generation = {"bos_token_id": ids("<|endoftext|>"), "eos_token_id": [ids("<|im_end|>"), ids("<|endoftext|>")],
                  "pad_token_id": ids("<|endoftext|>")}
    return save_checkpoint(out_dir, config, tokenizer, model, None, {"generation_config.json": generation})


WRITERS = {"tc-llava": write_tc_llava, "video-ccam": write_video_ccam, "stave": write_stave,
           "red-villm": write_red_villm}


def write_demo_checkpoint(arch: str, out_dir: str, **overrides) -> str:
    try:
        writer = WRITERS[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(WRITERS)}") from None
    return writer(out_dir, **overrides)
