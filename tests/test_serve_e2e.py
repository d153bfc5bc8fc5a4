"""``bench/serve_e2e.py --quick`` end to end (small clip, a few requests, Framewise and vLLM's own OpenAI server,
in-process AsyncLLM), so the benchmark cannot rot; the numbers themselves are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.engine, pytest.mark.long]


def test_serve_e2e_quick_runs_both_servers(tc_llava_dir, tmp_path):
    out = tmp_path / "quick.json"
    proc = subprocess.run([sys.executable, "bench/serve_e2e.py", "--quick", "--model", str(tc_llava_dir),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads(out.read_text())
    load = {(r["server"], r["concurrency"]): r for r in res["load"]}
    assert set(load) == {(s, c) for s in ("framewise", "vllm") for c in (1, 2)}
    for r in load.values():
        assert r["errors"] == 0 and r["requests"] >= 2, r
        assert 0 < r["ttft_p50"] <= r["e2e_p50"] and r["rps"] > 0, r
        assert r["completion_tokens"] == [res["max_tokens"]], r
    # the same frames reached both engines: 8 frames x 16 tokens in the prompt on both (the chat templates'
    # text differs by a token); a frame more or less would move it by 16
    [fw_tokens], [vllm_tokens] = load[("framewise", 1)]["prompt_tokens"], load[("vllm", 1)]["prompt_tokens"]
    assert fw_tokens > 8 * 16 and abs(fw_tokens - vllm_tokens) < 16
    repeat = {r["server"]: r for r in res["repeat"]}
    assert set(repeat) == {"framewise", "vllm"} and all(r["errors"] == 0 for r in repeat.values())
    assert len(repeat["framewise"]["ttft_all"]) == 3
    length = {(r["server"], r["minutes"]): r for r in res["length"]}
    assert set(length) == {(s, m) for s in ("framewise", "vllm") for m in (1, 3)}
    assert all(r["errors"] == 0 and r["peak_rss_mib"] > 100 for r in length.values())
    o = res["overhead"]
    assert o["gateway"]["errors"] == 0 and o["gateway"]["ttft_p50"] > 0 and o["inprocess"]["ttft_p50"] > 0
    assert {r["case"] for r in res["ratios"]} == {"quick"}
    assert [t for t in res["targets"] if t["target"].startswith("0 failed")][0]["met"]
    assert all(p.endswith(".png") and (tmp_path / p.rsplit("/", 1)[-1]).stat().st_size > 0 for p in res["plots"])
