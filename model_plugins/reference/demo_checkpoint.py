"""Tiny random checkpoints in the real layout (config, safetensors, tokenizer, preprocessor).

Used by ``framewise demo-model`` and by the tests: nothing can be downloaded here,
and a tiny model keeps a CPU test fast while exercising the exact code paths a
real llava-hf checkpoint takes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from model_plugins.chat_template import LLAVA_15_CHAT_TEMPLATE

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
    from model_plugins.configs import TCLlavaConfig

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
    from model_plugins.preprocess import ImageProcessorConfig
    from model_plugins.reference.tc_llava import TCLlavaReference

    tokenizer = build_tokenizer(video_token=video_token)
    config = tc_llava_config(tokenizer, vocab_size=vocab_size, **config_overrides)
    size = config.vision_config.image_size
    ipc = ImageProcessorConfig(shortest_edge=size, crop_size=size)
    torch.manual_seed(seed)
    model = TCLlavaReference(config, ipc)
    init_random_(model, seed)
    return save_checkpoint(out_dir, config, tokenizer, model, ipc)


def save_checkpoint(out_dir: str, config, tokenizer, model: torch.nn.Module, ipc) -> str:
    """Write config, tokenizer, safetensors, preprocessor and generation config atomically."""
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=parent)
    try:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
            json.dump(ipc.to_dict(), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                       "pad_token_id": tokenizer.pad_token_id}, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def video_ccam_config(tokenizer, **overrides):
    from model_plugins.configs import VideoCCAMConfig

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
    from model_plugins.preprocess import ImageProcessorConfig
    from model_plugins.reference.video_ccam import VideoCCAMReference

    tokenizer = build_tokenizer()
    config = video_ccam_config(tokenizer, **config_overrides)
    ipc = ImageProcessorConfig.siglip(config.vision_config.image_size)
    torch.manual_seed(seed)
    model = VideoCCAMReference(config, ipc)
    init_random_(model, seed)
    return save_checkpoint(out_dir, config, tokenizer, model, ipc)


WRITERS = {"tc-llava": write_tc_llava, "video-ccam": write_video_ccam}


def write_demo_checkpoint(arch: str, out_dir: str, **overrides) -> str:
    try:
        writer = WRITERS[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(WRITERS)}") from None
    return writer(out_dir, **overrides)
