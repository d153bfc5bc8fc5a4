"""The CUDA attention path without a GPU: vLLM 0.32's Triton unified attention with the plugin's
frame-block ranges, run by Triton's CPU interpreter (``TRITON_INTERPRET=1``).

``bench/triton_frame_blocks.py`` runs, in a fresh process (the interpreter must be chosen before
anything imports triton, and other tests of the session import vLLM), the plugin's
``TritonFrameBlockMetadataBuilder`` and vLLM's ``TritonAttentionImpl`` (KV-cache write +
``unified_attention``) over a paged cache of 16-token blocks for a batch mixing a text-only
prompt, a video prompt, a video prompt resuming after a prefix-cache hit inside a frame, and a
decode step. The outputs are compared here with masked attention built from ``layers/temporal.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.triton_frame_blocks import VARIANTS, Request, mask_for, reference
from framewise.model_plugins.layers.temporal import frame_block_causal_mask

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


@pytest.fixture(scope="module")
def run(tc_llava_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("triton") / "run.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.triton_frame_blocks", "--model", str(tc_llava_dir), "--interpret",
         "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return torch.load(out, weights_only=False)


def _requests(run) -> list[Request]:
    return [Request(**r) for r in run["requests"]]


def _query_rows(reqs: list[Request]) -> list[range]:
    rows, at = [], 0
    for r in reqs:
        n = r.seq_len - r.num_computed
        rows.append(range(at, at + n))
        at += n
    return rows


def test_batch_covers_the_cases(run):
    """Text only, a whole video prompt, a resume after a prefix-cache hit inside a frame, a decode step."""
    reqs, m = _requests(run), run["m"]
    text, video, resumed, decode = reqs
    assert text.video_start is None and text.num_computed == 0
    assert video.video_start is not None and video.num_computed == 0 and video.num_frames >= 2
    span = resumed.span(m)
    frame_first = span.start + (resumed.num_computed - span.start) // m * m
    assert span.start < frame_first < resumed.num_computed < frame_first + m - 1, "hit must end inside a frame"
    assert decode.seq_len - decode.num_computed == 1 and decode.span(m) is not None
    assert m > 1 and run["outputs"]["frame_blocks"].dtype == torch.float32


def test_triton_kernel_matches_frame_block_mask(run):
    """vLLM's Triton kernel with the plugin's ranges == frame-wise block-causal attention (fp32, <= 1e-5)."""
    reqs, m = _requests(run), run["m"]
    out = run["outputs"]["frame_blocks"]
    ref = reference(reqs, run["inputs"], m, "frame_blocks")
    assert torch.isfinite(out).all()
    for i, rows in enumerate(_query_rows(reqs)):
        err = (out[rows.start : rows.stop] - ref[rows.start : rows.stop]).abs().max().item()
        assert err <= TOL, f"request {i}: {err:.2e}"


def test_without_frame_blocks_exactly_the_video_rows_differ(run):
    """Stock TRITON_ATTN (one range per video) and no ranges (causal): each equals its own mask, and the
    outputs differ from the frame-block ones on exactly the query rows whose mask row differs."""
    reqs, m = _requests(run), run["m"]
    fb = run["outputs"]["frame_blocks"]
    for variant in ("whole_video", "causal"):
        out = run["outputs"][variant]
        assert (out - reference(reqs, run["inputs"], m, variant)).abs().max().item() <= TOL, variant
        expected_rows = torch.cat([
            (mask_for(r, m, variant) != frame_block_causal_mask(r.seq_len, [r.span(m)] if r.span(m) else []))
            .any(1)[r.num_computed :]
            for r in reqs
        ])
        row_diff = (out - fb).abs().amax(dim=(1, 2))
        assert expected_rows.sum() >= 2 * m, variant
        assert row_diff[expected_rows].min().item() > 1e-3, variant
        assert row_diff[~expected_rows].max().item() <= TOL, variant
        # the prefix-cache resume has such rows too (its frame that straddles the hit)
        resumed = _query_rows(reqs)[2]
        assert expected_rows[resumed.start : resumed.stop].any(), variant


def test_builder_turns_frame_ranges_into_kernel_ranges(run):
    """The kernel argument ``mm_prefix_range_tensor`` built by the GPU metadata path: one inclusive
    (start, end) per m-token frame with the plugin's builder, one per video with vLLM's, none causal."""
    reqs, m = _requests(run), run["m"]
    spans = [r.span(m) for r in reqs]
    width = max(s.num_frames for s in spans if s)
    want = torch.zeros(len(reqs), width, 2, dtype=torch.int32)
    whole = torch.zeros(len(reqs), 1, 2, dtype=torch.int32)
    for i, s in enumerate(spans):
        if s:
            want[i, : s.num_frames] = torch.tensor(s.frame_ranges(), dtype=torch.int32)
            whole[i, 0] = torch.tensor([s.start, s.end - 1])
    assert torch.equal(run["range_tensors"]["frame_blocks"], want)
    assert torch.equal(run["range_tensors"]["whole_video"], whole)
    assert run["range_tensors"]["causal"] is None
    assert set(run["outputs"]) == set(VARIANTS)


def test_decode_step_runs_the_split_kv_kernel_with_the_ranges(run):
    """A decode-only step goes through vLLM's 3D kernel + reduce_segments with the frame ranges passed
    (the runner keeps them for the request's lifetime) and equals the frame-block (= causal) attention."""
    dec, m = run["decode"], run["m"]
    reqs = [Request(**r) for r in dec["requests"]]
    assert dec["used_3d"], "the split-KV (3D) path did not run"
    assert all(r.seq_len - r.num_computed == 1 for r in reqs)
    assert dec["range_tensor"] is not None and int((dec["range_tensor"][:, :, 1] > 0).sum()) == sum(
        r.num_frames for r in reqs)
    err = (dec["output"] - reference(reqs, dec["inputs"], m, "frame_blocks")).abs().max().item()
    assert err <= TOL, f"{err:.2e}"


def test_gpu_check_script_parses_and_its_python_imports(tmp_path):
    script = ROOT / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(script)], check=True)
    dry = subprocess.run(["bash", str(script), "--dry-run", "--out", str(tmp_path / "gpu")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, (dry.stdout + dry.stderr)[-4000:]
    assert "python -m bench.gpu_check" in dry.stdout and "bench.triton_frame_blocks" in dry.stdout
    assert "selftest ok" in dry.stdout  # the Python entry imported and every subcommand parsed

def _resolved_cudagraph_mode(builder_cls, requested):
    from vllm.config import CompilationConfig

    support = builder_cls.get_cudagraph_support(None, None)
    return CompilationConfig(cudagraph_mode=requested).resolve_cudagraph_mode_and_sizes(support, builder_cls.__name__)


def test_full_cuda_graphs_only_for_single_token_decode():
    """A full CUDA graph replays the launch it captured (captures carry no ranges): with vLLM's stock
    builder ``cudagraph_mode=FULL`` would replay prefills as plain causal attention; the plugin's builder
    keeps full graphs for decode only and leaves the default mode as it is."""
    from vllm.config import CUDAGraphMode
    from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadataBuilder

    from framewise.model_plugins.layers.gpu_frame_block_attention import TritonFrameBlockMetadataBuilder

    assert _resolved_cudagraph_mode(TritonAttentionMetadataBuilder, CUDAGraphMode.FULL).mixed_mode() == CUDAGraphMode.FULL
    mode = _resolved_cudagraph_mode(TritonFrameBlockMetadataBuilder, CUDAGraphMode.FULL)
    assert mode.mixed_mode() != CUDAGraphMode.FULL and mode.decode_mode() == CUDAGraphMode.FULL
    default = CUDAGraphMode.FULL_AND_PIECEWISE
    assert _resolved_cudagraph_mode(TritonFrameBlockMetadataBuilder, default) == default
