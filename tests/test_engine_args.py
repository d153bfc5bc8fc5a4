"""`framewise serve` / `framewise worker` take vLLM's own engine options (AsyncEngineArgs' CLI, reused, not
re-declared); Framewise's engine defaults apply only where the user gave none."""

from __future__ import annotations

import subprocess
import sys

import pytest

from framewise.server.cli import ENGINE_COMMANDS, build_parser, engine_overrides
from framewise.server.engine import engine_args
from framewise.server.settings import Settings
from tests.conftest import ROOT

GPU_FLAGS = ["--tensor-parallel-size", "--gpu-memory-utilization", "--dtype", "--max-num-seqs", "--kv-cache-dtype",
             "--enable-prefix-caching"]


def _sub(command: str, engine_options: bool = True):
    ap = build_parser(engine_options=engine_options)
    sub = next(a for a in ap._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[command]


def test_help_lists_vllm_engine_options():
    out = subprocess.run([sys.executable, "-m", "framewise.server.cli", "worker", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for text in (out.stdout, _sub("serve").format_help()):
        for flag in GPU_FLAGS:
            assert flag in text, flag
        assert "vLLM engine options: ParallelConfig" in text


@pytest.mark.parametrize("command", ENGINE_COMMANDS)
def test_every_vllm_engine_option_is_accepted_as_vllm_declares_it(command):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    ours = _sub(command)._option_string_actions
    vllm = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(add_help=False))
    # flags Framewise declares itself (--model, --max-model-len, --log-level, ...) keep Framewise's meaning
    framewise_own = set(_sub(command, engine_options=False)._option_string_actions)
    assert {"--model", "--max-model-len"} <= framewise_own and "--dtype" not in framewise_own
    missing, differing = [], []
    for action in vllm._actions:
        for opt in action.option_strings:
            if opt in framewise_own:
                continue
            mine = ours.get(opt)
            if mine is None:
                missing.append(opt)
            elif (mine.dest, mine.help, mine.choices, type(mine)) != (action.dest, action.help, action.choices,
                                                                      type(action)):
                differing.append(opt)
    assert not missing and not differing, (missing[:10], differing[:10])


def test_given_engine_options_override_framewise_defaults(tmp_path):
    args = build_parser(engine_options=True).parse_args([
        "serve", "--model", str(tmp_path), "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.5",
        "--dtype", "bfloat16", "--max-num-seqs", "7", "--kv-cache-dtype", "fp8", "--no-enable-prefix-caching",
        "--max-model-len", "2048"])
    given = engine_overrides(args)
    assert given == {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.5, "dtype": "bfloat16",
                     "max_num_seqs": 7, "kv_cache_dtype": "fp8", "enable_prefix_caching": False}
    ea = engine_args(Settings(model=str(tmp_path), max_model_len=args.max_model_len), given)
    assert (ea.tensor_parallel_size, ea.gpu_memory_utilization, ea.dtype, ea.max_num_seqs, ea.kv_cache_dtype,
            ea.enable_prefix_caching) == (2, 0.5, "bfloat16", 7, "fp8", False)
    assert ea.model == str(tmp_path) and ea.max_model_len == 2048  # Framewise's own flags still reach the engine


def test_framewise_defaults_apply_where_none_given(tmp_path):
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = build_parser(engine_options=True).parse_args(["worker", "--model", str(tmp_path)])
    assert engine_overrides(args) == {}
    ea = engine_args(Settings(model=str(tmp_path)), engine_overrides(args))
    assert ea.dtype == "float32"  # Framewise's CPU default, not vLLM's "auto"
    assert ea.enable_prefix_caching is True
    assert ea.limit_mm_per_prompt == {"video": 4, "image": 4}
    assert ea.max_num_seqs == AsyncEngineArgs.max_num_seqs  # untouched: vLLM's own default
