"""``video_url.seek: "keyframe"`` (issue 25, item 1): each sampled instant moves to the nearest keyframe inside its
own segment, or stays exact where the segment holds none; frame count and order never change; the timestamps
reported are the returned frames' (each frame's index is coded in its pixels)."""

from __future__ import annotations

import av
import pytest

from framewise.server.engine import _seek_mode
from framewise.server.schemas import VideoURL
from framewise.server.video.decode import sample_video
from framewise.server.video.sampling import FrameSampling, keyframe_targets, plan_timestamps
from framewise.server.video.synth import read_index, write_clip

FPS = 24


def keyframe_indices(path: str) -> list[int]:
    """The keyframes of the file, found independently: every frame decoded, its coded index where key_frame."""
    with av.open(path) as c:
        return [read_index(f.to_ndarray(format="rgb24")) for f in c.decode(video=0) if f.key_frame]


@pytest.fixture(scope="module", params=["h264.mp4", "vp9.webm"])
def clip(request, tmp_path_factory) -> str:
    """12 s, a keyframe every 3 s (72 frames): 8 uniform segments of 1.5 s, every other one holds a keyframe.
    MP4's index holds decode times (B-frames: 2 frames before presentation), Matroska's cues presentation times."""
    codec = "libvpx-vp9" if request.param.endswith("webm") else "libx264"
    return write_clip(str(tmp_path_factory.mktemp("seek") / request.param), frames=12 * FPS, fps=FPS, gop=3 * FPS,
                      codec=codec)


def sample(path: str, seek: str, **kw):
    return sample_video(path, FrameSampling(seek=seek, **kw), default_frames=8, max_frames=64)


def test_targets_move_to_the_nearest_keyframe_inside_their_own_segment():
    targets = [0.75, 2.25, 3.75, 5.25]  # segments [0,1.5) [1.5,3) [3,4.5) [4.5,6)
    moved, used = keyframe_targets(targets, [0.0, 1.4, 3.0, 4.4, 4.6, 7.0], 0.0, 6.0)
    assert moved == [1.4, 2.25, 4.4, 4.6] and used == ["keyframe", "exact", "keyframe", "keyframe"]
    # a keyframe on a segment's boundary belongs to the later segment; one past the end to none
    assert keyframe_targets([0.75, 2.25], [1.5, 3.0], 0.0, 3.0) == ([0.75, 1.5], ["exact", "keyframe"])
    # non-uniform (fps rule) instants: segments end halfway to the neighbours
    assert keyframe_targets([1.0, 2.0, 6.0], [1.6, 3.9, 4.1], 0.0, 8.0) == (
        [1.0, 1.6, 4.1], ["exact", "keyframe", "keyframe"])
    assert keyframe_targets([1.0], [], 0.0, 2.0) == ([1.0], ["exact"])


def test_keyframe_mode_returns_keyframes_inside_segments_and_exact_frames_elsewhere(clip):
    keys = keyframe_indices(clip)
    assert keys[:4] == [0, 72, 144, 216]
    exact, kf = sample(clip, "exact", num_frames=8), sample(clip, "keyframe", num_frames=8)
    planned = plan_timestamps(12.0, FPS, FrameSampling(8), default_frames=8, max_frames=64)
    assert kf.frames.shape == exact.frames.shape and kf.extra["targets"] == pytest.approx(planned, abs=1e-6)
    got, want = [read_index(f) for f in kf.frames], [read_index(f) for f in exact.frames]
    assert want == [int(t * FPS) for t in planned]  # exact mode: the frame on screen at each instant
    seg = 12.0 / 8
    for i, (index, used) in enumerate(zip(got, kf.extra["seek_used"], strict=True)):
        inside = [k for k in keys if i * seg <= k / FPS < (i + 1) * seg]
        if used == "keyframe":  # the keyframe inside the segment (one per segment here)
            assert index in inside, (i, index, inside)
        else:
            assert used == "exact" and index == want[i], (i, index, want[i])
    # MP4's index lists every keyframe; the cues PyAV's WebM muxer writes only the first cluster's (the other
    # segments fall back to exact frames: a keyframe the index does not name is not sought)
    assert kf.extra["seek_used"].count("keyframe") == (4 if clip.endswith(".mp4") else 1)
    # the timestamps are the returned frames' own, and the keyframes cost far less decoding
    assert kf.timestamps == pytest.approx([i / FPS for i in got], abs=1e-3)
    assert exact.extra["seek_used"] == ["exact"] * 8
    if clip.endswith(".mp4"):  # (without an index past the start, the WebM is decoded through either way)
        assert kf.decoded_frames < exact.decoded_frames
        # 4 segments of 3 s, each with its keyframe: the keyframes alone (and what frame threading decodes beside)
        kf4, exact4 = sample(clip, "keyframe", num_frames=4), sample(clip, "exact", num_frames=4)
        assert [read_index(f) for f in kf4.frames] == [0, 72, 144, 216] and kf4.extra["seek_used"] == ["keyframe"] * 4
        assert kf4.decoded_frames * 4 < exact4.decoded_frames, (kf4.decoded_frames, exact4.decoded_frames)


def test_no_keyframe_in_any_segment_is_exact_decoding(clip):
    """Sixteen frames from 3.2-4.4 s: the only keyframe (3 s) lies before the range, so every target is exact."""
    kf = sample(clip, "keyframe", num_frames=16, start=3.2, end=4.4)
    exact = sample(clip, "exact", num_frames=16, start=3.2, end=4.4)
    assert kf.extra["seek_used"] == ["exact"] * 16
    assert [read_index(f) for f in kf.frames] == [read_index(f) for f in exact.frames]


def test_the_mode_is_a_request_field_a_server_default_or_the_models():
    assert VideoURL(url="u", seek="keyframe").seek == "keyframe" and VideoURL(url="u").seek is None
    with pytest.raises(ValueError, match="seek"):
        VideoURL(url="u", seek="nearest")
    assert _seek_mode("keyframe") == "keyframe" and _seek_mode(None) is None
    with pytest.raises(ValueError, match="video_seek"):
        _seek_mode("fast")
    assert FrameSampling(8, seek="keyframe").cache_key() != FrameSampling(8).cache_key()  # cached apart


def test_a_keyframe_whose_time_is_not_a_round_float_costs_one_keyframe(tmp_path):
    """30 fps, a keyframe every 250 frames (8.333... s, x264's default interval): seeking to the float time itself
    landed a tick before the keyframe, and the decoder went back one whole GOP (250 frames for one)."""
    path = write_clip(str(tmp_path / "gop250.mp4"), frames=600, fps=30, gop=250)
    v = sample(path, "keyframe", num_frames=2)
    assert [read_index(f) for f in v.frames] == [250, 500] and v.extra["seek_used"] == ["keyframe"] * 2
    assert v.decoded_frames <= 6, v.decoded_frames
