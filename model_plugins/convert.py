"""Turn a llava-hf checkpoint (e.g. llava-1.5-7b-hf) into a servable TC-LLaVA checkpoint.

Weights are not copied or changed (hard links, or symlinks across filesystems):
TC-LLaVA is LLaVA-1.5 plus config keys, a ``<video>`` token and a chat template
that places video parts. A TC-LLaVA fine-tune saved in llava-hf layout converts the
same way. Video-CCAM v1.0 releases are merged into the v1.2 layout, streamed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from framewise.model_plugins.weights import ShardWriter, iter_safetensors

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
    chat_template: str | None = None,
) -> Path:
    """Write the TC-LLaVA checkpoint. Its chat template is the source's (or ``chat_template``)
    extended to place ``{"type": "video"}`` parts as ``<video>``."""
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
    template = video_chat_template(src, tokenizer, image_token=tokenizer.convert_ids_to_tokens(image_id),
                                   chat_template=chat_template)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out)

    for f in src.iterdir():
        target = out / f.name
        if f.name.endswith(WEIGHT_SUFFIXES) and not target.exists():
            _link(f, target)
        elif f.name in ("preprocessor_config.json", "generation_config.json", "processor_config.json") or (
            f.name in TOKENIZER_FILES and not target.exists()
        ):
            shutil.copy(f, target)
    install_chat_template(out, template)
    return out


def video_chat_template(src: Path, tokenizer, *, image_token: str, chat_template: str | None = None) -> str:
    """The source's chat template extended to video parts (``model_plugins/chat_template.py``).

    The source template is the one transformers' processor would use: ``chat_template.json``
    (llava-hf's layout) before the tokenizer's own (``chat_template.jinja`` / ``tokenizer_config.json``).
    """
    from framewise.model_plugins.chat_template import with_video_parts

    def render(template: str, messages: list, add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    if chat_template is None:
        legacy = src / "chat_template.json"
        chat_template = (json.loads(legacy.read_text())["chat_template"] if legacy.exists()
                         else tokenizer.chat_template)
    if isinstance(chat_template, dict):
        chat_template = chat_template.get("default")
    return with_video_parts(chat_template, render, image_token=image_token)


def install_chat_template(out: Path, template: str) -> None:
    """Write ``template`` everywhere transformers 4.x/5.x may read one from, so no stale copy
    wins: ``chat_template.jinja`` (tokenizer, and processor without the legacy file),
    ``chat_template.json`` (the processor prefers it when present), the ``chat_template`` key
    of ``tokenizer_config.json`` (older tokenizers) and of ``processor_config.json``."""
    (out / "chat_template.jinja").write_text(template)
    legacy = out / "chat_template.json"
    if legacy.exists():
        legacy.unlink()  # replaced, never written through a link into the source
        legacy.write_text(json.dumps({"chat_template": template}, indent=2))
    for name, always in (("tokenizer_config.json", True), ("processor_config.json", False)):
        path = out / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        if always or "chat_template" in data:
            data["chat_template"] = template
            path.unlink()  # likewise
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False))


# ---- Video-CCAM v1.0 (base LLM + LoRA adapters + projector) -> v1.2 layout -------------------
# Streamed: source tensors are read one at a time, merged and written into output shards, so
# peak memory is one output shard plus the (small) adapters, not the whole model twice.

PROJECTOR_FIELDS = ("num_query", "hidden_size", "cross_hidden_size", "num_heads", "num_key_value_heads",
                    "attention_bias", "intermediate_size", "hidden_act", "mlp_bias", "layer_norm_eps", "dropout",
                    "attention_dropout", "output_size", "query_self_attention", "output_norm")


def _load_safetensors_dir(path: Path) -> dict:
    """Every tensor of a checkpoint directory in one dict (small checkpoints and tests only)."""
    return dict(iter_safetensors(path))


class LoraMerge:
    """W += scale * B @ A for every LoRA pair of a PEFT adapter (scale = alpha / r, or
    alpha / sqrt(r) with rsLoRA), applied to base weights as they stream past."""

    def __init__(self, adapter_dir: Path, *, strip_prefix: str = "base_model.model."):
        from safetensors.torch import load_file

        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        r, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
        self.scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
        self.name = adapter_dir.name
        adapter = load_file(adapter_dir / "adapter_model.safetensors")
        self.pairs: dict[str, tuple] = {}
        for key, a in adapter.items():
            if ".lora_A." not in key:
                continue
            module = key[len(strip_prefix):] if key.startswith(strip_prefix) else key
            self.pairs[f"{module.split('.lora_A.')[0]}.weight"] = (a, adapter[key.replace(".lora_A.", ".lora_B.")])
        if not self.pairs:
            raise ValueError(f"no LoRA weights found in {adapter_dir}")
        self.merged: set[str] = set()

    def __call__(self, name: str, w):
        pair = self.pairs.get(name)
        if pair is None:
            return w
        a, b = pair
        self.merged.add(name)
        return (w.float() + self.scale * (b.float() @ a.float())).to(w.dtype)

    def check(self) -> int:
        """The number of merged weights; raises if the base lacked a weight the adapter targets."""
        missing = sorted(set(self.pairs) - self.merged)
        if missing:
            raise KeyError(f"LoRA adapter {self.name} targets {missing[0]}, which the base weights lack")
        return len(self.merged)


def merge_lora(state: dict, adapter_dir: Path, *, strip_prefix: str = "base_model.model.") -> int:
    """``LoraMerge`` over an in-memory state dict. Returns the number of merged weights."""
    merge = LoraMerge(adapter_dir, strip_prefix=strip_prefix)
    for key in list(state):
        state[key] = merge(key, state[key])
    return merge.check()


def _vision_key(key: str) -> str | None:
    if key.startswith("text_model."):
        return None  # a full SigLIP checkpoint: the text tower is not used
    return key if key.startswith("vision_model.") else f"vision_model.{key}"


def video_ccam_v10_to_v12(v10: str | os.PathLike, base_llm: str | os.PathLike, vision: str | os.PathLike,
                          out: str | os.PathLike, *, num_frames: int = 16, max_frames: int = 96,
                          max_shard_bytes: int = 2 << 30) -> Path:
    """Merge a Video-CCAM v1.0 release (projector/, llm_adapter/, visual_encoder_adapter/) with its
    base LLM and SigLIP into one v1.2-layout checkpoint Framewise serves (shards of at most
    ``max_shard_bytes``; one ``model.safetensors`` when it fits)."""
    from transformers import AutoConfig, AutoTokenizer

    from framewise.model_plugins.configs import VideoCCAMConfig
    from framewise.model_plugins.preprocess import ImageProcessorConfig

    v10, base_llm, vision, out = Path(v10), Path(base_llm), Path(vision), Path(out)
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
    sources = (("llm.", base_llm, str, v10 / "llm_adapter"),
               ("vision_encoder.", vision, _vision_key, v10 / "visual_encoder_adapter"),
               ("projector.", v10 / "projector", str, None))
    writer = ShardWriter(out, max_shard_bytes)
    try:
        for prefix, src, rename, adapter in sources:
            merge = LoraMerge(adapter) if adapter is not None and adapter.exists() else None
            for key, tensor in iter_safetensors(src):
                key = rename(key)
                if key is not None:
                    writer.add(prefix + key, merge(key, tensor) if merge else tensor)
                del tensor  # drop the source tensor before reading the next
            if merge:
                merge.check()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(
        json.dumps(ImageProcessorConfig.siglip(config.vision_config.image_size).to_dict(), indent=2))
    if (base_llm / "generation_config.json").exists():
        shutil.copy(base_llm / "generation_config.json", out)
    return out


# ---- stock Qwen2-VL -> STAVE (zero-initialised temporal layers) ------------------------------

STAVE_TEMPORAL_FILE = "model-stave-temporal.safetensors"


def _add_shard(out: Path, tensors: dict, weight_map: dict, *, single_file: bool, name: str) -> tuple[dict, dict]:
    """Write ``tensors`` as one more safetensors shard of ``out``; a single-file source's
    ``model.safetensors`` is to be renamed to a shard name so that the index is what loaders read.
    Returns the new weight map and the renames (source name -> name in ``out``)."""
    from safetensors.torch import save_file

    renamed = {}
    if single_file:
        renamed["model.safetensors"] = "model-00001-of-00002.safetensors"
        name = "model-00002-of-00002.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / name, metadata={"format": "pt"})
    return {k: renamed.get(v, v) for k, v in weight_map.items()} | dict.fromkeys(tensors, name), renamed


def _write_index(out: Path, weight_map: dict) -> None:
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def _stave_temporal_init(vision: dict, heads_scale: float, dtype, seed: int) -> dict:
    """Temporal weights that leave the model unchanged: ``norm3`` an identity LayerNorm
    (weight 1, bias 0), ``qkv`` N(0, initializer_range²) with zero bias (transformers'
    default init, as the authors' ``create_base.py`` leaves it), ``proj`` = 0."""
    import torch

    d, heads, depth = vision["embed_dim"], vision["num_heads"], vision["depth"]
    inner = max(1, round(heads * heads_scale)) * (d // heads)
    std = float(vision.get("initializer_range", 0.02))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(depth):
        p = f"blocks.{i}."
        out |= {p + "norm3.weight": torch.ones(d), p + "norm3.bias": torch.zeros(d),
                p + "temp_attn.qkv.weight": torch.randn(3 * inner, d, generator=g) * std,
                p + "temp_attn.qkv.bias": torch.zeros(3 * inner),
                p + "temp_attn.proj.weight": torch.zeros(d, inner), p + "temp_attn.proj.bias": torch.zeros(d)}
    return {k: v.to(dtype) for k, v in out.items()}


def qwen2vl_to_stave(src: str | os.PathLike, out: str | os.PathLike, *, layout: str = "released",
                     heads_scale: float = 0.25, rope_theta: float = 10000.0, seed: int = 0) -> Path:
    """Make a Qwen2-VL checkpoint servable as STAVE: config rewritten (``stave_qwen2_vl``,
    temporal keys), source weights linked unchanged, temporal layers added in one extra shard
    with ``proj`` = 0, so outputs equal stock Qwen2-VL until the temporal layers are trained.

    A checkpoint that already holds every temporal weight (the authors' ``CustomQwen2VL...``)
    keeps its own; one that holds only some fails naming the first missing key. Tokenizer,
    chat template, preprocessor and generation configs are copied.
    """
    from safetensors import safe_open

    from framewise.model_plugins.configs.stave import TEMPORAL_OUTPUT_LAYOUTS

    src, out = Path(src), Path(out)
    if layout not in TEMPORAL_OUTPUT_LAYOUTS:
        raise ValueError(f"layout must be one of {TEMPORAL_OUTPUT_LAYOUTS}, got {layout!r}")
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") not in ("qwen2_vl", "stave_qwen2_vl"):
        raise ValueError(f"{src} is a {cfg.get('model_type')!r} checkpoint, not Qwen2-VL")
    if src.resolve() == out.resolve():
        raise ValueError("--out must differ from --src")
    index = src / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else sorted(p.name for p in src.glob("*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {src}")
    weight_map: dict[str, str] = {}
    for name in files:
        with safe_open(src / name, "pt") as f:
            weight_map |= dict.fromkeys(f.keys(), name)
    prefix = "model.visual." if any(k.startswith("model.visual.") for k in weight_map) else "visual."
    vision = cfg["vision_config"]
    heads_scale = cfg.get("temporal_heads_scale", heads_scale)
    wanted = [f"{prefix}blocks.{i}.{name}" for i in range(vision["depth"]) for name in
              ("norm3.weight", "norm3.bias", "temp_attn.qkv.weight", "temp_attn.qkv.bias",
               "temp_attn.proj.weight", "temp_attn.proj.bias")]
    present = [k for k in wanted if k in weight_map]
    if present and len(present) != len(wanted):
        missing = next(k for k in wanted if k not in weight_map)
        raise ValueError(f"{src} holds some STAVE temporal weights but lacks {missing}")

    out.mkdir(parents=True, exist_ok=True)
    renamed = {}
    if not present:
        norm1 = prefix + "blocks.0.norm1.weight"
        with safe_open(src / weight_map[norm1], "pt") as f:
            dtype = f.get_tensor(norm1).dtype
        tensors = {prefix + k: v for k, v in _stave_temporal_init(vision, heads_scale, dtype, seed).items()}
        weight_map, renamed = _add_shard(out, tensors, weight_map, single_file=files == ["model.safetensors"],
                                         name=STAVE_TEMPORAL_FILE)
    for name in files:
        target = out / renamed.get(name, name)
        if not target.exists():
            _link(src / name, target)
    _write_index(out, weight_map)

    cfg.update(model_type="stave_qwen2_vl", architectures=["StaveQwen2VLForConditionalGeneration"],
               temporal_heads_scale=heads_scale, temporal_output_layout=layout,
               temporal_rope_theta=cfg.get("temporal_rope_theta", rope_theta))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


# ---- Qwen-VL(-Chat) -> RED-VILLM (a fresh temporal module) -----------------------------------

RED_VILLM_MODULE_FILE = "model-red-villm.safetensors"
RED_VILLM_SKIPPED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
RED_VILLM_OPTIONS = ("temporal_module", "spatial_path", "pad_temporal_to", "token_order", "vision_layer",
                     "num_frames", "max_frames")
MODULE_PREFIXES = ("transformer.visual.temporal_module.", "transformer.visual.spatial_module.")
_MODULE_KEYS = {"linear": ("weight", "bias"), "mlp2": ("0.weight", "0.bias", "2.weight", "2.bias")}


def qwen_vl_expected_keys(cfg: dict) -> set[str]:
    """Every tensor name of a Qwen-VL(-Chat) checkpoint (Qwen-1 LLM + ``transformer.visual``)."""
    vis = cfg["visual"]
    keys = {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"}
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        keys |= {p + k for k in ("ln_1.weight", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                                 "ln_2.weight", "mlp.w1.weight", "mlp.w2.weight", "mlp.c_proj.weight")}
    v = "transformer.visual."
    keys |= {v + k for k in ("conv1.weight", "positional_embedding", "ln_pre.weight", "ln_pre.bias", "ln_post.weight",
                             "ln_post.bias", "proj", "attn_pool.query", "attn_pool.pos_embed",
                             "attn_pool.attn.in_proj_weight", "attn_pool.attn.in_proj_bias",
                             "attn_pool.attn.out_proj.weight", "attn_pool.attn.out_proj.bias", "attn_pool.ln_q.weight",
                             "attn_pool.ln_q.bias", "attn_pool.ln_kv.weight", "attn_pool.ln_kv.bias")}
    if vis["width"] != vis["output_dim"]:  # Qwen-VL's Resampler: an identity kv_proj when the widths agree
        keys.add(v + "attn_pool.kv_proj.weight")
    for j in range(vis["layers"]):
        p = f"{v}transformer.resblocks.{j}."
        keys |= {p + k for k in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.in_proj.weight",
                                 "attn.in_proj.bias", "attn.out_proj.weight", "attn.out_proj.bias",
                                 "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")}
    return keys


def red_villm_module_init(kind: str, in_dim: int, out_dim: int, generator, dtype) -> dict:
    """A fresh ``linear`` (in -> out) or ``mlp2`` (Linear in -> out, GELU, Linear out -> out) module,
    initialised as ``torch.nn.Linear`` is (weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))), names
    relative to the module."""
    import torch

    def linear(prefix: str, fan_in: int) -> dict:
        bound = 1.0 / fan_in ** 0.5
        return {prefix + "weight": (torch.rand(out_dim, fan_in, generator=generator) * 2 - 1) * bound,
                prefix + "bias": (torch.rand(out_dim, generator=generator) * 2 - 1) * bound}

    out = linear("", in_dim) if kind == "linear" else linear("0.", in_dim) | linear("2.", out_dim)
    return {k: v.to(dtype) for k, v in out.items()}


def _source_weights(src: Path) -> tuple[str, list[str]]:
    """``("safetensors" | "bin", files)``: the files the source index names, else every weight file."""
    for kind, index, pattern in (("safetensors", "model.safetensors.index.json", "*.safetensors"),
                                 ("bin", "pytorch_model.bin.index.json", "pytorch_model*.bin")):
        path = src / index
        files = (sorted(set(json.loads(path.read_text())["weight_map"].values())) if path.exists()
                 else sorted(p.name for p in src.glob(pattern)))
        if files:
            return kind, files
    raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {src}")


def _bin_to_safetensors(src: Path, files: list[str], out: Path, max_shard_bytes: int) -> dict[str, str]:
    """Stream ``pytorch_model*.bin`` shards (memory-mapped, tensors only) into safetensors shards."""
    import torch

    from framewise.model_plugins.weights import ShardWriter

    writer = ShardWriter(out, max_shard_bytes)
    try:
        for name in files:
            state = torch.load(src / name, map_location="cpu", mmap=True, weights_only=True)
            for key in list(state):
                writer.add(key, state.pop(key).clone())  # own storage: no views shared across tensors
            del state
        written = writer.close()
    except BaseException:
        writer.abort()
        raise
    if len(written) == 1:
        from safetensors import safe_open

        with safe_open(written[0], "pt") as f:
            return dict.fromkeys(f.keys(), written[0].name)
    return json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]


def _weight_names(src: Path, kind: str, files: list[str]) -> dict[str, str]:
    """``{tensor name: file}`` of the source without reading tensor data (safetensors headers;
    ``.bin`` shards memory-mapped)."""
    import torch
    from safetensors import safe_open

    weight_map: dict[str, str] = {}
    for name in files:
        if kind == "safetensors":
            with safe_open(src / name, "pt") as f:
                weight_map |= dict.fromkeys(f.keys(), name)
        else:
            weight_map |= dict.fromkeys(torch.load(src / name, map_location="cpu", mmap=True, weights_only=True),
                                        name)
    return weight_map


def _tensor(path: Path, key: str):
    """One tensor of a safetensors or ``.bin`` file."""
    import torch
    from safetensors import safe_open

    if path.suffix == ".safetensors":
        with safe_open(path, "pt") as f:
            return f.get_tensor(key)
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)[key]


def _held_modules(src: Path, weight_map: dict[str, str]) -> dict[str, str]:
    """The RED-VILLM modules the source already holds: ``{"temporal_module": "linear"|"mlp2", ...}``."""
    held: dict[str, str] = {}
    for module in ("temporal_module", "spatial_module"):
        prefix = f"transformer.visual.{module}."
        names = sorted(k[len(prefix):] for k in weight_map if k.startswith(prefix))
        if not names:
            continue
        found = next((k for k, keys in _MODULE_KEYS.items() if names == sorted(keys)), None)
        if found is None:
            raise ValueError(f"{src} holds {prefix}{{{', '.join(names)}}}: neither a linear nor an mlp2 module")
        held[module] = found
    if "spatial_module" in held and "temporal_module" not in held:
        raise ValueError(f"{src} holds a spatial_module but no temporal_module")
    if "spatial_module" in held and held["spatial_module"] != held["temporal_module"]:
        raise ValueError(f"{src}: its temporal ({held['temporal_module']}) and spatial ({held['spatial_module']}) "
                         "modules differ in kind")
    return held


def qwen_vl_to_red_villm(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    max_shard_bytes: int = 4 << 30,
    **options: object,
) -> Path:
    """Make a Qwen-VL(-Chat) checkpoint (``model_type: qwen`` with ``visual``, ``qwen.tiktoken``)
    servable as RED-VILLM.

    Safetensors weights are hard-linked unchanged (``pytorch_model*.bin`` are streamed into
    safetensors shards); a seeded fresh ``transformer.visual.temporal_module`` (``linear`` by
    default, or ``mlp2``), plus ``spatial_module`` for ``spatial_path="tokenwise"``, goes into one
    extra shard, with a merged index. A source that already holds these modules (RED-VILLM weights
    saved in Qwen-VL's layout) keeps them; their kind is read from the key names. ``config.json``
    keeps every Qwen-VL key and adds RED-VILLM's; the tiktoken vocabulary becomes ``tokenizer.json``
    with Qwen-VL's special tokens at their ids and the ChatML template. Everything is checked
    before anything is written.

    ``options``: RED-VILLM's config keys (``temporal_module``, ``spatial_path``, ``pad_temporal_to``,
    ``token_order``, ``vision_layer``, ``num_frames``, ``max_frames``); each given one wins over the
    source config's value, which wins over RED-VILLM's default.
    """
    import torch

    from framewise.model_plugins.chat_template import QWEN_VL_CHAT_TEMPLATE
    from framewise.model_plugins.configs.red_villm import RedVillmConfig
    from framewise.model_plugins.tiktoken_convert import (
        ENDOFTEXT,
        IM_END,
        load_tiktoken_ranks,
        qwen_vl_special_tokens,
        write_qwen_vl_tokenizer,
    )

    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json")
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") != "qwen" or not isinstance(cfg.get("visual"), dict):
        what = "a Qwen(-1) LLM without 'visual'" if cfg.get("model_type") == "qwen" else repr(cfg.get("model_type"))
        raise ValueError(f"{src} is {what} checkpoint, not Qwen-VL (config.json model_type 'qwen' with a "
                         "'visual' block)")
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise ValueError(f"{src} is a quantized ({method}) Qwen-VL; convert the full-precision checkpoint")
    unknown = sorted(set(options) - set(RED_VILLM_OPTIONS))
    if unknown:
        raise TypeError(f"unknown RED-VILLM option {unknown[0]!r}; choose from {RED_VILLM_OPTIONS}")
    if not (src / "qwen.tiktoken").is_file():
        raise FileNotFoundError(f"{src} has no qwen.tiktoken (Qwen-VL's tokenizer vocabulary)")
    if out.exists() and src.resolve() == out.resolve():
        raise ValueError("--out must differ from --src")

    kind, files = _source_weights(src)
    weight_map = _weight_names(src, kind, files)
    held = _held_modules(src, weight_map)
    options = {k: cfg[k] for k in RED_VILLM_OPTIONS if k in cfg} | options
    if "temporal_module" in held:  # trained modules are kept: the config must describe them
        if options.get("temporal_module") not in (None, held["temporal_module"]):
            raise ValueError(f"{src} already holds a {held['temporal_module']} temporal_module; "
                             f"--temporal-module {options['temporal_module']} contradicts it")
        options["temporal_module"] = held["temporal_module"]
        if "spatial_module" in held:
            options["spatial_path"] = "tokenwise"
        elif options.get("spatial_path") == "tokenwise":
            raise ValueError(f"{src} holds a temporal_module but no spatial_module; tokenwise needs both")
    expected = qwen_vl_expected_keys(cfg)
    source_keys = {k for k in weight_map if not k.startswith(MODULE_PREFIXES)}
    missing, unexpected = sorted(expected - source_keys), sorted(source_keys - expected)
    if missing or unexpected:
        raise ValueError(f"{src} does not hold Qwen-VL's weights for its config: "
                         + (f"missing {missing[0]} ({len(missing)} missing)" if missing else "")
                         + ("; " if missing and unexpected else "")
                         + (f"unexpected {unexpected[0]} ({len(unexpected)} unexpected)" if unexpected else ""))
    dtype = _tensor(src / weight_map["transformer.visual.conv1.weight"], "transformer.visual.conv1.weight").dtype
    config_kwargs = {k: v for k, v in cfg.items() if k not in ("model_type", "auto_map", "architectures",
                                                               "transformers_version", "text_config")}
    config = RedVillmConfig(**(config_kwargs | options), architectures=["RedVillmForConditionalGeneration"])
    ranks = load_tiktoken_ranks(src / "qwen.tiktoken")
    special = qwen_vl_special_tokens(len(ranks))
    if special["<img>"] != config.image_start_id:
        raise ValueError(f"qwen.tiktoken puts <img> at {special['<img>']} but config visual.image_start_id is "
                         f"{config.image_start_id}")
    if max(special.values()) >= config.vocab_size:
        raise ValueError(f"Qwen-VL's special tokens reach id {max(special.values())}, outside the "
                         f"{config.vocab_size}-row embedding")

    # ---- write ----
    out.mkdir(parents=True, exist_ok=True)
    if kind == "bin":
        weight_map = _bin_to_safetensors(src, files, out, max_shard_bytes)
    vis = config.visual
    renamed: dict[str, str] = {}
    new_modules = [m for m in ("temporal_module", "spatial_module") if m not in held
                   and (m == "temporal_module" or config.spatial_path == "tokenwise")]
    if new_modules:
        g = torch.Generator().manual_seed(seed)
        tensors = {f"transformer.visual.{m}.{k}": v for m in new_modules for k, v in red_villm_module_init(
            config.temporal_module, vis["width"], vis["output_dim"], g, dtype).items()}
        weight_map, renamed = _add_shard(out, tensors, weight_map, name=RED_VILLM_MODULE_FILE,
                                         single_file=sorted(set(weight_map.values())) == ["model.safetensors"])
    if kind == "safetensors":
        for name in files:
            target = out / renamed.get(name, name)
            if not target.exists():
                _link(src / name, target)
    else:
        for old, new in renamed.items():
            os.replace(out / old, out / new)
    _write_index(out, weight_map)

    # config: transformers' rendering, plus every Qwen-VL key it does not write back (use_cache, torch_dtype)
    config.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    merged = {**{k: v for k, v in cfg.items() if k != "auto_map"}, **saved}
    if not (cfg.get("torch_dtype") or cfg.get("dtype")):
        merged["dtype"] = str(dtype).removeprefix("torch.")  # the weights' own, not transformers' float32 default
    (out / "config.json").write_text(json.dumps(merged, indent=2))

    write_qwen_vl_tokenizer(ranks, out, chat_template=QWEN_VL_CHAT_TEMPLATE,
                            model_max_length=int(cfg.get("max_position_embeddings", 8192)))
    install_chat_template(out, QWEN_VL_CHAT_TEMPLATE)
    gen = json.loads((src / "generation_config.json").read_text()) if (src / "generation_config.json").exists() else {}
    # ChatML turns end with <|im_end|>; Qwen's own chat() stops on it (and on <|endoftext|>)
    gen.update(eos_token_id=[special[IM_END], special[ENDOFTEXT]], pad_token_id=special[ENDOFTEXT])
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))

    for f in src.iterdir():  # README, licence, qwen.tiktoken, ...; not Qwen's remote code (not used)
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.suffix != ".py" \
                and f.name not in RED_VILLM_SKIPPED and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    return out
