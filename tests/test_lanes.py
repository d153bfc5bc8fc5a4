"""The suite's two lanes (tests/lanes.py): the scheduler keeps each group whole on one worker, gives ``stack`` and
``docker`` only to lane 0, and hands out groups without an engine first, then a lane's own groups, then the other
engine groups (``long`` ones first), each in collection order."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.lanes import LaneScheduling, engine_cpu, owner

# node id -> (group, weight: 0 no engine, 1 an engine, 2 marked `long`), in collection order (tests/conftest.py:
# no engine first, Docker last)
TESTS = {
    "tests/test_a.py::test_1": ("tests/test_a.py", 0), "tests/test_a.py::test_2": ("tests/test_a.py", 0),
    "tests/test_b.py::test_1": ("tests/test_b.py", 0),
    "tests/test_c.py::test_1": ("tests/test_c.py", 0),
    "tests/test_c.py::test_2": ("tests/test_c.py", 1),  # a module with both: one group, with an engine
    "tests/test_chaos.py::test_1": ("tests/test_chaos.py", 1),
    "tests/test_gateway.py::test_1": ("stack", 1), "tests/test_gateway.py::test_2": ("stack", 1),
    "tests/test_parity.py::test_1": ("tests/test_parity.py", 1),
    "tests/test_parity.py::test_2": ("tests/test_parity.py", 1),
    "tests/test_real.py::test_1": ("tests/test_real.py", 2),
    "tests/test_jobs.py::test_1": ("stack", 1),  # ends a shared process: sorted after the engine tests
    "tests/test_deploy.py::test_1": ("docker", 1), "tests/test_deploy.py::test_2": ("docker", 1),
}
COLLECTION = list(TESTS)


class Node:
    def __init__(self, name: str):
        self.gateway = SimpleNamespace(id=name)
        self.shutting_down = False
        self.sent: list[list[str]] = []

    def send_runtest_some(self, indices: list[int]) -> None:
        self.sent.append([COLLECTION[i] for i in indices])

    def shutdown(self) -> None:
        self.shutting_down = True

    def ran(self) -> list[str]:
        return [t for batch in self.sent for t in batch]


@pytest.fixture
def lanes(tmp_path, monkeypatch):
    path = tmp_path / "groups.json"
    path.write_text(json.dumps(TESTS))
    monkeypatch.setenv("FRAMEWISE_LANE_GROUPS", str(path))
    config = SimpleNamespace(option=SimpleNamespace(loadscopereorder=False),
                             getvalue=lambda name: {"tx": ["2*popen"]}[name])  # what `-n 2` sets
    sched = LaneScheduling(config)
    nodes = [Node("gw0"), Node("gw1")]
    for node in nodes:
        sched.add_node(node)
        sched.add_node_collection(node, COLLECTION)
    sched.schedule()
    return sched, nodes


def complete(sched: LaneScheduling, node: Node, batch: int) -> None:
    for nodeid in node.sent[batch]:
        sched.mark_test_complete(node, COLLECTION.index(nodeid))


def test_groups_stay_whole_and_owned_groups_run_on_lane_0(lanes):
    sched, (gw0, gw1) = lanes
    done = {gw0: 0, gw1: 0}
    while sched.has_pending:
        for node in (gw0, gw1):
            if done[node] < len(node.sent):
                complete(sched, node, done[node])
                done[node] += 1
    ran = {n.gateway.id: n.ran() for n in (gw0, gw1)}
    assert sorted(ran["gw0"] + ran["gw1"]) == sorted(COLLECTION)  # each test once
    for group in {g for g, _ in TESTS.values()}:  # a group's tests on one worker, in collection order
        [worker] = {w for w, tests in ran.items() for t in tests if TESTS[t][0] == group}
        mine = [t for t in ran[worker] if TESTS[t][0] == group]
        assert mine == [t for t in COLLECTION if TESTS[t][0] == group], group
    assert {t for t in COLLECTION if TESTS[t][0] in ("stack", "docker")} <= set(ran["gw0"])
    assert gw0.shutting_down and gw1.shutting_down


def test_the_order_no_engine_first_then_a_lanes_own_groups_then_long_ones_then_the_rest(lanes):
    sched, (gw0, gw1) = lanes
    group = {g: [t for t in COLLECTION if TESTS[t][0] == g] for g, _ in TESTS.values()}
    # one group each, in collection order; then (pytest-xdist tops a worker up to more than two pending tests)
    # gw0 takes its own group, gw1 the long one: both before test_c, which comes first but starts an engine
    assert gw0.sent == [group["tests/test_a.py"], group["stack"]]
    assert gw1.sent == [group["tests/test_b.py"], group["tests/test_real.py"]]
    complete(sched, gw1, 0)
    assert gw1.sent[2] == group["tests/test_c.py"]  # then the engine groups in collection order
    complete(sched, gw0, 0)
    complete(sched, gw0, 1)
    assert gw0.sent[2] == group["docker"]  # its own group before the engine groups ahead of it
    complete(sched, gw0, 2)
    assert gw0.sent[3] == group["tests/test_chaos.py"]  # then whatever engine group comes next


def test_without_the_groups_file_a_module_is_a_group_and_nothing_is_owned(lanes):
    """Node ids alone (what pytest-xdist's loadgroup would need to rewrite) carry no group: the file does."""
    sched, _ = lanes
    sched.groups = {}
    assert sched._split_scope("tests/test_gateway.py::test_1") == "tests/test_gateway.py"
    sched.groups = {n: g for n, (g, _) in json.loads(Path(os.environ["FRAMEWISE_LANE_GROUPS"]).read_text()).items()}
    assert sched._split_scope("tests/test_gateway.py::test_1") == "stack"


def test_lane_cpus_and_owners():
    assert [engine_cpu(lane, [0, 1]) for lane in (0, 1)] == [1, 0]  # lane 0 where one process puts engines
    assert engine_cpu(0, [0]) == engine_cpu(1, [0]) == 0
    assert owner("stack", 2) == owner("docker", 2) == 0 and owner("docker", 1) == 0
    assert owner("tests/test_a.py", 2) is None
