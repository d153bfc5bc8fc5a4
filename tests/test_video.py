"""Frame sampling and decoding (DESIGN 2), the decode worker pool, and the SSRF address policy."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import subprocess
import time

import numpy as np
import pytest

from framewise.server.media.fetch import AddressPolicy
from framewise.server.video.decode import DecodeLimits, MediaError, probe, sample_video
from framewise.server.video.pool import DecodePool
from framewise.server.video.sampling import FrameSampling, SamplingError, plan_timestamps, uniform_indices
from framewise.server.video.synth import read_index, write_clip


def indices(path, frames=None, *, fps=None, start=None, end=None, max_frames=64, edge=None):
    v = sample_video(str(path), FrameSampling(frames, fps, start, end), default_frames=8, max_frames=max_frames,
                     shortest_edge=edge)
    return [read_index(f) for f in v.frames], v


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    out = {
        "h264": write_clip(str(d / "h264.mp4"), frames=48, fps=24),
        "vp9": write_clip(str(d / "vp9.webm"), frames=48, fps=24, codec="libvpx-vp9"),
        "mpeg4": write_clip(str(d / "mpeg4.avi"), frames=48, fps=24, codec="mpeg4"),
        "mkv_audio": write_clip(str(d / "audio.mkv"), frames=48, fps=24, audio=True),
        "long_gop": write_clip(str(d / "long.mp4"), frames=600, fps=30, gop=60),
        "one": write_clip(str(d / "one.mp4"), frames=1, fps=24),
        "odd": write_clip(str(d / "odd.mp4"), frames=24, fps=24, width=97, height=61, pix_fmt="yuv444p"),
        "vfr": write_clip(str(d / "vfr.mp4"), frames=6, fps=10, frame_times=[0, 0.1, 0.15, 0.6, 1.5, 1.9]),
    }
    return out


@pytest.mark.parametrize("kind", ["h264", "vp9", "mpeg4", "mkv_audio"])
def test_uniform_sampling_takes_segment_midpoints(clips, kind):
    got, v = indices(clips[kind], 8)
    assert got == uniform_indices(48, 8) == [3, 9, 15, 21, 27, 33, 39, 45]
    assert v.timestamps == pytest.approx([i / 24 for i in got], abs=1e-3)
    assert v.info.duration == pytest.approx(2.0, abs=1e-3)


def test_fps_sampling(clips):
    got, v = indices(clips["h264"], fps=2)  # 2 s at 2 fps: midpoints of 0.5 s segments
    assert got == [6, 18, 30, 42]
    got, _ = indices(clips["h264"], num_frames_cap := 3, fps=10)  # 20 wanted, capped: uniform 3
    assert got == uniform_indices(48, num_frames_cap)


def test_start_end_clipping(clips):
    got, v = indices(clips["h264"], 4, start=0.5, end=1.5)  # frames 12..35
    assert got == [15, 21, 27, 33]
    assert all(0.5 <= t <= 1.5 for t in v.timestamps)


def test_short_clip_gives_every_frame(clips):
    got, _ = indices(clips["h264"], 64)
    assert got == list(range(48))
    got, _ = indices(clips["one"], 8)
    assert got == [0]


def test_variable_frame_rate_picks_the_frame_on_screen(clips):
    times = [0, 0.1, 0.15, 0.6, 1.5, 1.9]
    got, v = indices(clips["vfr"], 4)
    assert v.info.duration >= 1.9
    instants = [(i + 0.5) * v.info.duration / 4 for i in range(4)]
    on_screen = [max(k for k, t in enumerate(times) if t <= x + 1e-6) for x in instants]
    assert got == on_screen and len(set(got)) < 4  # two instants fall on the same long frame
    assert v.timestamps == pytest.approx([times[k] for k in on_screen], abs=1e-3)


def test_sparse_sampling_seeks_instead_of_decoding_everything(clips):
    got, v = indices(clips["long_gop"], 4)
    assert got == uniform_indices(600, 4)
    assert v.seeks >= 3 and v.decoded_frames < 600 / 2


def test_parallel_decoders_return_exactly_what_one_decoder_returns(clips):
    """Runs starting at different keyframes go to independent decoders; the frames,
    their order and timestamps must not depend on how the runs were shared out."""
    for params in (FrameSampling(12), FrameSampling(7, start=3.1, end=17.9), FrameSampling(fps=0.5)):
        one = sample_video(clips["long_gop"], params, default_frames=8, max_frames=64, limits=DecodeLimits(threads=1))
        two = sample_video(clips["long_gop"], params, default_frames=8, max_frames=64, limits=DecodeLimits(threads=2))
        assert (one.extra["decoders"], two.extra["decoders"]) == (1, 2)
        assert np.array_equal(one.frames, two.frames) and one.timestamps == two.timestamps
        assert [read_index(f) for f in two.frames] == [round(t * 30) for t in two.timestamps]
    # dense sampling inside one GOP is a single run: one decoder, FFmpeg's own threads
    assert sample_video(clips["h264"], FrameSampling(8), default_frames=8, max_frames=8).extra["decoders"] == 1


def test_decoders_never_outnumber_the_cpus_the_process_may_run_on(clips):
    """A decode worker pinned to one CPU (``taskset``, as the benchmark pins the server) gets one decoder, not
    ``limits.threads`` of them taking turns on that CPU; the frames are the same either way."""
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        pytest.fail("needs 2 CPUs to compare pinned and unpinned decoding")
    params, limits = FrameSampling(12), DecodeLimits(threads=2)
    try:
        os.sched_setaffinity(0, {min(cpus)})  # this thread, and the decoder threads it starts
        pinned = sample_video(clips["long_gop"], params, default_frames=8, max_frames=64, limits=limits)
    finally:
        os.sched_setaffinity(0, cpus)
    free = sample_video(clips["long_gop"], params, default_frames=8, max_frames=64, limits=limits)
    assert (pinned.extra["decoders"], free.extra["decoders"]) == (1, 2)
    assert np.array_equal(pinned.frames, free.frames) and pinned.timestamps == free.timestamps


def test_scaling_in_the_decoder_keeps_aspect(clips):
    _, v = indices(clips["h264"], 2, edge=56)
    assert v.frames.shape == (2, 56, 90, 3)
    _, v = indices(clips["odd"], 2)
    assert v.frames.shape == (2, 61, 97, 3)


def test_rotation_is_applied(clips, tmp_path):
    assert shutil.which("ffmpeg"), "ffmpeg is installed by `make setup`"
    rotated = tmp_path / "rot.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", clips["h264"], "-c", "copy",
                    "-metadata:s:v:0", "rotate=90", str(rotated)], check=True)
    _, v = indices(rotated, 2)
    assert v.frames.shape == (2, 192, 120, 3)  # 192x120 shown upright as 120x192
    _, plain = indices(clips["h264"], 2)
    assert np.array_equal(np.rot90(v.frames[0], 1), plain.frames[0]) or np.array_equal(
        np.rot90(v.frames[0], -1), plain.frames[0])


@pytest.mark.parametrize("content, code", [(b"", "invalid_video"), (os.urandom(4096), "invalid_video")])
def test_unreadable_files(tmp_path, content, code):
    p = tmp_path / "bad.mp4"
    p.write_bytes(content)
    with pytest.raises(MediaError) as e:
        sample_video(str(p), FrameSampling(4), default_frames=4, max_frames=8)
    assert e.value.code == code and e.value.status == 400


def test_limits(clips, tmp_path):
    with pytest.raises(MediaError) as e:
        probe(clips["h264"], DecodeLimits(max_duration_s=1.0))
    assert (e.value.code, e.value.status) == ("video_too_long", 413)
    with pytest.raises(MediaError) as e:
        probe(clips["h264"], DecodeLimits(max_pixels=100 * 100))
    assert (e.value.code, e.value.status) == ("resolution_too_large", 413)


def test_plan_rejects_bad_parameters():
    with pytest.raises(SamplingError, match="exceeds"):
        plan_timestamps(10, 24, FrameSampling(num_frames=100), default_frames=8, max_frames=32)
    with pytest.raises(SamplingError, match="past the end"):
        plan_timestamps(10, 24, FrameSampling(start=20), default_frames=8, max_frames=32)
    assert len(plan_timestamps(3600, 30, FrameSampling(fps=1), default_frames=8, max_frames=32)) == 32


# ---- decode pool ---------------------------------------------------------------------------


def test_pool_survives_crash_and_hang():
    async def main():
        pool = DecodePool(1)
        await pool.start()
        try:
            with pytest.raises(MediaError) as crash:
                await pool.run(os._exit, 3, timeout=10)
            assert crash.value.code == "decode_failed"
            assert await pool.run(math.sqrt, 16.0, timeout=10) == 4.0
            t0 = time.perf_counter()
            with pytest.raises(MediaError) as hang:
                await pool.run(time.sleep, 60, timeout=1)
            assert hang.value.code == "decode_timeout" and time.perf_counter() - t0 < 10
            assert await pool.run(math.sqrt, 9.0, timeout=10) == 3.0
            assert pool.restarts == 2
        finally:
            await pool.close()

    asyncio.run(main())


# ---- SSRF address policy (pure function: no traffic) ------------------------------------------


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.0.0.2", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                                "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "0.0.0.0", "224.0.0.1", "100.64.0.1"])
def test_non_public_addresses_are_refused(ip):
    assert not AddressPolicy([]).address_allowed(ip, "example.org", 80)


def test_public_addresses_and_the_allow_list():
    assert AddressPolicy([]).address_allowed("93.184.216.34", "example.org", 443)
    policy = AddressPolicy(["127.0.0.1:8080", "media.internal", "127.0.1.0/24"])
    assert policy.address_allowed("127.0.0.1", "127.0.0.1", 8080)
    assert not policy.address_allowed("127.0.0.1", "127.0.0.1", 8081)  # another port
    assert policy.address_allowed("127.0.0.5", "media.internal", 80)  # by host name
    assert policy.address_allowed("127.0.1.9", "x", 1)  # by CIDR
    assert not policy.address_allowed("127.0.0.2", "x", 8080)
