"""CPU attention backend with TC-LLaVA's frame-wise block-causal mask.

vLLM's stock ``CPU_ATTN`` never reads ``mm_req_doc_ranges`` and silently stays
causal. For a query inside frame block ``[s, e]`` the mask "causal OR same frame"
equals "attend every key in ``[0, e]``": non-causal attention over the sequence
cut at ``e + 1``. So after the stock causal pass we run the same C++ kernel,
non-causally, on a re-segmented batch with one sub-sequence per (request, frame
block) and ``seq_len = e + 1``, and overwrite those query rows. No knowledge of
the ISA-specific paged-KV layout is needed and decode steps are untouched.

Requirement: a frame's keys must all be in the cache when its queries run, i.e.
whole-video scheduling (``disable_chunked_mm_input``), which the plugin enforces.
Pinned to vLLM 0.32's CPU_ATTN classes and ``ops.cpu_attn_*`` signatures.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.logger import init_logger
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from framewise.model_plugins.layers.frame_block_ranges import frame_block_ranges, tokens_per_frame

logger = init_logger(__name__)


@dataclass
class FrameBlockBatch:
    """The frame-block queries of one step, as a batch of non-causal sub-sequences."""

    token_idx: torch.Tensor  # (n,) rows of the step's query tensor
    query_start_loc: torch.Tensor  # (blocks + 1,) int32
    seq_lens: torch.Tensor  # (blocks,) int32: e + 1
    block_table: torch.Tensor  # (blocks, max_blocks) the owning request's row
    scheduler_metadata: torch.Tensor


@dataclass
class FrameBlockCPUAttentionMetadata(CPUAttentionMetadata):
    frame_blocks: FrameBlockBatch | None = None


class CPUFrameBlockAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        # Attention.__init__ maps the name onto AttentionBackendEnum; CPU code paths
        # (KV layout, cache ops) key on CPU_ATTN, which this backend is a superset of.
        return "CPU_ATTN"

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return True

    @staticmethod
    def get_impl_cls():
        return CPUFrameBlockAttentionImpl

    @staticmethod
    def get_builder_cls():
        return CPUFrameBlockMetadataBuilder


class CPUFrameBlockMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        md = FrameBlockCPUAttentionMetadata(**{f.name: getattr(md, f.name) for f in fields(md)})
        if self.is_cross_attention or self.is_encoder_only_attention:
            return md
        ranges = frame_block_ranges(common_attn_metadata.mm_req_doc_ranges, tokens_per_frame(self.vllm_config))
        if ranges:
            md.frame_blocks = self._frame_block_batch(ranges, common_attn_metadata, md)
        return md

    def _frame_block_batch(self, ranges, cm, md) -> FrameBlockBatch | None:
        qsl = cm.query_start_loc_cpu.tolist()
        seq_lens = cm.seq_lens.cpu().tolist()
        rows, starts, lens, owners = [], [0], [], []
        for req, blocks in ranges.items():
            if req >= cm.num_reqs:
                continue
            q0, n_q = qsl[req], qsl[req + 1] - qsl[req]
            seq_len = seq_lens[req]
            first = seq_len - n_q  # absolute position of this step's first query
            for s, e in blocks:
                if e < first or s >= seq_len:
                    continue  # computed in an earlier step, or not scheduled yet
                lo, hi = max(s, first), min(e, seq_len - 1)
                if hi < e:
                    logger.warning_once(
                        "frame block (%d, %d) is split across scheduler steps; its first "
                        "tokens miss later tokens of the frame (whole-video scheduling is off?)", s, e)
                rows.append(torch.arange(q0 + lo - first, q0 + hi - first + 1))
                starts.append(starts[-1] + hi - lo + 1)
                lens.append(hi + 1)
                owners.append(req)
        if not lens:
            return None
        seq_lens_t = torch.tensor(lens, dtype=torch.int32)
        qsl_t = torch.tensor(starts, dtype=torch.int32)
        sched = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(lens),
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            seq_lens=seq_lens_t,
            dtype=self.dtype,
            query_start_loc=qsl_t,
            causal=False,
            sliding_window_size=-1,
            isa=self.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        return FrameBlockBatch(
            token_idx=torch.cat(rows),
            query_start_loc=qsl_t,
            seq_lens=seq_lens_t,
            block_table=md.block_table[torch.tensor(owners, dtype=torch.long)],
            scheduler_metadata=sched,
        )


class CPUFrameBlockAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                 output_scale, output_block_scale)
        batch = getattr(attn_metadata, "frame_blocks", None)
        if batch is None:
            return output
        num_blocks, num_kv_heads, block_size, _ = kv_cache.size()
        key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, block_size * 2, -1).chunk(2, dim=2)
        q = query.index_select(0, batch.token_idx).contiguous()
        out = torch.empty((q.shape[0], *output.shape[1:]), dtype=output.dtype)
        ops.cpu_attention_with_kv_cache(
            query=q,
            key_cache=key_cache,
            value_cache=value_cache,
            output=out,
            query_start_loc=batch.query_start_loc,
            seq_lens=batch.seq_lens,
            scale=self.scale,
            causal=False,
            alibi_slopes=self.alibi_slopes,
            sliding_window=-1,
            block_table=batch.block_table,
            softcap=self.logits_soft_cap,
            scheduler_metadata=batch.scheduler_metadata,
            s_aux=self.sinks,
            k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        output.index_copy_(0, batch.token_idx, out)
        return output
