"""Plumbing shared by models that take images and videos as decoded frames.

The contract: ``multi_modal_data`` holds ``uint8`` frames; an image is one frame. The
processor validates and preprocesses them into ``pixel_values`` (images, one row each) and
``pixel_values_videos`` (all frames of all videos, split by ``video_num_frames``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo

from framewise.model_plugins.preprocess import InvalidMediaError, as_frames, clip_preprocess


def frames_to_pixels(hf_data: Mapping[str, object], preprocess: Callable[[torch.Tensor], torch.Tensor],
                     max_frames: int) -> BatchFeature:
    """Validate every image/video (an image is one frame; a video at most ``max_frames``) and
    ``preprocess`` its ``uint8`` frames ``(T, H, W, 3)``; raises InvalidMediaError before the engine."""
    out: dict[str, torch.Tensor] = {}
    images = hf_data.get("images") or []
    if images:
        pixels = []
        for i, image in enumerate(images):
            frames = as_frames(image, what="image")
            if frames.shape[0] != 1:
                raise InvalidMediaError(f"image {i} must be one (H, W, 3) frame, got {frames.shape[0]} frames")
            pixels.append(preprocess(frames))
        out["pixel_values"] = torch.cat(pixels)
    videos = hf_data.get("videos") or []
    if videos:
        pixels, counts = [], []
        for i, video in enumerate(videos):
            frames = as_frames(video, what=f"video {i}")
            if frames.shape[0] > max_frames:
                raise InvalidMediaError(f"video {i} has {frames.shape[0]} frames; this model takes at most "
                                        f"{max_frames} (max_frames in config.json)")
            pixels.append(preprocess(frames))
            counts.append(frames.shape[0])
        out["pixel_values_videos"] = torch.cat(pixels)
        out["video_num_frames"] = torch.tensor(counts, dtype=torch.long)
    return BatchFeature(out)


def pixels_per_item(kwargs: Mapping[str, object]) -> list[torch.Tensor]:
    """``(T, 3, S, S)`` pixels of every item, in the modality order vLLM passed (images: T = 1)."""
    items: list[torch.Tensor] = []
    for key in list(kwargs):
        if key == "pixel_values":
            pixels = kwargs[key]
            pixels = torch.cat(list(pixels)) if isinstance(pixels, (list, tuple)) else pixels
            items.extend(p[None] for p in pixels.flatten(0, -4))
        elif key == "pixel_values_videos":
            pixels = kwargs[key]
            if isinstance(pixels, (list, tuple)):
                items.extend(pixels)
            else:
                sizes = torch.as_tensor(kwargs["video_num_frames"]).flatten().tolist()
                items.extend(torch.split(pixels, sizes))
    return items


class FramesProcessingInfo(BaseProcessingInfo):
    """Any number of images and videos per prompt; subclasses give ``get_hf_config``,
    ``get_image_processor_config`` and ``get_mm_max_tokens_per_item``."""

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "video": None}


class FramesDummyInputsBuilder(BaseDummyInputsBuilder):
    """Profiling inputs: square images, and videos of ``max_frames`` frames (the config has
    ``vision_config.image_size`` and ``max_frames``)."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "<image>" * mm_counts.get("image", 0) + "<video>" * mm_counts.get("video", 0)

    def dummy_image_size(self) -> int:
        return self.info.get_hf_config().vision_config.image_size

    def get_dummy_mm_data(self, seq_len, mm_counts, mm_options):
        cfg = self.info.get_hf_config()
        size, options = self.dummy_image_size(), mm_options or {}
        return {
            "image": self._get_dummy_images(width=size, height=size, num_images=mm_counts.get("image", 0),
                                            overrides=options.get("image")),
            "video": self._get_dummy_videos(width=size, height=size, num_frames=cfg.max_frames,
                                            num_videos=mm_counts.get("video", 0), overrides=options.get("video")),
        }


class FramesMultiModalProcessor(BaseMultiModalProcessor):
    """No HF processor: frames are validated and preprocessed here, in torch. The info class
    provides ``get_image_processor_config()``; subclasses add ``_get_prompt_updates``."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        ipc = self.info.get_image_processor_config()
        return frames_to_pixels(hf_data, lambda frames: clip_preprocess(frames, ipc),
                                self.info.get_hf_config().max_frames)

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        num_frames = hf_inputs.get("video_num_frames", torch.empty(0, dtype=torch.long))
        return dict(
            pixel_values=MultiModalFieldConfig.batched("image"),
            pixel_values_videos=MultiModalFieldConfig.flat_from_sizes("video", num_frames),
            video_num_frames=MultiModalFieldConfig.batched("video", keep_on_cpu=True),
        )


def frames_placeholder(model: str, modality: str) -> str:
    """``get_placeholder_str`` of a model that takes images and videos."""
    if modality.startswith("image"):
        return "<image>"
    if modality.startswith("video"):
        return "<video>"
    raise ValueError(f"{model} takes images and videos, not {modality}")
