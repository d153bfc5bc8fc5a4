"""Long videos once (issue 21, item 4): a long video is fetched once, by whoever needs its bytes.

The gateway in-process (the stand-in engine; jobs run by its own worker) and a loopback origin that records
every request (bytes sent, whether the client left before the end):

- "long" is decided before the body is downloaded when the origin says enough: a ``Content-Length`` above
  ``queue_above_mb``, or the container header at the front of the body (an index-first MP4) stating more
  than ``queue_above_s``; only the worker downloads the video then.
- when the bytes had to be downloaded to decide (the index at the end), they go to the job through the
  files store: the origin is asked once; the staged copy is removed when the job ends.
- media parts run in one task group: a part that fails cancels the others' downloads; a client that leaves
  while its media downloads cancels the download.
- jobs retry transient fetch failures (origin 5xx) with backoff, under ``job_fetch_timeout_s``.
"""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient

from framewise.server.app import create_app
from framewise.server.media.files import STAGED
from framewise.server.settings import Settings
from tests.live_support import KEY, MODEL, LiveGateway, Origin, StandInEngine, video_message, wait_for, write_video

MB = 1 << 20


@pytest.fixture
def origin():
    server = Origin()
    yield server
    server.close()


def _settings(tc_llava_dir, tmp_path, origin, **extra) -> dict:
    return {"model": str(tc_llava_dir), "served_model_name": MODEL, "api_keys": [KEY], "decode_workers": 1,
            "files_dir": str(tmp_path / "files"), "allowed_media_hosts": [origin.host], "queue_above_s": 5.0,
            "queue_above_mb": 8.0, "max_video_mb": 64.0, "fetch_timeout_s": 5.0, "job_fetch_timeout_s": 30.0,
            "max_duration_s": 3600.0, **extra}


@pytest.fixture
def inproc(tc_llava_dir, tmp_path, origin):
    app = create_app(Settings(**_settings(tc_llava_dir, tmp_path, origin)), engine=StandInEngine(tc_llava_dir))
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client, app.state.services


def _ask(client, url: str, **body):
    return client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2,
                                                     "messages": video_message(url, num_frames=2), **body})


def test_a_content_length_above_the_threshold_routes_before_the_body(inproc, origin):
    client, _ = inproc
    origin.files["big.mp4"] = bytes(40 * MB)  # not a video: only who downloads it matters here
    origin.rate["big.mp4"] = 40 * MB  # a second
    r = _ask(client, origin.url("big.mp4"))
    # the job ran (the worker downloaded it, and found no video in it): its error names the job
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_video", r.text
    assert r.json()["error"]["job_id"].startswith("job-")
    first, second = origin.requests_for("big.mp4")
    assert first["sent"] < 8 * MB and not first["finished"]  # the gateway stopped at the headers
    assert second["finished"]  # the worker's download: the only whole one


def test_an_index_first_header_routes_a_long_video_before_the_rest_downloads(inproc, origin, tmp_path):
    client, services = inproc
    origin.files["long.mp4"] = write_video(tmp_path / "long.mp4", seconds=8, noise=True, faststart=True)
    size = len(origin.files["long.mp4"])
    assert 2 * MB < size < 8 * MB  # long by duration (8 s > 5 s), not by size
    origin.rate["long.mp4"] = MB  # a second: the gateway decides at its first MiB
    r = _ask(client, origin.url("long.mp4"))
    assert r.status_code == 200, r.text
    assert r.json()["framewise"]["job_id"].startswith("job-")
    assert r.json()["framewise"]["media"][0]["duration_s"] == pytest.approx(8.0, abs=0.2)
    first, second = origin.requests_for("long.mp4")
    assert not first["finished"] and first["sent"] < size - MB  # stopped after the header
    assert second["finished"]
    # a short index-first video is not routed: one download, answered here
    origin.files["short.mp4"] = write_video(tmp_path / "short.mp4", seconds=3, noise=True, faststart=True)
    r = _ask(client, origin.url("short.mp4"))
    assert r.status_code == 200 and "job_id" not in r.json()["framewise"]
    assert [q["finished"] for q in origin.requests_for("short.mp4")] == [True]


