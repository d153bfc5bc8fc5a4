"""Issue 21's fault run under load, quick form: ``python -m loadtests.chaos --quick`` (its own Redis, gateway and
worker on the demo checkpoint, engines eager and pinned to one CPU; 2 locust users on the mixed profile) while
it SIGKILLs the gateway's engine core, SIGKILLs Redis (restarted on its AOF), SIGTERMs the gateway and SIGKILLs
the worker; a supervisor restarts each. Its ledger must hold: every job accepted succeeded exactly once or
failed with a reason, each fault's service came back, with the exit status the fault calls for."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.engine, pytest.mark.long, pytest.mark.timeout(2400)]


def test_quick_chaos_run_keeps_every_job_exactly_once(tc_llava_dir, tmp_path):
    out = tmp_path / "chaos"
    proc = subprocess.run([sys.executable, "-m", "loadtests.chaos", "--quick", "--model-dir", str(tc_llava_dir),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=2300)
    text = proc.stdout + proc.stderr
    assert (out / "chaos_ledger.json").exists(), text[-5000:]
    ledger = json.loads((out / "chaos_ledger.json").read_text())
    assert proc.returncode == 0 and ledger["ok"], (ledger["problems"], text[-5000:])

    # every job accepted: succeeded exactly once, or failed with a reason
    jobs = ledger["jobs"]
    assert jobs["accepted"] >= 1 and jobs["told_to_clients"] >= 1, jobs["by_how"]
    for job in jobs["records"]:
        assert (job["status"], job["completions"]) == ("succeeded", 1) or (
            job["status"] == "failed" and job["error"] and job["completions"] == 0), job
    assert jobs["problems"] == []

    # each fault: injected, its window recorded, its service back with the exit status it calls for
    faults = {f["fault"]: f for f in ledger["faults"]}
    assert list(faults) == ["gateway-engine-core", "redis", "gateway-sigterm", "worker-kill"]
    for f in faults.values():
        assert f["back"] and f["problems"] == [], f
        assert 0 <= f["start"] < f["end"], f
        assert f["requests"]["window"] == f["fault"]
    assert faults["gateway-engine-core"]["exit_code"] == 1  # engine death: exit 1, restarted
    assert faults["gateway-engine-core"]["health_after"] in ("503 engine_dead", "no answer (exited)")
    assert faults["gateway-sigterm"]["exit_code"] in (0, -15, 143)  # a drain: a clean exit (or the signal)
    assert faults["worker-kill"]["exit_code"] == -9
    assert faults["redis"]["exit_code"] == -9

    # the supervisor's record: each fault's process exited and a new one was ready; nothing else exited
    restarts = [r for r in ledger["restarts"] if not r["at_shutdown"]]
    assert sorted((r["service"], r["fault"]) for r in restarts) == sorted(
        [("gateway", "gateway-engine-core"), ("redis", "redis"), ("gateway", "gateway-sigterm"),
         ("worker", "worker-kill")]), restarts
    assert all(r["ready_at"] is not None and r["ready_at"] > r["exited_at"] for r in restarts), restarts

    # requests were made and the ones that failed are attributed (by status) to a window
    assert ledger["requests"]["total"] > 0
    windows = ledger["requests"]["windows"]
    assert sum(w["requests"] for w in windows) == ledger["requests"]["total"]
    assert sum(w["failed"] for w in windows) == ledger["requests"]["failed"]
    assert (out / "chaos_ledger.md").read_text().startswith("| fault |")
