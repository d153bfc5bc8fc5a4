"""Turn a llava-hf checkpoint (e.g. llava-1.5-7b-hf) into a servable TC-LLaVA checkpoint.

Weights are not copied or changed (hard links, or symlinks across filesystems):
TC-LLaVA is LLaVA-1.5 plus config keys and a ``<video>`` token. A TC-LLaVA
fine-tune saved in llava-hf layout converts the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja")


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        os.symlink(src.resolve(), dst)


def llava_to_tc_llava(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    gamma: float = 1.0,
    frame_block_mask: bool = True,
    frame_pooling: int = 1,
    num_frames: int = 8,
    max_frames: int = 32,
) -> Path:
    from transformers import AutoTokenizer

    src, out = Path(src), Path(out)
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") not in ("llava", "tc_llava"):
        raise ValueError(f"{src} is a {cfg.get('model_type')!r} checkpoint, not llava-hf")
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(src)
    if "<video>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<video>"]}, replace_extra_special_tokens=False)
    video_id = tokenizer.convert_tokens_to_ids("<video>")
    vocab_size = cfg.get("text_config", {}).get("vocab_size") or cfg.get("vocab_size")
    if vocab_size is not None and video_id >= vocab_size:
        raise ValueError(f"<video> got id {video_id}, outside the model's {vocab_size}-row embedding")
    image_id = cfg.get("image_token_index", cfg.get("image_token_id"))
    if image_id is None:
        image_id = tokenizer.convert_tokens_to_ids("<image>")

    cfg.update(
        model_type="tc_llava",
        architectures=["TCLlavaForConditionalGeneration"],
        image_token_index=image_id,
        video_token_index=video_id,
        temporal_rope_gamma=gamma,
        frame_block_mask=frame_block_mask,
        is_mm_prefix_lm=frame_block_mask,
        frame_pooling=frame_pooling,
        num_frames=num_frames,
        max_frames=max_frames,
    )
    cfg.pop("image_token_id", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tokenizer.save_pretrained(out)

    for f in src.iterdir():
        target = out / f.name
        if f.name.endswith(WEIGHT_SUFFIXES) and not target.exists():
            _link(f, target)
        elif f.name in ("preprocessor_config.json", "generation_config.json", "processor_config.json") or (
            f.name in TOKENIZER_FILES and not target.exists()
        ):
            shutil.copy(f, target)
    return out


# ---- Video-CCAM v1.0 (base LLM + LoRA adapters + projector) -> v1.2 layout -------------------

PROJECTOR_FIELDS = ("num_query", "hidden_size", "cross_hidden_size", "num_heads", "num_key_value_heads",
                    "attention_bias", "intermediate_size", "hidden_act", "mlp_bias", "layer_norm_eps", "dropout",
                    "attention_dropout", "output_size", "query_self_attention", "output_norm")


def _load_safetensors_dir(path: Path) -> dict:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [f.name for f in path.glob("*.safetensors")]
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    state = {}
    for name in files:
        state.update(load_file(path / name))
    return state


def merge_lora(state: dict, adapter_dir: Path, *, strip_prefix: str = "base_model.model.") -> int:
    """W += scale * B @ A for every LoRA pair of a PEFT adapter (scale = alpha / r, or
    alpha / sqrt(r) with rsLoRA). Returns the number of merged weights."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
    scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    merged = 0
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        module = key[len(strip_prefix):] if key.startswith(strip_prefix) else key
        module = module.split(".lora_A.")[0]
        target = f"{module}.weight"
        if target not in state:
            raise KeyError(f"LoRA adapter {adapter_dir.name} targets {target}, which the base weights lack")
        w = state[target]
        state[target] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
        merged += 1
    if merged == 0:
        raise ValueError(f"no LoRA weights found in {adapter_dir}")
    return merged


def video_ccam_v10_to_v12(v10: str | os.PathLike, base_llm: str | os.PathLike, vision: str | os.PathLike,
                          out: str | os.PathLike, *, num_frames: int = 16, max_frames: int = 96) -> Path:
    """Merge a Video-CCAM v1.0 release (projector/, llm_adapter/, visual_encoder_adapter/) with its
    base LLM and SigLIP into one v1.2-layout checkpoint Framewise serves."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    from model_plugins.configs import VideoCCAMConfig
    from model_plugins.preprocess import ImageProcessorConfig

    v10, base_llm, vision, out = Path(v10), Path(base_llm), Path(vision), Path(out)
    llm_state = _load_safetensors_dir(base_llm)
    if (v10 / "llm_adapter").exists():
        merge_lora(llm_state, v10 / "llm_adapter")
    vis_state = {k if k.startswith("vision_model.") else f"vision_model.{k}": v
                 for k, v in _load_safetensors_dir(vision).items() if not k.startswith("text_model.")}
    if (v10 / "visual_encoder_adapter").exists():
        merge_lora(vis_state, v10 / "visual_encoder_adapter")
    proj_state = _load_safetensors_dir(v10 / "projector")

    vis_cfg = AutoConfig.from_pretrained(vision)
    vis_cfg = getattr(vis_cfg, "vision_config", vis_cfg)
    text_cfg = AutoConfig.from_pretrained(base_llm)
    proj_raw = json.loads((v10 / "projector" / "config.json").read_text())
    projector_config = {k: proj_raw[k] for k in PROJECTOR_FIELDS if k in proj_raw}

    tokenizer = AutoTokenizer.from_pretrained(base_llm)
    missing = [t for t in ("<image>", "<video>") if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    image_id, video_id = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("<video>")
    if max(image_id, video_id) >= text_cfg.vocab_size:
        raise ValueError(f"<image>/<video> ids {image_id}/{video_id} fall outside the LLM's {text_cfg.vocab_size} "
                         "embedding rows")
    config = VideoCCAMConfig(
        architectures=["VideoCCAM"], vision_config=vis_cfg.to_dict(), text_config=text_cfg.to_dict(),
        projector_config=projector_config, image_token_id=image_id, video_token_id=video_id,
        vision_select_layer=int(proj_raw.get("visual_select_layer", -2)), num_frames=num_frames,
        max_frames=max_frames, dtype=str(getattr(text_cfg, "dtype", None) or "bfloat16").replace("torch.", ""))

    out.mkdir(parents=True, exist_ok=True)
    state = {**{f"llm.{k}": v for k, v in llm_state.items()},
             **{f"vision_encoder.{k}": v for k, v in vis_state.items()},
             **{f"projector.{k}": v for k, v in proj_state.items()}}
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(
        json.dumps(ImageProcessorConfig.siglip(config.vision_config.image_size).to_dict(), indent=2))
    if (base_llm / "generation_config.json").exists():
        shutil.copy(base_llm / "generation_config.json", out)
    return out