def test_bytes_downloaded_to_decide_go_to_the_job_without_a_second_fetch(inproc, origin, tmp_path):
    client, services = inproc
    origin.files["tail.mp4"] = write_video(tmp_path / "tail.mp4", seconds=8)  # index at the end: downloaded
    r = _ask(client, origin.url("tail.mp4"))
    assert r.status_code == 200, r.text
    assert r.json()["framewise"]["job_id"].startswith("job-")
    assert r.json()["framewise"]["media"][0]["duration_s"] == pytest.approx(8.0, abs=0.2)
    assert len(origin.requests_for("tail.mp4")) == 1  # the worker read the staged bytes
    staged = [o for o in services.files.records() if o.purpose == STAGED]
    assert staged == []  # removed when the job ended
    assert not list(services.files.blobs.iterdir())  # and its bytes
    # with the files store not shared (the staged copy gone): the worker fetches the URL instead
    services.files.unstage = lambda file_id, owner=None: None
    orig_stage = services.files.stage

    def stage_then_lose(path, sha256, size, name="media", owner="default"):
        file_id = orig_stage(path, sha256, size, name, owner)
        services.files.delete(file_id, owner)  # as if another replica's store
        return file_id

    services.files.stage = stage_then_lose
    services.video.cache._items.clear()
    r = _ask(client, origin.url("tail.mp4"), max_tokens=3)
    assert r.status_code == 200 and r.json()["framewise"]["job_id"], r.text
    assert len(origin.requests_for("tail.mp4")) == 3  # the gateway's download, then the worker's


def test_a_failing_part_cancels_the_other_downloads(inproc, origin, tmp_path):
    client, services = inproc
    services.fetcher.timeout_s = 120.0  # only the cancellation can end the slow download early
    origin.files["slow.mp4"] = write_video(tmp_path / "slow.mp4", seconds=3, noise=True)
    origin.rate["slow.mp4"] = 16 * 1024  # ~50 s to send it whole
    both = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": origin.url("slow.mp4"), "num_frames": 2}},
        {"type": "video_url", "video_url": {"url": origin.url("missing.mp4"), "num_frames": 2}},
        {"type": "text", "text": "?"}]}]
    t0 = time.monotonic()
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": both, "max_tokens": 2})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "fetch_failed") and "404" in r.text
    assert time.monotonic() - t0 < 15
    wait_for(lambda: origin.requests_for("slow.mp4")[0]["aborted"], 15, "the slow download to be dropped")


def test_a_client_leaving_cancels_the_download(tc_llava_dir, tmp_path, origin):
    origin.files["slow.mp4"] = write_video(tmp_path / "slow.mp4", seconds=3, noise=True)
    origin.rate["slow.mp4"] = 16 * 1024  # ~50 s to send it whole
    settings = _settings(tc_llava_dir, tmp_path, origin, fetch_timeout_s=120.0)
    settings.pop("model")
    gw = LiveGateway(tmp_path, tc_llava_dir, **settings)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gw.url("/v1/chat/completions"), headers=gw.headers, timeout=3,
                       json={"model": MODEL, "max_tokens": 2, "messages": video_message(origin.url("slow.mp4"))})
        wait_for(lambda: origin.requests_for("slow.mp4")[0]["aborted"], 20, "the download to be dropped")
        assert not origin.requests_for("slow.mp4")[0]["finished"]
    finally:
        gw.close()


def test_jobs_retry_transient_fetch_failures_under_a_job_sized_timeout(inproc, origin, tmp_path):
    client, services = inproc
    origin.files["clip.mp4"] = write_video(tmp_path / "clip.mp4", seconds=2)
    origin.fail["clip.mp4"] = [503, 502]  # the origin fails twice, then serves it

    def run_job(url: str) -> dict:
        job = client.post("/v1/jobs", json={"model": MODEL, "max_tokens": 2,
                                            "messages": video_message(url, num_frames=2)}).json()
        return wait_for(lambda: (j := client.get(f"/v1/jobs/{job['id']}").json())["status"] in
                        ("succeeded", "failed") and j, 60, "the job")

    done = run_job(origin.url("clip.mp4"))
    assert (done["status"], done["attempts"]) == ("succeeded", 1), done
    assert [q["status"] for q in origin.requests_for("clip.mp4")] == [503, 502, 200]
    # a client error of the origin is not retried
    failed = run_job(origin.url("nothing.mp4"))
    assert failed["status"] == "failed" and failed["error"]["code"] == "fetch_failed"
    assert len(origin.requests_for("nothing.mp4")) == 1
    # slower than a request's fetch timeout (5 s), within a job's (30 s)
    origin.files["slow.mp4"] = write_video(tmp_path / "slow.mp4", seconds=2, noise=True)
    origin.rate["slow.mp4"] = len(origin.files["slow.mp4"]) / 8
    r = _ask(client, origin.url("slow.mp4"))
    assert (r.status_code, r.json()["error"]["code"]) == (504, "fetch_timeout")
    assert run_job(origin.url("slow.mp4"))["status"] == "succeeded"
