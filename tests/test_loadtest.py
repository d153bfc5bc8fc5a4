"""The locust scenarios against the session's ``framewise serve`` (tests/stack.py): a ~20 s headless run through
locust's library API (``loadtests.run`` -> ``loadtests.swarm``, a child process: locust monkey-patches the
standard library with gevent on import) with every scenario tag; all on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.stack import KEY

pytestmark = pytest.mark.engine

# scenario tag -> the locust entries that must have at least one success
EXPECTED = {
    "stream": ["chat [stream]", "time_to_first_token", "inter_token_latency", "e2e_latency"],
    "nonstream": ["chat [nonstream]"],
    "repeat": ["chat [repeat first]", "chat [repeat next]", "time_to_first_token [repeat first]",
               "time_to_first_token [repeat next]"],
    "upload": ["/v1/files", "chat [upload]"],
    "image": ["chat [image]"],
    "job": ["/v1/jobs", "/v1/jobs/{id}/events", "/v1/jobs/{id}", "job_queue_wait", "job_duration"],
}


def _total(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def test_every_scenario_succeeds_under_locust(gateway, loadtest_clip_port, tmp_path):
    tags = list(EXPECTED)  # (importing the locustfile here would monkey-patch this process)
    gw = gateway  # it allows the clip server's port (tests/stack.py)
    before = gw.metrics()
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.run", "--host", gw.base_url, "--tags", *tags, "--clip-port",
         str(loadtest_clip_port), "--users", str(len(tags)), "--spawn-rate", str(len(tags)), "--run-time", "20",
         "--clips", "smoke", "--frames", "4", "--max-tokens", "12", "--api-key", KEY, "--out", str(tmp_path),
         "--name", "smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    after = gw.metrics()
    out = proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "smoke_summary.json").read_text())
    assert proc.returncode == 0, out[-3000:]
    assert summary["failures"] == 0 and not summary["errors"] and not summary["exceptions"], summary
    assert sorted(summary["user_classes"]) == sorted(["StreamChatUser", "ChatUser", "RepeatQuestionsUser",
                                                      "UploadUser", "ImageChatUser", "JobUser"])
    entries = {e["name"]: e for e in summary["entries"]}
    for tag, names in EXPECTED.items():
        for name in names:
            assert entries.get(name, {}).get("successes", 0) >= 1, f"{tag}: no success for {name!r}: {entries}"
    assert entries["time_to_first_token"]["type"] == "METRIC" and entries["time_to_first_token"]["median_ms"] > 0
    # locust's own outputs and the plot
    for suffix in ("_stats.csv", "_stats_history.csv", "_failures.csv", ".html", ".png"):
        assert (tmp_path / f"smoke{suffix}").stat().st_size > 0, suffix
    assert "chat [stream]" in (tmp_path / "smoke_stats.csv").read_text()

    # the gateway saw the traffic
    chat_ok = _total(after, "framewise_requests_total", route="/v1/chat/completions", status="200")
    assert chat_ok - _total(before, "framewise_requests_total", route="/v1/chat/completions", status="200") >= 5
    for name, labels in [("framewise_frames_sampled_total", {}), ("framewise_frame_cache_hits_total", {}),
                         ("framewise_time_to_first_token_seconds_count", {}),
                         ("framewise_jobs_total", {"outcome": "succeeded"}),
                         ("framewise_requests_total", {"route": "/v1/files", "status": "200"})]:
        assert _total(after, name, **labels) > _total(before, name, **labels), name
