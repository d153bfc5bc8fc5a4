"""Admission control of chat requests: 503 before the engine is ready, 429 when full."""

from types import SimpleNamespace

import pytest

from framewise.server.errors import APIError
from framewise.server.metrics import Metrics
from framewise.server.routers.chat import _Slot
from framewise.server.settings import Settings


def services(ready: bool, limit: int):
    return SimpleNamespace(engine=SimpleNamespace(ready=ready), inflight=0, metrics=Metrics(),
                           settings=Settings(max_concurrent_requests=limit))


def test_not_ready_is_503():
    with pytest.raises(APIError) as e:
        _Slot(services(ready=False, limit=2))
    assert (e.value.status, e.value.code) == (503, "engine_not_ready")


def test_full_is_429_and_slots_come_back():
    s = services(ready=True, limit=2)
    a, b = _Slot(s), _Slot(s)
    with pytest.raises(APIError) as e:
        _Slot(s)
    assert (e.value.status, e.value.code) == (429, "overloaded")
    a.release()
    a.release()  # idempotent
    assert s.inflight == 1
    c = _Slot(s)
    b.release()
    c.release()
    assert s.inflight == 0
