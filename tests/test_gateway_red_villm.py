"""``framewise serve`` on the RED-VILLM demo checkpoint through the openai SDK, and its job consumer on
Redis (one server per module).

RED-VILLM's gateway defaults come from its config: frames per video ``num_frames`` (100) capped at
``max_frames`` (100), and Qwen-VL's tags as the media placeholders its chat template must leave
(``<img></img>`` per image, ``<img><imgpad></img>`` per video). A video is ``video_tokens(T)`` = 356
``<imgpad>`` tokens whatever its frame count T (temporal tokens padded to 100, plus 256 spatial).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

API_KEY = "sk-red-villm"
QUESTION = "What happens?"


@pytest.fixture(scope="module")
def red_villm_dir(tmp_path_factory) -> Path:
    from framewise.model_plugins.reference.demo_checkpoint import write_demo_checkpoint

    return Path(write_demo_checkpoint("red-villm", str(tmp_path_factory.mktemp("rv-gw") / "red-villm")))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from PIL import Image

    from framewise.server.video.synth import write_clip
    from tests.gateway_support import MediaServer

    d = tmp_path_factory.mktemp("rv-media")
    write_clip(str(d / "clip.mp4"), frames=48, fps=24)  # 2 s: fewer frames than num_frames -> all 48
    write_clip(str(d / "long.mp4"), frames=240, fps=24)  # 10 s: 240 frames -> the default 100
    Image.new("RGB", (96, 64), (20, 160, 40)).save(d / "picture.png")
    server = MediaServer(d)
    yield server
    server.close()


@pytest.fixture(scope="module")
def gateway(red_villm_dir, media, tmp_path_factory):
    """``serve --consume`` on a private Redis: the job consumer ``framewise worker`` runs, in the
    gateway's process (one engine for the module)."""
    from tests.gateway_support import Gateway
    from tests.redis_support import RedisServer

    work = tmp_path_factory.mktemp("rv-gw-run")
    rs = RedisServer(work)
    try:
        gw = Gateway(red_villm_dir, work, api_key=API_KEY, allowed_hosts=f"127.0.0.1:{media.port}",
                     args=("--served-model-name", "red-villm", "--redis-url", rs.url, "--consume", "--enforce-eager"),
                     pin=True)
        yield gw
        gw.close()
    finally:
        rs.kill()


@pytest.fixture(scope="module")
def client(gateway):
    import openai

    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def text_tokens(red_villm_dir):
    """Tokens of the chat-template rendering of media parts + the question, before expansion."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(red_villm_dir)

    def count(*kinds: str) -> int:
        messages = [{"role": "user", "content": [*({"type": k} for k in kinds), {"type": "text", "text": QUESTION}]}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tok.encode(text, add_special_tokens=False))

    return count


def test_model_defaults_come_from_the_config(red_villm_dir, tmp_path):
    """No engine: what the gateway reads from a RED-VILLM checkpoint, and the placeholder check it
    enables (a template that leaves no ``<img><imgpad></img>`` for a video part is refused)."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoTokenizer

    from framewise import model_plugins
    from framewise.server.chat.media import render_prompt
    from framewise.server.engine import model_defaults
    from framewise.server.errors import APIError
    from framewise.server.schemas import ChatCompletionRequest
    from tests.conftest import variant_checkpoint

    model_plugins.register()
    tok = AutoTokenizer.from_pretrained(red_villm_dir)
    d = model_defaults(AutoConfig.from_pretrained(red_villm_dir), tok, str(red_villm_dir), 4096)
    assert (d.num_frames, d.max_frames, d.shortest_edge, d.fps) == (100, 100, 448, None)
    assert d.placeholders == {"image": "<img></img>", "video": "<img><imgpad></img>"}
    other = variant_checkpoint(red_villm_dir, tmp_path / "v", num_frames=16, max_frames=50, pad_temporal_to=64)
    d2 = model_defaults(AutoConfig.from_pretrained(other), tok, str(other), 4096)
    assert (d2.num_frames, d2.max_frames) == (16, 50)

    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "http://127.0.0.1/v.mp4"}},
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1/i.png"}}, {"type": "text", "text": "?"}]}])

    def engine(template: str | None = None):
        def render(messages):
            return tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                           tokenize=False)
        return SimpleNamespace(tokenizer=tok, defaults=d, render=render)

    assert "Video 1: <img><imgpad></img>\nPicture 1: <img></img>\n" in render_prompt(engine(), body, 1, 1)
    images_only = tok.chat_template.replace("Video {{ fw.videos }}: <img><imgpad></img>", "")
    with pytest.raises(APIError, match="places 0 of the request's 1 video part"):
        render_prompt(engine(images_only), body, 1, 1)


