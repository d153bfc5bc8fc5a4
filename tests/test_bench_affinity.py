"""bench/affinity.py's committed results hold together: the statistics and targets recomputed from the raw
samples are the stored ones, the README table shows them, and the plot is drawn from them (no engine: the
benchmark itself runs by hand, ``python -m bench.affinity``)."""

from __future__ import annotations

import copy
import json

from bench import affinity
from tests.conftest import ROOT

RESULTS = ROOT / "bench" / "results" / "affinity.json"


def test_stored_statistics_are_those_of_the_raw_samples(tmp_path):
    doc = json.loads(RESULTS.read_text())
    res = {r["setup"]: affinity.derive(copy.deepcopy(r)) for r in doc["setups"]}
    assert set(res) == set(affinity.SETUPS)
    for r in doc["setups"]:
        assert res[r["setup"]]["follow_up_ttft_ms"] == r["follow_up_ttft_ms"]
        assert res[r["setup"]]["first_ttft_ms"] == r["first_ttft_ms"]
        assert r["follow_up_ttft_ms"]["n"] > 100 and r["questions"] >= r["follow_up_ttft_ms"]["n"]
    assert affinity.targets(res) == doc["targets"]
    affinity.plot(res, tmp_path / "affinity.png")
    assert (tmp_path / "affinity.png").stat().st_size > 10_000


def test_the_readme_table_is_the_results():
    doc = json.loads(RESULTS.read_text())
    table = (ROOT / "bench" / "README.md").read_text().split("## Video-affinity routing", 1)[1]
    for r in doc["setups"]:
        f = r["follow_up_ttft_ms"]
        row = f"{f['p50']:.0f} / {f['p90']:.0f} / {f['p95']:.0f} / {f['mean']:.0f}"
        assert row in table, (r["setup"], row)
        assert f"| {r['questions']} | {r['failed']} | {100 * r['frame_cache_hit_rate']:.1f} %" in table, r["setup"]
        assert f"{100 * r['prefix_cache_hit_rate']:.1f} %" in table, r["setup"]
    kill = doc["setups"][-1]["kill"]
    assert kill["failed_not_in_flight"] == 0 and kill["served_by_dead_after_kill"] == 0
    assert f"{kill['failed']} failed, all {kill['in_flight_at_kill']} in flight" in table
