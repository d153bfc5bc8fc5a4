"""Turn vLLM's per-item bidirectional ranges into TC-LLaVA's per-frame blocks.

With ``is_mm_prefix_lm`` vLLM's model runner fills
``CommonAttentionMetadata.mm_req_doc_ranges = {req_idx: [(start, end), ...]}``:
one inclusive range per multimodal item (one contiguous placeholder run). The
supporting kernels then allow ``causal(q, k) OR same_range(q, k)``. Splitting each
range into m-token blocks gives exactly the frame-wise block-causal mask.
"""

from __future__ import annotations

import dataclasses

from framewise.model_plugins.layers.temporal import split_frame_blocks


def tokens_per_frame(vllm_config) -> int:
    """m of the model being served (every image/video frame has m tokens)."""
    m = getattr(vllm_config.model_config.hf_config, "tokens_per_frame", None)
    if not m:
        raise RuntimeError("frame-block attention needs a config with tokens_per_frame (TC-LLaVA)")
    return int(m)


def frame_block_ranges(
    ranges: dict[int, list[tuple[int, int]]] | None, m: int
) -> dict[int, list[tuple[int, int]]] | None:
    if not ranges:
        return ranges
    return {req: split_frame_blocks(rl, m) for req, rl in ranges.items()}


def with_frame_block_ranges(common_attn_metadata, m: int):
    """A copy of ``CommonAttentionMetadata`` whose ranges are per-frame blocks."""
    ranges = common_attn_metadata.mm_req_doc_ranges
    if not ranges:
        return common_attn_metadata
    return dataclasses.replace(common_attn_metadata, mm_req_doc_ranges=frame_block_ranges(ranges, m))
