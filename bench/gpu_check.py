"""The Python half of ``scripts/gpu_check.sh``: what to run first on a CUDA host.

Subcommands (each engine in its own process; vLLM engines are created under ``__main__``):

    variant        copy a checkpoint (hard links) with config.json values changed
    engine         one vLLM engine: greedy answer + prompt logprobs of a video prompt, prefill timings
    reference      the plain-PyTorch reference's prompt logprobs for the same prompt (fp32)
    compare        max |prompt logprob difference| of two runs; fails above --tol (or, with
                   --expect-differ, when the runs do NOT differ on the video positions)
    kernel-timing  vLLM's Triton unified attention at realistic sizes: frame blocks vs causal vs
                   one range per video (CUDA only)
    selftest       import everything and parse every subcommand (CPU-safe; used by --dry-run)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

VIDEO_PROMPT = "USER: <video>\nWhat happens in this video? ASSISTANT:"
FRAME_SIZE = {"tc_llava": 56, "video_ccam": 40}


def _model_type(model: str) -> str:
    return json.loads((Path(model) / "config.json").read_text())["model_type"]


def video(num_frames: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8)


def prompt(model: str, frames: int, seed: int = 0) -> dict:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model)(VIDEO_PROMPT).input_ids
    return {"prompt_token_ids": ids,
            "multi_modal_data": {"video": video(frames, FRAME_SIZE.get(_model_type(model), 56), seed)}}


def cmd_variant(args) -> int:
    base, out = Path(args.base), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            try:
                os.link(f, out / f.name)
            except OSError:
                shutil.copy2(f, out / f.name)
    cfg = json.loads((base / "config.json").read_text())
    for item in args.set:
        key, value = item.split("=", 1)
        cfg[key] = json.loads(value)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    print(out)
    return 0


def cmd_engine(args) -> int:
    req = prompt(args.model, args.frames)
    if args.dry_run:
        print(f"engine {args.model} dtype={args.dtype}: {len(req['prompt_token_ids'])} text tokens, "
              f"video {req['multi_modal_data']['video'].shape}")
        return 0
    from vllm import SamplingParams

    from framewise.model_plugins.offline import create_llm

    extra = {"max_model_len": args.max_model_len} if args.max_model_len else {}
    llm = create_llm(args.model, dtype=args.dtype, seed=0, enable_prefix_caching=False,
                     enforce_eager=args.enforce_eager, **extra)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
    out = llm.generate([req], greedy, use_tqdm=False)[0]
    ids = list(out.prompt_token_ids)
    lps = [None] + [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
    prefill = []
    one = SamplingParams(temperature=0.0, max_tokens=1)
    for r in range(args.repeat + 1):  # first call warms up; each video is new (no cache reuse)
        fresh = prompt(args.model, args.frames, seed=100 + r)
        t0 = time.perf_counter()
        llm.generate([fresh], one, use_tqdm=False)
        if r:
            prefill.append(time.perf_counter() - t0)
    result = {"model": args.model, "dtype": args.dtype, "frames": args.frames, "prompt_token_ids": ids,
              "prompt_logprobs": lps, "token_ids": list(out.outputs[0].token_ids), "prefill_s": prefill}
    Path(args.out).write_text(json.dumps(result))
    print(f"{args.model} {args.dtype}: {len(ids)} prompt tokens, prefill median "
          f"{statistics.median(prefill) * 1e3:.1f} ms over {len(prefill)}")
    return 0


def cmd_reference(args) -> int:
    import torch

    kind = _model_type(args.model)
    if kind == "tc_llava":
        from framewise.model_plugins.reference.tc_llava import TCLlavaReference as Ref
    elif kind == "video_ccam":
        from framewise.model_plugins.reference.video_ccam import VideoCCAMReference as Ref
    else:
        raise SystemExit(f"no reference for model_type {kind!r}")
    req = prompt(args.model, args.frames)
    if args.dry_run:
        print(f"reference {kind} for {args.model}")
        return 0
    ref = Ref.from_pretrained(args.model)
    with torch.no_grad():
        prep = ref.prepare(req["prompt_token_ids"], videos=[req["multi_modal_data"]["video"]])
        lp = ref.prompt_logprobs(prep)
    ids = list(prep.input_ids)
    lps = [None] + [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    Path(args.out).write_text(json.dumps({"model": args.model, "dtype": "float32 reference",
                                          "prompt_token_ids": ids, "prompt_logprobs": lps}))
    return 0


def cmd_compare(args) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    if a["prompt_token_ids"] != b["prompt_token_ids"]:
        print(f"FAIL {args.label}: prompt token ids differ")
        return 1
    diff = [abs(x - y) for x, y in zip(a["prompt_logprobs"][1:], b["prompt_logprobs"][1:], strict=True)]
    worst = max(diff)
    same = ""
    if "token_ids" in a and "token_ids" in b:
        n = next((i for i, (x, y) in enumerate(zip(a["token_ids"], b["token_ids"], strict=False)) if x != y),
                 min(len(a["token_ids"]), len(b["token_ids"])))
        same = f", greedy tokens agree for {n}/{len(a['token_ids'])}"
    ok = worst > args.tol if args.expect_differ else worst <= args.tol
    rule = f"> {args.tol} expected" if args.expect_differ else f"<= {args.tol}"
    print(f"{'ok  ' if ok else 'FAIL'} {args.label}: max |prompt logprob diff| = {worst:.3g} ({rule}){same}")
    return 0 if ok else 1


def cmd_kernel_timing(args) -> int:
    import torch

    if args.dry_run:
        print(f"kernel-timing frames={args.frames} m={args.m} heads={args.heads}/{args.kv_heads} d={args.head_dim}")
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("kernel-timing needs CUDA")
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    from framewise.model_plugins.layers.temporal import split_frame_blocks

    dev, dt, bs = torch.device("cuda"), getattr(torch, args.dtype), 16
    print(f"{'frames':>6} {'tokens':>7} {'variant':>12} {'first call ms':>14} {'median ms':>10}")
    for frames in args.frames:
        n = 16 + frames * args.m + 16
        q = torch.randn(n, args.heads, args.head_dim, device=dev, dtype=dt)
        nb = (n + bs - 1) // bs
        kc = torch.randn(nb + 1, bs, args.kv_heads, args.head_dim, device=dev, dtype=dt)
        vc = torch.randn_like(kc)
        bt = torch.arange(1, nb + 1, device=dev, dtype=torch.int32)[None]
        video_range = [(16, 16 + frames * args.m - 1)]
        variants = {"causal": None,
                    "whole_video": video_range,
                    "frame_blocks": split_frame_blocks(video_range, args.m)}
        common = dict(q=q, k=kc, v=vc, cu_seqlens_q=torch.tensor([0, n], device=dev, dtype=torch.int32),
                      max_seqlen_q=n, seqused_k=torch.tensor([n], device=dev, dtype=torch.int32), max_seqlen_k=n,
                      softmax_scale=args.head_dim**-0.5, causal=True, window_size=(-1, -1), block_table=bt,
                      softcap=0, q_descale=None, k_descale=torch.ones(1, args.kv_heads, device=dev),
                      v_descale=torch.ones(1, args.kv_heads, device=dev), alibi_slopes=None)
        for name, ranges in variants.items():
            rt = None if ranges is None else torch.tensor([ranges], dtype=torch.int32, device=dev)
            kwargs = dict(common, out=torch.empty_like(q), mm_prefix_range=rt)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            unified_attention(**kwargs)  # includes Triton's JIT compile for a new MAX_MM_RANGES
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            times = []
            for _ in range(args.repeat):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                unified_attention(**kwargs)
                e.record()
                torch.cuda.synchronize()
                times.append(s.elapsed_time(e))
            print(f"{frames:>6} {n:>7} {name:>12} {first * 1e3:>14.1f} {statistics.median(times):>10.3f}")
    return 0


def cmd_selftest(args) -> int:
    """Everything the GPU run imports and every subcommand's argument parsing, without a GPU."""
    import bench.triton_frame_blocks
    import framewise.model_plugins.layers.gpu_frame_block_attention  # noqa: F401  (vLLM's TRITON_ATTN classes)
    import framewise.model_plugins.reference.tc_llava  # noqa: F401
    import framewise.model_plugins.reference.video_ccam  # noqa: F401

    bench.triton_frame_blocks.build_parser().parse_args(["--model", "m", "--device", "cuda", "--check", "--tol", "1e-5"])
    parser = build_parser()
    for argv in (["variant", "--base", "a", "--out", "b", "--set", "frame_block_mask=false"],
                 ["engine", "--model", "m", "--dtype", "bfloat16", "--out", "x.json"],
                 ["reference", "--model", "m", "--out", "r.json"],
                 ["compare", "a.json", "b.json", "--tol", "0.1", "--label", "x"],
                 ["kernel-timing", "--frames", "8", "32"]):
        parser.parse_args(argv)
    print("selftest ok: bench.gpu_check, bench.triton_frame_blocks, the GPU backend and the references import; "
          "arguments parse")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="parse, import and build inputs; start nothing")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("variant")
    p.add_argument("--base", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], help="KEY=JSON_VALUE")
    p.set_defaults(func=cmd_variant)
    p = sub.add_parser("engine")
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", required=True)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--max-model-len", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--enforce-eager", action="store_true")
    p.set_defaults(func=cmd_engine)
    p = sub.add_parser("reference")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--frames", type=int, default=8)
    p.set_defaults(func=cmd_reference)
    p = sub.add_parser("compare")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--tol", type=float, required=True)
    p.add_argument("--label", default="")
    p.add_argument("--expect-differ", action="store_true")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("kernel-timing")
    p.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--m", type=int, default=576, help="tokens per frame (LLaVA-1.5: 576)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeat", type=int, default=20)
    p.set_defaults(func=cmd_kernel_timing)
    p = sub.add_parser("selftest")
    p.set_defaults(func=cmd_selftest)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
