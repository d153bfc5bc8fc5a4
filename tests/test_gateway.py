"""The OpenAI-compatible gateway: the session's ``framewise serve`` (tests/stack.py: vLLM engine, demo
checkpoint), driven by the official ``openai`` SDK and plain HTTP; media served from 127.0.0.1."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import contextlib
import json
import os
import subprocess
import time

import httpx
import openai
import pytest

from framewise.server.video.synth import write_clip
from tests.stack import KEY, MODEL

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def media(media_origin):
    folder = media_origin.folder("gateway")
    d = folder.root
    write_clip(str(d / "h264.mp4"), frames=48, fps=24)
    write_clip(str(d / "vp9.webm"), frames=48, fps=24, codec="libvpx-vp9")
    write_clip(str(d / "mpeg4.avi"), frames=48, fps=24, codec="mpeg4")
    write_clip(str(d / "audio.mkv"), frames=48, fps=24, audio=True)
    write_clip(str(d / "vfr.mp4"), frames=6, fps=10, frame_times=[0, 0.1, 0.15, 0.6, 1.5, 1.9])
    write_clip(str(d / "one.mp4"), frames=1)
    write_clip(str(d / "gop1s.mp4"), frames=96, fps=24, gop=24)  # 4 s, a keyframe every second
    # 4 s, 1.5 MB (every frame costs bytes): above the gateway's --range-reads-above-mb 1
    write_clip(str(d / "noisy.mp4"), frames=48, fps=12, width=640, height=360, gop=12, noise=240)
    write_clip(str(d / "long.mp4"), frames=150, fps=24)  # 6.25 s: above --queue-above-s
    write_clip(str(d / "odd.mp4"), frames=12, width=97, height=61, pix_fmt="yuv444p")
    write_clip(str(d / "tenhours.mp4"), frames=2, frame_times=[0.0, 36000.0])
    write_clip(str(d / "huge.mp4"), frames=1, width=16000, height=16000)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(d / "h264.mp4"), "-c", "copy",
                    "-metadata:s:v:0", "rotate=90", str(d / "rotated.mp4")], check=True)
    full = (d / "h264.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(full[: len(full) // 3])
    (d / "zero.mp4").write_bytes(b"")
    (d / "random.mp4").write_bytes(os.urandom(20000))
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 10, 10)).save(d / "picture.png")
    (d / "picture_as_video.mp4").write_bytes((d / "picture.png").read_bytes())
    return folder


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=KEY, max_retries=0, timeout=120)


def video_message(url: str, text: str = "What happens in this video?", **sampling) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url, **sampling}},
                                         {"type": "text", "text": text}]}]


def post(gateway, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{gateway.base_url}/v1/chat/completions", json=body, headers=gateway.headers, timeout=timeout)


# ---- the happy paths through the SDK -------------------------------------------------------


def test_models_health_and_auth(gateway, client):
    assert httpx.get(f"{gateway.base_url}/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = httpx.get(f"{gateway.base_url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_non_streaming_http_video(client, media):
    r = client.chat.completions.create(model=MODEL, messages=video_message(media.url("h264.mp4"), num_frames=4),
                                       max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].finish_reason in ("length", "stop")
    assert isinstance(r.choices[0].message.content, str) and 1 <= r.usage.completion_tokens <= 8
    # 4 frames x 16 tokens are part of the prompt
    assert r.usage.prompt_tokens > 64 and r.usage.model_extra["video_frames"] == 4
    [video] = r.model_extra["framewise"]["media"]
    assert video["frames"] == 4 and video["timestamps"] == pytest.approx([0.25, 0.75, 1.25, 1.75], abs=1e-3)
    assert video["fetch_ms"] > 0 and video["decode_ms"] > 0 and not video["cache_hit"]  # fetched, decoded


def test_streaming_matches_non_streaming(client, media):
    kwargs = dict(model=MODEL, messages=video_message(media.url("vp9.webm")), max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_data_url_and_uploaded_file(client, media, gateway):
    raw = httpx.get(media.url("h264.mp4")).content
    data_url = "data:video/mp4;base64," + base64.b64encode(raw).decode()
    r1 = client.chat.completions.create(model=MODEL, messages=video_message(data_url, num_frames=2), max_tokens=4,
                                        temperature=0)
    uploaded = client.files.create(file=("clip.mp4", raw, "video/mp4"), purpose="vision")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(raw)
    assert client.files.retrieve(uploaded.id).filename == "clip.mp4"
    r2 = client.chat.completions.create(model=MODEL, messages=video_message(uploaded.id, num_frames=2), max_tokens=4,
                                        temperature=0)
    assert r1.choices[0].message.content == r2.choices[0].message.content  # same frames, same answer
    assert r2.model_extra["framewise"]["media"][0]["cache_hit"]  # same content hash: decode skipped
    assert client.files.delete(uploaded.id).deleted
    r = post(gateway, {"model": MODEL, "messages": video_message(uploaded.id), "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"


@pytest.mark.parametrize("name, frames", [("h264.mp4", 4), ("vp9.webm", 4), ("mpeg4.avi", 4), ("audio.mkv", 4),
                                          ("vfr.mp4", 4), ("one.mp4", 1), ("odd.mp4", 4), ("rotated.mp4", 4)])
def test_formats(client, media, name, frames):
    r = client.chat.completions.create(model=MODEL, messages=video_message(media.url(name), num_frames=4),
                                       max_tokens=2)
    assert r.model_extra["framewise"]["media"][0]["frames"] == frames


def test_sampling_controls_are_reported(client, media):
    def stamps(**sampling):
        r = client.chat.completions.create(model=MODEL, messages=video_message(media.url("h264.mp4"), **sampling),
                                           max_tokens=1)
        return r.model_extra["framewise"]["media"][0]["timestamps"]

    assert stamps(fps=2) == pytest.approx([6 / 24, 18 / 24, 30 / 24, 42 / 24], abs=1e-3)
    assert stamps(num_frames=4, start=0.5, end=1.5) == pytest.approx([15 / 24, 21 / 24, 27 / 24, 33 / 24], abs=1e-3)
    assert len(stamps()) == 8  # the model's default (num_frames in config.json)


def test_keyframe_seek_is_reported_per_frame(client, media):
    """``seek: keyframe``: each segment's keyframe instead of its midpoint, with the planned instant and the mode
    used per frame; the default stays exact (and is cached apart)."""
    def report(**sampling):
        r = client.chat.completions.create(model=MODEL, max_tokens=1,
                                           messages=video_message(media.url("gop1s.mp4"), num_frames=4, **sampling))
        return r.model_extra["framewise"]["media"][0]

    exact, kf = report(), report(seek="keyframe")
    assert exact["seek"] == "exact" and exact["seek_used"] == ["exact"] * 4
    assert exact["timestamps"] == pytest.approx([12 / 24, 36 / 24, 60 / 24, 84 / 24], abs=1e-3)
    assert kf["seek"] == "keyframe" and kf["seek_used"] == ["keyframe"] * 4 and kf["frame_cache"] == "miss"
    assert kf["targets"] == exact["targets"] == pytest.approx([0.5, 1.5, 2.5, 3.5], abs=1e-3)
    assert kf["timestamps"] == pytest.approx([0.0, 1.0, 2.0, 3.0], abs=1e-3)


def test_a_range_origin_is_read_in_ranges_through_the_gateway(client, media):
    """The same video from an origin that serves byte ranges (read in ranges by the decoder: a fraction of the
    file) and from one that does not (downloaded whole): the same frames, the same greedy answer."""
    def ask(url: str):
        r = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0,
                                           messages=video_message(url, num_frames=4, seek="keyframe"))
        return r.choices[0].message.content, r.model_extra["framewise"]["media"][0]

    size = (media.root / "noisy.mp4").stat().st_size
    served_before = media.server.served.get("/gateway/noisy.mp4", 0)
    ranged_answer, ranged = ask(media.url("ranged/noisy.mp4"))
    assert ranged["read"] == "ranged" and ranged["size_bytes"] == size and ranged["frame_cache"] == "miss"
    # the origin sent what the decode read, and what it had sent on when the gateway closed the first GET
    assert ranged["bytes_read"] <= media.server.served["/gateway/noisy.mp4"] - served_before
    assert ranged["bytes_read"] < size * 0.75
    answer, downloaded = ask(media.url("noisy.mp4"))
    assert downloaded["read"] == "download" and downloaded["size_bytes"] == size
    assert downloaded["timestamps"] == ranged["timestamps"] and answer == ranged_answer
    assert ranged["seek_used"] == ["keyframe"] * 4


# ---- bad input: right status and code, and the server keeps serving -------------------------


BAD = [
    ("zero.mp4", 400, "invalid_video"),
    ("truncated.mp4", 400, "invalid_video"),
    ("random.mp4", 400, "invalid_video"),
    ("picture_as_video.mp4", 400, "invalid_video"),
    ("huge.mp4", 413, "resolution_too_large"),
    ("tenhours.mp4", 413, "video_too_long"),
    ("big", 413, "media_too_large"),
    ("slow", 504, "fetch_timeout"),
]


@pytest.mark.parametrize("name, status, code", BAD, ids=[b[0] for b in BAD])
def test_bad_video(gateway, media, name, status, code):
    r = post(gateway, {"model": MODEL, "messages": video_message(media.url(name)), "max_tokens": 2})
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    ok = post(gateway, {"model": MODEL, "messages": video_message(media.url("h264.mp4"), num_frames=2),
                        "max_tokens": 2})
    assert ok.status_code == 200


def test_ssrf_only_the_allow_listed_loopback_port(gateway, media):
    refused = [f"http://127.0.0.2:{media.port}/h264.mp4",  # another loopback address
               f"http://127.0.0.1:{gateway.port}/health",  # another port on the allowed host
               media.url(f"redirect?to=http://127.0.0.2:{media.port}/h264.mp4"),  # redirect to a refused one
               f"http://localhost:{gateway.port}/health"]  # a name resolving to a refused address
    for url in refused:
        r = post(gateway, {"model": MODEL, "messages": video_message(url), "max_tokens": 2})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "url_not_allowed"), url
    r = post(gateway, {"model": MODEL, "max_tokens": 2,
                       "messages": video_message(media.url(f"redirect?to={media.url('h264.mp4')}"), num_frames=2)})
    assert r.status_code == 200  # a redirect within the allow-list is followed


def test_invalid_requests(gateway, media):
    cases = [
        ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
        ({"model": MODEL, "messages": []}, 422, "invalid_parameter"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 422,
         "invalid_parameter"),
        ({"model": MODEL, "messages": video_message(media.url("h264.mp4"), num_frames=0)}, 422, "invalid_parameter"),
        ({"model": MODEL, "messages": video_message(media.url("h264.mp4"), num_frames=99)}, 400, "invalid_sampling"),
        ({"model": MODEL, "messages": video_message(media.url("h264.mp4"), seek="nearest")}, 422, "invalid_parameter"),
        ({"model": MODEL, "messages": video_message("ftp://example.org/v.mp4")}, 400, "invalid_url"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 5000}]}, 400, "context_length_exceeded"),
    ]
    for body, status, code in cases:
        r = post(gateway, {"max_tokens": 2, **body})
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (body, r.text)


# ---- concurrency, disconnects, metrics -----------------------------------------------------


def _metric(gateway, prefix: str) -> float:
    return sum(v for k, v in gateway.metrics().items() if k.startswith(prefix))


def test_concurrent_streams_and_metrics(client, media, gateway):
    before_requests = _metric(gateway, 'framewise_requests_total{route="/v1/chat/completions",status="200"')
    before_frames = _metric(gateway, "framewise_frames_sampled_total")

    def one(i: int) -> tuple[str, int]:
        stream = client.chat.completions.create(
            model=MODEL, messages=video_message(media.url(["h264.mp4", "vp9.webm"][i % 2]), num_frames=2 + i % 3),
            max_tokens=16, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = list(stream)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage.completion_tokens

    with cf.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    assert all(tokens == 16 and text for text, tokens in results)
    assert _metric(gateway, 'framewise_requests_total{route="/v1/chat/completions",status="200"') >= before_requests + 20
    assert _metric(gateway, "framewise_frames_sampled_total") >= before_frames + sum(2 + i % 3 for i in range(20))
    assert _metric(gateway, "framewise_time_to_first_token_seconds_count") > 0


GENERATED = "vllm:generation_tokens_total"


def _wait_idle(gateway, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _metric(gateway, "vllm:num_requests_running") == 0 and _metric(gateway, "framewise_requests_in_flight") == 0:
            return
        time.sleep(0.1)


def test_client_disconnect_aborts_the_engine_request(gateway, media):
    generated = _metric(gateway, GENERATED)
    # 4 x 3900 tokens: far longer than any delay in noticing the disconnect
    body = {"model": MODEL, "messages": video_message(media.url("h264.mp4"), num_frames=2), "max_tokens": 3900,
            "n": 4, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{gateway.base_url}/v1/chat/completions", json=body, headers=gateway.headers,
                      timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    _wait_idle(gateway)
    assert _metric(gateway, "vllm:num_requests_running") == 0
    assert _metric(gateway, "framewise_requests_in_flight") == 0
    # the engine stopped early instead of generating all 4 x 3900 tokens (ignore_eos)
    assert 0 < _metric(gateway, GENERATED) - generated < 0.75 * 4 * 3900


def test_metrics_count_rejections_and_fetches(gateway, media):
    r = post(gateway, {"model": MODEL, "messages": video_message(media.url("random.mp4")), "max_tokens": 2})
    assert r.status_code == 400
    m = gateway.metrics()
    assert m['framewise_media_errors_total{code="invalid_video"}'] >= 1
    assert _metric(gateway, "framewise_fetch_bytes_total") > 0
    assert _metric(gateway, "framewise_decode_seconds_count") > 0
    assert json.loads(httpx.get(f"{gateway.base_url}/ready").text)["status"] == "ready"


# ---- more of the API surface ---------------------------------------------------------------


def test_image_parts(client, media):
    png = httpx.get(media.url("picture.png")).content
    for url in (media.url("picture.png"), "data:image/png;base64," + base64.b64encode(png).decode()):
        r = client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}])
        assert r.model_extra["framewise"]["media"] == [
            {"type": "image", "width": 64, "height": 48, "fetch_ms": pytest.approx(0, abs=1e4),
             "decode_ms": pytest.approx(0, abs=1e4)}]
        assert r.usage.prompt_tokens > 16  # the image's 16 tokens are in the prompt


def test_sampling_parameters(client, media):
    messages = video_message(media.url("h264.mp4"), num_frames=2)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, n=2, temperature=1.0, seed=7,
                                       logprobs=True, top_logprobs=3)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens <= 10
    for c in r.choices:
        assert 1 <= len(c.logprobs.content) <= 5
        for entry in c.logprobs.content:
            assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, n=2, temperature=1.0, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeded
    greedy = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    text = greedy.choices[0].message.content
    if len(text) > 2:  # stop at a string the model is known to produce
        stopped = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                 stop=[text[1:3]])
        assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].message.content == text[:1]


def test_logit_bias_steers_the_sampler(client, media, gateway, tc_llava_dir):
    """``logit_bias`` reaches vLLM's sampler (it was dropped before): +100 on one token makes greedy decoding
    repeat it; an id outside the vocabulary is a 400 naming ``logit_bias`` (vLLM's check), and the gateway serves on."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tc_llava_dir)
    messages = video_message(media.url("h264.mp4"), num_frames=2)
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    target = next(i for i in range(len(tok) // 2, len(tok)) if i not in tok.all_special_ids
                  and tok.decode([i]).strip().isalpha() and tok.decode([i]) not in plain.choices[0].message.content)
    forced = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                            logit_bias={str(target): 100})
    assert forced.choices[0].message.content == tok.decode([target] * 4) != plain.choices[0].message.content
    r = post(gateway, {"model": MODEL, "messages": messages, "max_tokens": 2, "logit_bias": {str(10**8): 5}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
    assert client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).choices


def test_upload_limits(client, gateway):
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.mp4", b"\0" * (1 << 20 | 1), "video/mp4"), purpose="vision")
    assert e.value.status_code == 413 and e.value.body["code"] == "file_too_large"
    r = httpx.post(f"{gateway.base_url}/v1/files", headers=gateway.headers, files={"file": ("e.mp4", b"")},
                   data={"purpose": "vision"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "empty_file"
    r = httpx.get(f"{gateway.base_url}/v1/files/file-000000000000000000000000", headers=gateway.headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"


def test_local_files_only_under_the_allowed_path(gateway, media):
    ok = post(gateway, {"model": MODEL, "max_tokens": 2,
                        "messages": video_message(f"file://{media.root}/h264.mp4", num_frames=2)})
    assert ok.status_code == 200
    for url in ("file:///etc/passwd", f"file://{media.root}/../../{gateway.log_path.parent.name}/gateway.log"):
        r = post(gateway, {"model": MODEL, "max_tokens": 2, "messages": video_message(url)})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "url_not_allowed"), url


def test_non_streaming_disconnect_aborts_too(gateway, media):
    generated = _metric(gateway, GENERATED)
    body = {"model": MODEL, "messages": video_message(media.url("h264.mp4"), num_frames=2), "max_tokens": 3900,
            "n": 4, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        post(gateway, body, timeout=0.5)
    _wait_idle(gateway)
    assert _metric(gateway, "vllm:num_requests_running") == 0
    assert _metric(gateway, "framewise_requests_in_flight") == 0
    assert 0 < _metric(gateway, GENERATED) - generated < 0.75 * 4 * 3900


# ---- jobs through the in-process queue (this gateway has no REDIS_URL) --------------------------


def _job_events(gateway, job_id: str) -> list[dict]:
    events = []
    with httpx.stream("GET", f"{gateway.base_url}/v1/jobs/{job_id}/events", headers=gateway.headers,
                      timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def test_jobs_in_process_backend(gateway, media, client):
    body = {"model": MODEL, "messages": video_message(media.url("h264.mp4"), num_frames=4), "max_tokens": 6,
            "temperature": 0}
    r = httpx.post(f"{gateway.base_url}/v1/jobs", json=body, headers=gateway.headers)
    assert r.status_code == 202 and r.json()["status"] in ("queued", "running")
    job_id = r.json()["id"]
    stages = [e["stage"] for e in _job_events(gateway, job_id)]
    assert stages[0] == "queued" and stages[-1] == "done"
    assert {"running", "fetching", "decoding", "generating"} <= set(stages)
    job = httpx.get(f"{gateway.base_url}/v1/jobs/{job_id}", headers=gateway.headers).json()
    assert job["status"] == "succeeded" and job["attempts"] == 1
    sync = client.chat.completions.create(**{k: v for k, v in body.items()})
    assert job["result"]["choices"][0]["message"]["content"] == sync.choices[0].message.content
    assert job["result"]["framewise"]["media"][0]["frames"] == 4

    bad = httpx.post(f"{gateway.base_url}/v1/jobs", headers=gateway.headers,
                     json={"model": MODEL, "messages": video_message(media.url("random.mp4")), "max_tokens": 2})
    assert _job_events(gateway, bad.json()["id"])[-1]["stage"] == "failed"
    failed = httpx.get(f"{gateway.base_url}/v1/jobs/{bad.json()['id']}", headers=gateway.headers).json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_video"  # as the sync API says
    listed = httpx.get(f"{gateway.base_url}/v1/jobs?status=failed", headers=gateway.headers).json()
    assert bad.json()["id"] in [j["id"] for j in listed["data"]]
    missing = httpx.get(f"{gateway.base_url}/v1/jobs/job-nope", headers=gateway.headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"


def test_long_video_chat_completion_runs_as_a_job(gateway, media, client):
    kwargs = dict(model=MODEL, messages=video_message(media.url("long.mp4"), num_frames=4), max_tokens=400,
                  temperature=0, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kwargs)
    job_id = r.model_extra["framewise"]["job_id"]
    assert r.usage.completion_tokens == 400 and r.model_extra["framewise"]["media"][0]["frames"] == 4
    assert httpx.get(f"{gateway.base_url}/v1/jobs/{job_id}", headers=gateway.headers).json()["status"] == "succeeded"

    body = {"model": MODEL, "messages": kwargs["messages"], "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{gateway.base_url}/v1/chat/completions", json=body, headers=gateway.headers,
                      timeout=120) as s:
        lines = [line for line in s.iter_lines() if line]
    assert any(line.startswith(": queued as job-") for line in lines)  # keep-alive while queued
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert lines[-1] == "data: [DONE]"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == r.choices[0].message.content and chunks[-1]["usage"]["completion_tokens"] == 400
    # short videos are not queued
    short = client.chat.completions.create(model=MODEL, messages=video_message(media.url("h264.mp4")), max_tokens=2)
    assert "job_id" not in short.model_extra["framewise"]


# ---- structured logs -----------------------------------------------------------------------


def _log_entries(gateway) -> list[dict]:
    entries = []
    for line in gateway.log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            if isinstance(entry := json.loads(line), dict):
                entries.append(entry)
    return entries


def _wait_for_entry(gateway, match, timeout: float = 10) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for entry in _log_entries(gateway):
            if match(entry):
                return entry
        time.sleep(0.1)
    raise AssertionError("no matching log line")


def test_json_logs_carry_the_request_id(gateway, media):
    body = {"model": MODEL, "messages": video_message(media.url("h264.mp4"), num_frames=4), "max_tokens": 4}
    r = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=body, timeout=60,
                   headers={**gateway.headers, "X-Request-ID": "client-trace.42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-trace.42"
    access = _wait_for_entry(gateway, lambda e: e.get("logger") == "framewise.access"
                             and e.get("request_id") == "client-trace.42")
    assert access["status"] == 200 and access["route"] == "/v1/chat/completions" and access["ms"] > 0
    chat = _wait_for_entry(gateway, lambda e: e.get("logger") == "framewise.chat"
                           and e.get("completion_id") == r.json()["id"])
    assert chat["request_id"] == "client-trace.42" and chat["outcome"] == "ok" and chat["frames"] == 4
    assert chat["completion_tokens"] == r.json()["usage"]["completion_tokens"]
    [video] = r.json()["framewise"]["media"]  # the log line's times are the request's own
    assert (chat["fetch_ms"], chat["decode_ms"]) == (video["fetch_ms"], video["decode_ms"]) and chat["fetch_ms"] > 0
    assert {"ts", "level", "msg"} <= chat.keys() and "vllm_process_name" not in chat
    # uvicorn's own access line is replaced by ours (which has the id)
    assert not [e for e in _log_entries(gateway) if e.get("logger") == "uvicorn.access"]

    # a streamed completion logs its end under the same id
    body["stream"] = True
    with httpx.stream("POST", f"{gateway.base_url}/v1/chat/completions", json=body, timeout=60,
                      headers={**gateway.headers, "X-Request-ID": "client-stream-7"}) as s:
        assert s.headers["x-request-id"] == "client-stream-7"
        assert [line for line in s.iter_lines() if line][-1] == "data: [DONE]"
    streamed = _wait_for_entry(gateway, lambda e: e.get("logger") == "framewise.chat"
                               and e.get("request_id") == "client-stream-7")
    assert streamed["stream"] is True and streamed["outcome"] == "ok" and streamed["completion_tokens"] >= 1

    # an unusable client id is replaced; a refused request is logged with its error code
    r = post(gateway, {"model": MODEL, "messages": video_message(media.url("random.mp4"))})
    rid = r.headers["x-request-id"]
    assert r.status_code == 400 and rid.startswith("req-")
    r = httpx.post(f"{gateway.base_url}/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": video_message(media.url("zero.mp4"))},
                   headers={**gateway.headers, "X-Request-ID": "bad id\twith spaces"})
    rid = r.headers["x-request-id"]
    assert r.status_code == 400 and rid.startswith("req-") and rid != "bad id\twith spaces"
    refused = _wait_for_entry(gateway, lambda e: e.get("request_id") == rid and e.get("logger") == "framewise.errors")
    assert refused["code"] == r.json()["error"]["code"] and refused["status"] == 400
