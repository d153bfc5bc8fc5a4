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
