"""The frame cache shared by gateway replicas (issue 24, item 2): ``server/video/shared_cache.py`` on a
directory, and two ``VideoService`` instances (two replicas: their own in-memory caches, one shared volume)
decoding a real generated clip."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest

from framewise.server.video.decode import DecodeLimits, SampledVideo, VideoInfo, sample_video
from framewise.server.video.sampling import FrameSampling
from framewise.server.video.service import FrameCache, VideoService
from framewise.server.video.shared_cache import SharedFrameStore
from framewise.server.video.synth import write_clip

INFO = VideoInfo(duration=2.0, frame_rate=24.0, width=8, height=6, codec="h264", has_audio=False)


def video(seed: int, frames: int = 4) -> SampledVideo:
    rng = np.random.default_rng(seed)
    return SampledVideo(frames=rng.integers(0, 256, (frames, 6, 8, 3), dtype=np.uint8),
                        timestamps=[i / 24 for i in range(frames)], info=INFO)


def test_an_entry_comes_back_whole(tmp_path):
    store = SharedFrameStore(tmp_path, 10 << 20)
    key = ("sha", (8, None, None, None, "midpoints"), 8, 32, 336)
    assert store.get(key) is None and not store.has(key)
    v = video(0)
    store.put(key, v)
    got = store.get(key)
    assert store.has(key) and np.array_equal(got.frames, v.frames) and got.frames.dtype == np.uint8
    assert got.timestamps == v.timestamps and got.info == INFO
    assert not list(tmp_path.glob("*/.tmp-*"))  # written under temporary names, renamed into place


def test_the_least_recently_used_entries_go_past_the_bound(tmp_path):
    size = video(0).frames.nbytes
    store = SharedFrameStore(tmp_path, int(3.5 * (size + 300)))  # room for three entries
    keys = [(f"v{i}",) for i in range(5)]
    for i, key in enumerate(keys[:3]):
        store.put(key, video(i))
        os.utime(store._paths(key)[1], (time.time() - 100 + i, time.time() - 100 + i))
    assert store.get(keys[0]) is not None  # used: now the most recent
    store.put(keys[3], video(3))
    assert [store.has(k) for k in keys[:4]] == [True, False, True, True]
    assert sum(size for _, size, _, _ in store.entries()) <= store.max_bytes


def test_an_entry_larger_than_the_bound_is_not_stored(tmp_path):
    store = SharedFrameStore(tmp_path, 100)
    store.put(("big",), video(0))
    assert not store.has(("big",))


@pytest.mark.parametrize("damage", ["truncate", "garbage-json", "shape", "pickled"])
def test_a_damaged_entry_is_a_miss_and_is_removed(tmp_path, damage):
    store = SharedFrameStore(tmp_path, 10 << 20)
    key = ("damaged",)
    store.put(key, video(0))
    frames_path, meta_path = store._paths(key)
    if damage == "truncate":
        frames_path.write_bytes(frames_path.read_bytes()[:100])
    elif damage == "garbage-json":
        meta_path.write_text("{not json")
    elif damage == "shape":
        np.save(frames_path, np.zeros((2, 6, 8, 3), np.uint8))  # 2 frames for 4 timestamps
    else:
        np.save(frames_path, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # never unpickled
    assert store.get(key) is None
    assert not frames_path.exists() and not meta_path.exists()


class CountingPool:
    """The decode pool's interface, running in this thread and counting decodes."""

    def __init__(self):
        self.calls = 0

    async def run(self, fn, *args, timeout=None, **kw):
        self.calls += 1
        return fn(*args, **kw)


def test_a_video_one_replica_decoded_is_a_hit_for_another(tmp_path):
    clip = write_clip(str(tmp_path / "clip.mp4"), frames=48, fps=24)
    store_dir = tmp_path / "files" / "frame-cache"
    replicas = [VideoService(CountingPool(), FrameCache(64 << 20), DecodeLimits(), 30,
                             SharedFrameStore(store_dir, 64 << 20)) for _ in range(2)]
    params = FrameSampling(num_frames=4)
    shape = {"default_frames": 8, "max_frames": 32, "shortest_edge": None}

    async def run():
        first = await replicas[0].sample(clip, "sha-clip", params, **shape)
        await asyncio.gather(*replicas[0]._writes)  # the shared write runs beside the answer
        second = await replicas[1].sample(clip, "sha-clip", params, **shape)
        again = await replicas[1].sample(None, "sha-clip", params, **shape)  # no bytes at hand: memory
        return first, second, again

    first, second, again = asyncio.run(run())
    assert (first.cache, second.cache, again.cache) == ("miss", "shared", "memory")
    assert [r.pool.calls for r in replicas] == [1, 0]  # the second replica decoded nothing
    assert np.array_equal(second.video.frames, first.video.frames)
    assert second.video.timestamps == first.video.timestamps and second.video.info == first.video.info
    for k in ("targets", "seek_used"):  # the per-frame seek report survives the shared cache
        assert second.video.extra[k] == first.video.extra[k] and len(first.video.extra[k]) == 4
    direct = sample_video(clip, params, **shape)
    assert np.array_equal(direct.frames, second.video.frames)
    assert replicas[1].cached("sha-clip", params, **shape) and not replicas[1].cached("other", params, **shape)
