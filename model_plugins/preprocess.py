"""Frame validation and CLIP-style preprocessing, in torch (no torchvision).

The contract for media handed to the models: a video is ``uint8`` RGB frames
``(T, H, W, 3)`` (numpy array or torch tensor, or a list of ``(H, W, 3)`` frames /
PIL images); an image is one such frame. Anything else is rejected here with a
message that says what was wrong, before a request reaches the engine.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class InvalidMediaError(ValueError):
    """Frames that a model cannot take (empty, wrong dtype/shape, too many)."""


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The subset of a ``CLIPImageProcessor`` ``preprocessor_config.json`` that matters."""

    shortest_edge: int
    crop_size: int
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    do_resize: bool = True
    do_center_crop: bool = True
    do_normalize: bool = True
    rescale_factor: float = 1 / 255
    exact_size: int | None = None  # SigLIP: resize to exactly this square, aspect not kept, no crop

    @classmethod
    def siglip(cls, size: int) -> ImageProcessorConfig:
        return cls(shortest_edge=size, crop_size=size, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                   do_center_crop=False, exact_size=size)

    @classmethod
    def from_dict(cls, d: dict, default_size: int) -> ImageProcessorConfig:
        size = d.get("size", {"shortest_edge": default_size})
        if isinstance(size, dict) and "shortest_edge" not in size and "height" in size:
            return cls(shortest_edge=int(size["height"]), crop_size=int(size["height"]),
                       image_mean=tuple(d.get("image_mean", (0.5, 0.5, 0.5))),
                       image_std=tuple(d.get("image_std", (0.5, 0.5, 0.5))),
                       do_resize=bool(d.get("do_resize", True)), do_center_crop=False,
                       do_normalize=bool(d.get("do_normalize", True)),
                       rescale_factor=float(d.get("rescale_factor", 1 / 255)), exact_size=int(size["height"]))
        edge = size.get("shortest_edge", size.get("height", default_size)) if isinstance(size, dict) else size
        crop = d.get("crop_size", {"height": edge})
        crop = crop.get("height", edge) if isinstance(crop, dict) else crop
        return cls(
            shortest_edge=int(edge),
            crop_size=int(crop),
            image_mean=tuple(d.get("image_mean", CLIP_MEAN)),
            image_std=tuple(d.get("image_std", CLIP_STD)),
            do_resize=bool(d.get("do_resize", True)),
            do_center_crop=bool(d.get("do_center_crop", True)),
            do_normalize=bool(d.get("do_normalize", True)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
        )

    def to_dict(self) -> dict:
        if self.exact_size:
            return {
                "image_processor_type": "SiglipImageProcessor", "do_resize": self.do_resize,
                "size": {"height": self.exact_size, "width": self.exact_size}, "resample": 3, "do_rescale": True,
                "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std), "do_convert_rgb": True,
            }
        return {
            "image_processor_type": "CLIPImageProcessor",
            "processor_class": "LlavaProcessor",
            "do_resize": self.do_resize,
            "size": {"shortest_edge": self.shortest_edge},
            "resample": 3,  # PIL bicubic
            "do_center_crop": self.do_center_crop,
            "crop_size": {"height": self.crop_size, "width": self.crop_size},
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
        }


@lru_cache(maxsize=16)
def load_image_processor_config(model_dir: str, default_size: int) -> ImageProcessorConfig:
    """Read ``preprocessor_config.json`` from a local checkpoint (defaults when absent)."""
    path = os.path.join(model_dir, "preprocessor_config.json")
    if not os.path.isfile(path):
        try:  # a hub id already in the local cache (HF_HUB_OFFLINE)
            from transformers.utils import cached_file

            path = cached_file(model_dir, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        except Exception:
            path = None
    if not path or not os.path.isfile(path):
        return ImageProcessorConfig(shortest_edge=default_size, crop_size=default_size)
    with open(path) as f:
        return ImageProcessorConfig.from_dict(json.load(f), default_size)


def as_frames(media: object, *, what: str = "video") -> torch.Tensor:
    """Validate one video (or image) and return ``uint8`` frames ``(T, H, W, 3)``."""
    if isinstance(media, tuple) and len(media) == 2 and isinstance(media[1], dict):
        media = media[0]  # (frames, metadata) as produced by video loaders
    if isinstance(media, (list, tuple)):
        if len(media) == 0:
            raise InvalidMediaError(f"{what} has zero frames")
        media = np.stack([np.asarray(f) for f in media])
    if hasattr(media, "convert") and hasattr(media, "size"):  # PIL image
        media = np.asarray(media.convert("RGB"))[None]
    if isinstance(media, np.ndarray):
        if media.dtype != np.uint8:
            raise InvalidMediaError(f"{what} frames must be uint8 RGB (0-255), got dtype {media.dtype}")
        media = np.ascontiguousarray(media)
        t = torch.from_numpy(media if media.flags.writeable else media.copy())
    elif isinstance(media, torch.Tensor):
        if media.dtype != torch.uint8:
            raise InvalidMediaError(f"{what} frames must be uint8 RGB (0-255), got dtype {media.dtype}")
        t = media
    else:
        raise InvalidMediaError(f"{what} must be uint8 frames (T, H, W, 3), got {type(media).__name__}")
    if t.ndim == 3 and what == "image":
        t = t[None]
    if t.ndim != 4:
        raise InvalidMediaError(f"{what} frames must have shape (T, H, W, 3), got {tuple(t.shape)}")
    if t.shape[-1] != 3 and t.shape[1] == 3:
        t = t.permute(0, 2, 3, 1)  # (T, 3, H, W) -> (T, H, W, 3)
    if t.shape[-1] != 3:
        raise InvalidMediaError(f"{what} frames must be RGB with shape (T, H, W, 3), got {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise InvalidMediaError(f"{what} has zero frames")
    if t.shape[1] < 1 or t.shape[2] < 1:
        raise InvalidMediaError(f"{what} frames are empty: shape {tuple(t.shape)}")
    return t


def clip_preprocess(frames: torch.Tensor, cfg: ImageProcessorConfig) -> torch.Tensor:
    """CLIP/SigLIP image-processor semantics: resize (bicubic, antialiased) by the shortest edge
    then center crop (CLIP), or to an exact square (SigLIP); rescale; normalize.
    ``(T, H, W, 3) uint8`` -> ``(T, 3, S, S) float32``."""
    x = frames.permute(0, 3, 1, 2).float()
    if cfg.do_resize and cfg.exact_size:
        if tuple(x.shape[-2:]) != (cfg.exact_size, cfg.exact_size):
            x = F.interpolate(x, size=(cfg.exact_size, cfg.exact_size), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 255).round()
    elif cfg.do_resize:
        h, w = x.shape[-2:]
        scale = cfg.shortest_edge / min(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp(0, 255).round()  # PIL resizes in uint8
    if cfg.do_center_crop:
        h, w = x.shape[-2:]
        c = cfg.crop_size
        if h < c or w < c:  # pad like PIL's center crop does
            ph, pw = max(0, c - h), max(0, c - w)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            h, w = x.shape[-2:]
        top, left = (h - c) // 2, (w - c) // 2
        x = x[..., top : top + c, left : left + c]
    x = x * cfg.rescale_factor
    if cfg.do_normalize:
        mean = torch.tensor(cfg.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(cfg.image_std).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x.contiguous()


# ----------------------------------------------------------------------------------------
# Qwen2-VL (STAVE): smart resize to multiples of 28, 2-frame temporal patches
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Qwen2VLPixelConfig:
    """The subset of a Qwen2-VL ``preprocessor_config.json`` that matters."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dict(cls, d: dict) -> Qwen2VLPixelConfig:
        size = d.get("size") or {}
        return cls(
            min_pixels=int(d.get("min_pixels") or size.get("shortest_edge") or cls.min_pixels),
            max_pixels=int(d.get("max_pixels") or size.get("longest_edge") or cls.max_pixels),
            patch_size=int(d.get("patch_size", cls.patch_size)),
            temporal_patch_size=int(d.get("temporal_patch_size", cls.temporal_patch_size)),
            merge_size=int(d.get("merge_size", cls.merge_size)),
            image_mean=tuple(d.get("image_mean", CLIP_MEAN)),
            image_std=tuple(d.get("image_std", CLIP_STD)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
        )

    def to_dict(self) -> dict:
        return {
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
            "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": self.rescale_factor,
            "do_normalize": True, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "do_convert_rgb": True, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
        }


@lru_cache(maxsize=16)
def load_qwen2vl_pixel_config(model_dir: str) -> Qwen2VLPixelConfig:
    path = os.path.join(model_dir, "preprocessor_config.json")
    if not os.path.isfile(path):
        return Qwen2VLPixelConfig()
    with open(path) as f:
        return Qwen2VLPixelConfig.from_dict(json.load(f))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of ``factor``, area within [min, max], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise InvalidMediaError(f"aspect ratio must be below 200, got {height}x{width}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def qwen2vl_preprocess(frames: torch.Tensor, cfg: Qwen2VLPixelConfig) -> tuple[torch.Tensor, list[int]]:
    """Qwen2-VL processor semantics for one video (or an image, ``T = 1``).

    ``(T, H, W, 3) uint8`` -> ``pixel_values (T'*h*w, 3*tps*p*p) float32`` and ``grid_thw [T', h, w]``:
    frames resized (PIL bicubic on uint8, as transformers' ``Qwen2VLImageProcessorPil``) to
    :func:`smart_resize`'s size, rescaled, normalised,
    padded to a multiple of ``temporal_patch_size`` by repeating the last frame, and cut into
    patches ordered by temporal step, then 2x2 merge window (rows), then the patch's
    (channel, time, y, x) (columns)."""
    p, m, tps = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    height, width = int(frames.shape[1]), int(frames.shape[2])
    size = smart_resize(height, width, p * m, cfg.min_pixels, cfg.max_pixels)
    if size != (height, width):
        from PIL import Image

        frames = torch.from_numpy(np.stack([
            np.asarray(Image.fromarray(f).resize((size[1], size[0]), Image.Resampling.BICUBIC))
            for f in frames.cpu().numpy()]))
    x = frames.permute(0, 3, 1, 2).float()
    mean = torch.tensor(cfg.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    x = (x * cfg.rescale_factor - mean) / std
    if x.shape[0] % tps:
        x = torch.cat([x, x[-1:].expand(tps - x.shape[0] % tps, -1, -1, -1)])
    t, c = x.shape[0] // tps, x.shape[1]
    h, w = size[0] // p, size[1] // p
    x = x.reshape(t, tps, c, h // m, m, p, w // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, h/m, w/m, m, m, c, tps, p, p
    return x.reshape(t * h * w, c * tps * p * p).contiguous(), [t, h, w]


# ----------------------------------------------------------------------------------------
# Qwen-VL (RED-VILLM): every frame resized to a square, no crop
# ----------------------------------------------------------------------------------------


def qwen_vl_resize(frames: object, image_size: int) -> torch.Tensor:
    """The resize half of Qwen-VL's image transform: PIL bicubic to ``(S, S)`` (aspect not kept,
    no crop) on ``uint8``. ``frames`` as :func:`qwen_vl_preprocess` takes them -> ``(T, 3, S, S) uint8``
    (4x smaller than the normalised floats: what the vLLM processor hands the engine)."""
    if isinstance(frames, (list, tuple)) and frames and all(hasattr(f, "convert") for f in frames):
        frames = [np.asarray(f.convert("RGB")) for f in frames]
    if isinstance(frames, np.ndarray) and frames.ndim == 3:
        frames = frames[None]
    t = as_frames(frames, what="video")
    size = (int(image_size), int(image_size))
    arr = t.cpu().numpy()
    if tuple(arr.shape[1:3]) != size:
        from PIL import Image

        arr = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BICUBIC)) for f in arr])
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()


def clip_normalize(pixels: torch.Tensor) -> torch.Tensor:
    """The other half: 0..255 values (any dtype) -> ``/255``, CLIP mean/std, ``float32``."""
    x = pixels.float() / 255.0
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def qwen_vl_preprocess(frames: object, image_size: int) -> torch.Tensor:
    """Qwen-VL's image transform on every frame: PIL bicubic resize to ``(S, S)`` (aspect not
    kept, no crop), ``/255``, CLIP mean/std.

    ``frames``: ``uint8`` ``(T, H, W, 3)`` (numpy or torch), one ``(H, W, 3)`` frame, or a list
    of PIL images / frames -> ``(T, 3, S, S) float32``."""
    return clip_normalize(qwen_vl_resize(frames, image_size))