def ask(client, url: str, kind: str = "video_url", options: dict | None = None, **kw):
    part = {"type": kind, kind: {"url": url, **(options or {})}}
    return client.chat.completions.create(
        model="red-villm", messages=[{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}],
        max_tokens=8, temperature=0, extra_body={"ignore_eos": True}, **kw)


@pytest.mark.engine
def test_video_defaults_stream_and_token_count(client, media, text_tokens, red_villm_dir):
    """No sampling options: every frame of a 48-frame clip, the config's 100 of a 240-frame one; both
    are 356 visual tokens (the placeholder's 3 tokens become <img> + 356 <imgpad> + </img>); the
    streamed answer equals the non-streamed one."""
    cfg = json.loads((red_villm_dir / "config.json").read_text())
    assert (cfg.get("num_frames", 100), cfg.get("max_frames") or cfg.get("pad_temporal_to", 100)) == (100, 100)
    full = ask(client, media.url("clip.mp4"))
    [video] = full.model_extra["framewise"]["media"]
    assert video["type"] == "video" and video["frames"] == 48
    assert full.usage.prompt_tokens == text_tokens("video") - 1 + 356
    assert full.usage.completion_tokens == 8
    chunks = list(ask(client, media.url("clip.mp4"), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content

    long = ask(client, media.url("long.mp4"))
    assert long.model_extra["framewise"]["media"][0]["frames"] == 100
    assert long.usage.prompt_tokens == full.usage.prompt_tokens
    four = ask(client, media.url("long.mp4"), options={"num_frames": 4})
    assert four.model_extra["framewise"]["media"][0]["frames"] == 4
    assert four.usage.prompt_tokens == full.usage.prompt_tokens


@pytest.mark.engine
def test_too_many_frames_are_refused(gateway, media):
    body = {"model": "red-villm", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": media.url("long.mp4"), "num_frames": 101}},
        {"type": "text", "text": QUESTION}]}]}
    r = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=body, headers=gateway.headers, timeout=120)
    assert r.status_code == 400 and "limit of 100" in r.text


@pytest.mark.engine
def test_image_and_two_videos(client, media, text_tokens):
    picture = ask(client, media.url("picture.png"), kind="image_url")
    assert picture.model_extra["framewise"]["media"][0]["type"] == "image"
    assert picture.usage.prompt_tokens == text_tokens("image") + 256  # <img></img> -> <img> 256 x <imgpad> </img>
    assert picture.usage.completion_tokens == 8
    both = client.chat.completions.create(
        model="red-villm", max_tokens=4, temperature=0, messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": media.url("clip.mp4"), "num_frames": 8}},
            {"type": "video_url", "video_url": {"url": media.url("long.mp4"), "num_frames": 16}},
            {"type": "text", "text": QUESTION}]}])
    assert [m["frames"] for m in both.model_extra["framewise"]["media"]] == [8, 16]
    assert both.usage.prompt_tokens == text_tokens("video", "video") + 2 * (356 - 1)


@pytest.mark.engine
def test_long_video_job_on_redis(gateway, client, media):
    """``POST /v1/jobs`` (Redis stream, consumed by the job worker): the 240-frame clip at the config's
    100 frames; the stored result equals the same request answered at once."""
    body = {"model": "red-villm", "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": media.url("long.mp4")}}, {"type": "text", "text": QUESTION}]}]}
    r = httpx.post(f"{gateway.base_url}/v1/jobs", json=body, headers=gateway.headers, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.time() + 240
    while (job := httpx.get(f"{gateway.base_url}/v1/jobs/{job_id}", headers=gateway.headers,
                            timeout=10).json())["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, f"job still {job['status']}"
        time.sleep(0.5)
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    assert job["result"]["framewise"]["media"][0]["frames"] == 100
    sync = client.chat.completions.create(**body)
    assert job["result"]["choices"][0]["message"]["content"] == sync.choices[0].message.content
    assert job["result"]["usage"]["prompt_tokens"] == sync.usage.prompt_tokens
