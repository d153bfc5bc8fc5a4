"""Two lanes, one per CPU: ``pytest -n 2`` (pytest-xdist) with :class:`LaneScheduling`.

A vLLM CPU engine computes on one core here, so one pytest process running engine tests one after another
leaves the other core mostly idle (measured: 55-60 % busy over the engine tests). Two pytest workers, each
with its own CPU for the engines it starts (``FRAMEWISE_SERVER_CPU``), run two such streams side by side.
Tests are handed out in groups, a group whole to one worker: ``stack`` (every test on the session's shared
processes, tests/stack.py), ``docker``, and each other module (its module-scoped engines stay one start).
A worker with room takes, of the groups it may run, the first of

1. the groups without an engine (in collection order), while the shared engines and the Docker build load;
2. its own groups: lane 0 owns ``stack`` and ``docker`` (so it alone starts the shared processes and the
   build, before its first test, as a single process does);
3. the other engine groups, those with a test marked ``long`` (minutes in one module) first, in collection
   order: whichever lane is free takes the next; taken last, a long one left the other lane idle for minutes.

The workers know each test's group (its fixtures and markers); the scheduler, in the controller, sees only
node ids: each worker writes ``{node id: [group, weight]}`` (0 no engine, 1 an engine, 2 ``long``) to the file named by
``FRAMEWISE_LANE_GROUPS`` when it has collected, and the scheduler reads it once every worker has
(pytest-xdist's own ``--dist loadgroup`` renames node ids, which pytest 9 no longer lets it do).

Without ``-n`` nothing here applies: one process runs everything in collection order, engines on the last CPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from xdist.scheduler import LoadScopeScheduling

OWNER = {"stack": 0, "docker": 0}  # group -> the lane that runs it (and starts its processes early)


def lane_of(workerid: str, workers: int) -> int:
    """``gw1`` -> 1; a group owned by a lane beyond the workers started goes to the last one."""
    return min(int(workerid.removeprefix("gw")), workers - 1)


def owner(group: str, workers: int) -> int | None:
    return None if group not in OWNER else min(OWNER[group], workers - 1)


def this_lane(config) -> tuple[int, int] | None:
    """(lane, workers) in a pytest-xdist worker, else None (a nested pytest inherits the environment variables
    of the worker it runs in, not its ``workerinput``)."""
    worker = getattr(config, "workerinput", None)
    if worker is None:
        return None
    return lane_of(worker["workerid"], worker["workercount"]), worker["workercount"]


def runs_here(group: str, config) -> bool:
    """Whether this process runs the tests of ``group`` (always, without xdist)."""
    lane = this_lane(config)
    return lane is None or owner(group, lane[1]) in (None, lane[0])


def engine_cpu(lane: int, cpus: list[int]) -> int:
    """Lane 0's engines on the last CPU (as without lanes), lane 1's on the first, and so on down."""
    return cpus[max(len(cpus) - 1 - lane, 0)]


def group_of(item) -> str:
    """``docker``, ``stack`` (the test takes a shared process of tests/stack.py) or the test's module."""
    from tests.stack import SHARED

    if item.get_closest_marker("docker"):
        return "docker"
    if any(SHARED[name] in item.fixturenames for name in SHARED):
        return "stack"
    return item.nodeid.split("::")[0]


def weight_of(item) -> int:
    """0 no engine, 1 an engine or Docker, 2 minutes of it (marker ``long``)."""
    heavy = any(item.get_closest_marker(m) for m in ("engine", "docker"))
    return 2 if heavy and item.get_closest_marker("long") else int(heavy)


def write_groups(items, config) -> None:
    """In a worker, after collection: each test's group and weight, for the scheduler (every worker writes the
    same)."""
    path = Path(os.environ["FRAMEWISE_LANE_GROUPS"])
    part = path.with_name(f"{path.name}.{config.workerinput['workerid']}")
    part.write_text(json.dumps({item.nodeid: (group_of(item), weight_of(item)) for item in items}))
    part.replace(path)


class LaneScheduling(LoadScopeScheduling):
    """One worker runs a whole group; a group in :data:`OWNER` only on its lane; a worker with room takes the
    group the module doc's order gives."""

    groups: dict[str, str] = {}
    rank: dict[str, int] = {}

    def _split_scope(self, nodeid: str) -> str:
        return self.groups.get(nodeid) or nodeid.split("::")[0]

    def schedule(self) -> None:
        if self.collection is None:  # the first call: every worker has collected (and written its groups)
            tests = json.loads(Path(os.environ["FRAMEWISE_LANE_GROUPS"]).read_text())
            self.groups = {nodeid: group for nodeid, (group, _) in tests.items()}
            weight: dict[str, int] = {}
            for group, w in tests.values():
                weight[group] = max(weight.get(group, 0), w)
            self.rank = {g: 0 if not w else 1 if g in OWNER else 4 - w for g, w in weight.items()}
        super().schedule()

    def _may_run(self, node, scope: str) -> bool:
        lane = owner(scope, len(self.nodes))
        return lane is None or lane == lane_of(node.gateway.id, len(self.nodes))

    def _assign_work_unit(self, node) -> None:
        allowed = [s for s in self.workqueue if self._may_run(node, s)]
        scope = min(allowed, key=lambda s: self.rank.get(s, 0), default=None)  # the first of the lowest rank
        if scope is None:
            return
        work_unit = self.workqueue.pop(scope)
        self.assigned_work.setdefault(node, {})[scope] = work_unit
        collection = self.registered_collections[node]
        node.send_runtest_some([collection.index(nodeid) for nodeid, done in work_unit.items() if not done])

    def _reschedule(self, node) -> None:
        if node.shutting_down:
            return
        if not any(self._may_run(node, s) for s in self.workqueue):
            node.shutdown()  # after what it was given
            return
        if self._pending_of(self.assigned_work.get(node, {})) > 2:
            return
        self._assign_work_unit(node)
