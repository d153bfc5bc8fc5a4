"""The playground page and the ``framewise.return_frames = "thumbnails"`` extension, on the session's
``framewise serve`` (tests/stack.py: vLLM engine, demo checkpoint) and a real headless Chromium (Debian's
``/usr/bin/chromium`` driven by Playwright; no browser download).

The test clips are square and carry their frame index as a 4 x 2 grid of large black/white blocks (8 bits)
covering the whole picture, so the index survives the model's 56 px resize and a JPEG thumbnail.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
from fractions import Fraction
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from PIL import Image

from framewise.server.chat import thumbnails
from framewise.server.video.synth import write_clip
from tests.stack import KEY, MODEL

FPS = 24
CHROMIUM = "/usr/bin/chromium"


# ---- clips whose frames encode their index in blocks large enough for a 56 px thumbnail ------------------


def block_frame(index: int, side: int) -> np.ndarray:
    img = np.zeros((side, side, 3), np.uint8)
    for bit in range(8):
        if (index >> bit) & 1:
            r, c = divmod(bit, 4)
            img[r * side // 2:(r + 1) * side // 2, c * side // 4:(c + 1) * side // 4] = 255
    return img


def block_index(img: np.ndarray) -> int:
    h, w = img.shape[:2]
    gray = img.astype(float).mean(axis=2)
    value = 0
    for bit in range(8):
        r, c = divmod(bit, 4)
        cy, cx = int((r + 0.5) * h / 2), int((c + 0.5) * w / 4)
        if gray[cy - h // 8:cy + h // 8, cx - w // 16:cx + w // 16].mean() > 128:
            value |= 1 << bit
    return value


def write_block_clip(path: Path, frames: int, side: int = 112) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(block_frame(i, side), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def sampler_indices(total: int, n: int) -> list[int]:
    """DESIGN 2: the midpoint of each of ``n`` equal segments of a ``total``-frame clip."""
    return [math.floor((k + 0.5) * total / n) for k in range(n)]


def decode_data_url(url: str) -> tuple[bytes, Image.Image]:
    head, _, data = url.partition(",")
    assert head == "data:image/jpeg;base64"
    raw = base64.b64decode(data)
    return raw, Image.open(io.BytesIO(raw)).convert("RGB")


# ---- thumbnail bounds without a server --------------------------------------------------------------------


def test_thumbnail_bounds_step_quality_and_cap_count(monkeypatch):
    noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    raw, img = decode_data_url(thumbnails.jpeg_data_url(noise))
    assert max(img.size) == thumbnails.MAX_SIDE and len(raw) <= thumbnails.MAX_BYTES
    monkeypatch.setattr(thumbnails, "MAX_BYTES", 2500)  # noise at 160 px is ~6.5 KB at quality 85
    raw, img = decode_data_url(thumbnails.jpeg_data_url(noise))
    assert len(raw) <= 2500 and max(img.size) <= thumbnails.MAX_SIDE
    clip = np.repeat(noise[None, :64, :64], 40, axis=0)
    items = [(clip, {}), (clip, {}), (noise[:32, :32], {})]
    thumbnails.encode_all(items, None)
    assert [len(i["thumbnails"]) for _, i in items] == [40, 24, 0]
    assert [i.get("thumbnails_omitted") for _, i in items] == [None, 16, 1]


# ---- clips on the session's media origin --------------------------------------------------------------------


@pytest.fixture(scope="module")
def clips(media_origin):
    folder = media_origin.folder("playground")
    d = folder.root
    write_block_clip(d / "blocks.mp4", 48)  # 2 s
    write_block_clip(d / "long.mp4", 150)  # 6.25 s: above --queue-above-s, runs as a job
    write_clip(str(d / "wide.mp4"), frames=24, fps=FPS, width=192, height=120)
    (d / "bad.mp4").write_bytes(os.urandom(20000))
    return folder


def chat(gateway, url: str, stream: bool = False, frames: str | None = "thumbnails", **sampling) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url, **sampling}},
                                                      {"type": "text", "text": "What happens?"}]}]}
    if frames is not None:
        body["framewise"] = {"return_frames": frames}
    return httpx.post(f"{gateway.base_url}/v1/chat/completions", json=body, headers=gateway.headers, timeout=120)


def check_thumbnails(video: dict, fps: float = FPS) -> list[int]:
    """Thumbnails aligned with timestamps, within the bounds; the frame index each one shows."""
    assert len(video["thumbnails"]) == video["frames"] == len(video["timestamps"])
    shown = []
    for url, t in zip(video["thumbnails"], video["timestamps"], strict=True):
        raw, img = decode_data_url(url)
        assert len(raw) <= thumbnails.MAX_BYTES and max(img.size) <= thumbnails.MAX_SIDE
        assert img.size == (56, 56)  # the demo processor's view: shortest edge 56, center crop 56
        shown.append(block_index(np.asarray(img)))
        assert shown[-1] == math.floor(t * fps + 1e-3)  # the thumbnail is the frame on screen at its timestamp
    return shown


@pytest.mark.engine
def test_thumbnails_only_when_asked_and_are_the_sampled_frames(gateway, clips):
    url = clips.url("blocks.mp4")
    for frames in (None, "none"):  # off by default, and when turned off
        r = chat(gateway, url, frames=frames, num_frames=4)
        assert r.status_code == 200, r.text
        assert "thumbnails" not in r.json()["framewise"]["media"][0]

    r = chat(gateway, url, num_frames=4)
    assert r.status_code == 200, r.text
    [video] = r.json()["framewise"]["media"]
    assert check_thumbnails(video) == sampler_indices(48, 4) == [6, 18, 30, 42]
    assert r.json()["usage"]["video_frames"] == 4

    # a start/end window and the model's maximum (16 frames): the thumbnails follow the sampler
    r = chat(gateway, url, num_frames=16, start=0.5, end=1.5)
    [video] = r.json()["framewise"]["media"]
    assert video["frames"] == 16
    assert check_thumbnails(video) == [12 + i for i in sampler_indices(24, 16)]


@pytest.mark.engine
def test_thumbnails_in_the_stream_and_through_a_job(gateway, clips):
    r = chat(gateway, clips.url("blocks.mp4"), stream=True, num_frames=3)
    assert r.status_code == 200
    chunks = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: {")]
    [first] = [c for c in chunks if "framewise" in c]
    assert check_thumbnails(first["framewise"]["media"][0]) == sampler_indices(48, 3)
    # an image part: one thumbnail, the image as the processor sees it
    png = io.BytesIO()
    Image.fromarray(block_frame(37, 112)).save(png, "PNG")
    image_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    r = httpx.post(f"{gateway.base_url}/v1/chat/completions", headers=gateway.headers, timeout=120, json={
        "model": MODEL, "max_tokens": 2, "framewise": {"return_frames": "thumbnails"},
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                  {"type": "text", "text": "What is this?"}]}]})
    assert r.status_code == 200, r.text
    [image] = r.json()["framewise"]["media"]
    [thumb] = image["thumbnails"]
    assert decode_data_url(thumb)[1].size == (56, 56) and block_index(np.asarray(decode_data_url(thumb)[1])) == 37
    # a non-square clip: the thumbnails are the processor's center crop (the model's view), 56 x 56
    r = chat(gateway, clips.url("wide.mp4"), num_frames=2)
    [video] = r.json()["framewise"]["media"]
    assert [decode_data_url(u)[1].size for u in video["thumbnails"]] == [(56, 56)] * 2
    # a long video runs as a job; its result carries the thumbnails too
    r = chat(gateway, clips.url("long.mp4"), num_frames=5)
    assert r.status_code == 200, r.text
    assert r.json()["framewise"]["job_id"].startswith("job-")
    assert check_thumbnails(r.json()["framewise"]["media"][0]) == sampler_indices(150, 5)
    # streamed, the job is named before anything else (the page follows its events from that comment)
    r = chat(gateway, clips.url("long.mp4"), stream=True, num_frames=5)
    lines = [line for line in r.text.splitlines() if line]
    assert lines[0].startswith(": queued as job-") and lines[0].endswith(", status queued"), lines[:2]
    [first] = [json.loads(line[6:]) for line in lines if line.startswith("data: {") and "framewise" in line]
    assert lines[0].split()[3].rstrip(",") == first["framewise"]["job_id"]
    assert check_thumbnails(first["framewise"]["media"][0]) == sampler_indices(150, 5)


@pytest.mark.engine
def test_page_is_public_and_served_offline(gateway):
    for path in ("/", "/playground"):
        r = httpx.get(gateway.base_url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert '<script src="/playground/playground.js">' in r.text
        assert "http://" not in r.text and "https://" not in r.text.replace("https://...", "")  # no CDN
    js = httpx.get(gateway.base_url + "/playground/playground.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert httpx.get(gateway.base_url + "/playground/secret.py").status_code == 404
    assert httpx.get(gateway.base_url + "/v1/models").status_code == 401  # the API still needs the key
    assert "/playground" not in httpx.get(gateway.base_url + "/openapi.json").text


# ---- a real browser ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM) and shutil.which("chromium") is None:
        pytest.fail("chromium is missing: scripts/setup.sh installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def shown_indices(page) -> list[int]:
    srcs = page.eval_on_selector_all("#media .thumbs img", "els => els.map(e => e.src)")
    return [block_index(np.asarray(decode_data_url(s)[1])) for s in srcs]


@pytest.mark.engine
def test_browser_upload_ask_stream_and_see_the_frames(gateway, clips, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(gateway.base_url + "/playground")
    page.wait_for_selector("#key-form:not([hidden])")  # the server has --api-key: the page asks for it
    page.fill("#api-key", KEY)
    page.click("#key-form button")
    page.wait_for_function("document.getElementById('model-name').textContent === 'model: tc-llava'")

    page.set_input_files("#file", str(clips.root / "blocks.mp4"))
    page.wait_for_function("document.getElementById('upload-status').textContent.startsWith('uploaded')")
    assert page.input_value("#url").startswith("file-")
    page.fill("#num-frames", "4")
    page.fill("#max-tokens", "8")
    page.click("#ask-button")
    page.wait_for_selector("body[data-state=done]", timeout=120_000)
    assert page.text_content("#answer").strip() != ""
    assert page.is_hidden("#error")
    assert shown_indices(page) == sampler_indices(48, 4)
    captions = page.eval_on_selector_all("#media figcaption", "els => els.map(e => e.textContent)")
    assert captions == ["#0 · 0.250 s", "#1 · 0.750 s", "#2 · 1.250 s", "#3 · 1.750 s"]
    meta = page.text_content("#media .meta")
    assert "4 frames" in meta and "source 2 s" in meta and "24 fps" in meta and "h264" in meta
    assert page.text_content('[data-stat="video frames"] dd') == "4"
    assert int(page.text_content('[data-stat="prompt tokens"] dd')) > 64  # 4 frames x 16 tokens
    assert page.text_content('[data-stat="TTFT (client)"] dd').endswith(" ms")
    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000 and Image.open(shot).size[0] == 1280

    # a bad file: the API's error code is shown
    page.set_input_files("#file", str(clips.root / "bad.mp4"))
    page.wait_for_function("document.getElementById('upload-status').textContent.startsWith('uploaded')")
    page.click("#ask-button")
    page.wait_for_selector("body[data-state=failed]", timeout=60_000)
    assert page.text_content("#error .error-code") == "invalid_video"
    assert page.text_content("#error .error-message").strip() != ""
    page.close()


def open_with_key(browser, url: str):
    """The page with the API key already stored (as after a first visit), once it has listed the model."""
    page = browser.new_page()
    page.add_init_script(f"localStorage.setItem('framewise.apiKey', '{KEY}')")
    page.goto(url)
    page.wait_for_function("document.getElementById('model-name').textContent === 'model: tc-llava'")
    return page


@pytest.mark.engine
def test_browser_long_video_shows_job_progress(gateway, clips, browser):
    page = open_with_key(browser, gateway.base_url + "/")
    page.fill("#url", clips.url("long.mp4"))
    page.dispatch_event("#url", "input")
    page.fill("#num-frames", "5")
    page.fill("#max-tokens", "4")
    page.click("#ask-button")
    page.wait_for_selector("body[data-state=done]", timeout=120_000)
    assert page.text_content("#job-id").startswith("job-")
    page.wait_for_selector("#job-events li[data-stage=done]", timeout=30_000)
    stages = page.eval_on_selector_all("#job-events li", "els => els.map(e => e.dataset.stage)")
    assert stages[0] == "queued" and "decoding" in stages and "generating" in stages and stages[-1] == "done"
    assert shown_indices(page) == sampler_indices(150, 5)
    page.close()


@pytest.mark.engine
def test_browser_cancels_a_running_job(gateway, clips, browser):
    page = open_with_key(browser, gateway.base_url + "/playground")
    page.fill("#url", clips.url("long.mp4"))
    page.dispatch_event("#url", "input")
    page.fill("#num-frames", "4")
    page.fill("#max-tokens", "3000")  # long enough to be cancelled while generating
    page.fill("#extra", '{"ignore_eos": true}')
    page.click("#ask-button")
    page.wait_for_selector("#job-events li[data-stage=generating]", timeout=60_000)
    page.click("#cancel-button")
    page.wait_for_selector("body[data-state=failed]", timeout=30_000)
    assert page.text_content("#error .error-code") == "cancelled"
    page.wait_for_selector("#job-events li[data-stage=cancelled]", timeout=10_000)
    job = httpx.get(f"{gateway.base_url}/v1/jobs/{page.text_content('#job-id')}", headers=gateway.headers).json()
    assert job["status"] == "cancelled"
    page.close()
