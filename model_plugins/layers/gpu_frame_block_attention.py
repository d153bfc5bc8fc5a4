"""CUDA/ROCm attention backend with TC-LLaVA's frame-wise block-causal mask.

``TRITON_ATTN`` already implements ``causal OR same range`` for
``mm_req_doc_ranges`` in its kernel; the only change is to split each item's
range into m-token frame blocks before the metadata is built. CUDA/ROCm also
force whole-item scheduling for prefix-LM models on their own.

Not run in this repository's CI (no GPU, and vLLM's CUDA build is not installed
here); see the README's verification table.
"""

from __future__ import annotations

from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionMetadataBuilder,
)

from model_plugins.layers.frame_block_ranges import tokens_per_frame, with_frame_block_ranges


class TritonFrameBlockMetadataBuilder(TritonAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        cm = with_frame_block_ranges(common_attn_metadata, tokens_per_frame(self.vllm_config))
        return super().build(common_prefix_len, cm, fast_build)


class TritonFrameBlockAttentionBackend(TritonAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "TRITON_ATTN"

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return True

    @staticmethod
    def get_builder_cls():
        return TritonFrameBlockMetadataBuilder
