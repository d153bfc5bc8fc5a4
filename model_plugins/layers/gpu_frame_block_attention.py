"""CUDA/ROCm attention backend with TC-LLaVA's frame-wise block-causal mask.

``TRITON_ATTN`` already implements ``causal OR same range`` for
``mm_req_doc_ranges`` in its kernel; the only change is to split each item's
range into m-token frame blocks before the metadata is built. CUDA/ROCm also
force whole-item scheduling for prefix-LM models on their own.

Full CUDA graphs: a graph replays the kernel launch it captured, and captures
run without ranges, so a prefill replayed from a full graph would be plain
causal. A single-token decode query is causal under the frame mask anyway, so
the builder declares ``UNIFORM_SINGLE_TOKEN_DECODE``: vLLM then keeps full
graphs for decode only (``cudagraph_mode=FULL`` resolves to
``FULL_DECODE_ONLY`` / ``FULL_AND_PIECEWISE``; the default is unchanged).

Verified on CPU by running vLLM's Triton kernels under Triton's interpreter
(``tests/test_triton_frame_blocks.py``); not yet run on a GPU (see the README).
"""

from __future__ import annotations

from typing import ClassVar

from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionMetadataBuilder,
)

from framewise.model_plugins.layers.frame_block_ranges import tokens_per_frame, with_frame_block_ranges


class TritonFrameBlockMetadataBuilder(TritonAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

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
