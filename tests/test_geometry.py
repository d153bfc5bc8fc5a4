"""Videos against the context (issue 23, item 2): start-up validation from the checkpoint's token geometry, and
the pre-fetch refusal of a request whose videos cannot fit. Configs at the published shapes (llava-1.5-7b's
CLIP-L/336 grid: 576 tokens per frame; Video-CCAM's 1024 queries; RED-VILLM's 356), the CLI in-process."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from framewise.model_plugins.configs import RedVillmConfig, TCLlavaConfig, VideoCCAMConfig
from framewise.model_plugins.geometry import VideoDoesNotFit, checkpoint_context, fit_frames, video_tokens_fn
from tests.conftest import cli, variant_checkpoint
from tests.gateway_support import RecordingServer


def llava_7b(**kw) -> TCLlavaConfig:
    """llava-1.5-7b's geometry: CLIP-L/14 at 336 px (24 x 24 patches), Llama-2 with a 4096-token context."""
    return TCLlavaConfig(vision_config={"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14},
                         text_config={"model_type": "llama", "max_position_embeddings": 4096}, **kw)


def test_published_geometry_per_family():
    assert video_tokens_fn(llava_7b())(8) == 8 * 576
    assert video_tokens_fn(llava_7b(frame_pooling=2))(8) == 8 * 144
    assert video_tokens_fn(VideoCCAMConfig())(4) == video_tokens_fn(VideoCCAMConfig())(32) == 1024
    red = RedVillmConfig()
    assert video_tokens_fn(red)(8) == red.video_tokens(8)
    assert checkpoint_context(llava_7b()) == 4096


def test_the_default_video_of_a_7b_llava_does_not_fit_4096():
    """The issue's arithmetic: 8 frames x 576 = 4608 tokens > 4096: refused at start, with the numbers and the fix."""
    with pytest.raises(VideoDoesNotFit) as e:
        fit_frames(llava_7b(), 8, 32, 4096)
    message = str(e.value)
    assert "8 frames × 576 = 4608" in message and "4096" in message and "--max-model-len 4672" in message
    assert "frame_pooling" in message


def test_max_frames_is_lowered_to_what_fits():
    assert fit_frames(llava_7b(), 8, 32, 8192) == (8192 - 64) // 576  # 14 frames
    assert fit_frames(llava_7b(frame_pooling=2), 8, 32, 8192) == 32  # pooled: all fit
    assert fit_frames(llava_7b(), 4, 32, 4096) == 7


def test_serve_refuses_to_start_naming_the_numbers(tc_llava_dir, tmp_path):
    """Before any engine starts (in-process, seconds): exit status 2 and the message on stderr."""
    cfg = json.loads((tc_llava_dir / "config.json").read_text())
    out = cli("serve", "--model", tc_llava_dir, "--max-model-len", "64", "--port", "1")
    assert out.returncode == 2, out.stderr
    assert f"default {cfg['num_frames']} frames" in out.stderr and "--max-model-len" in out.stderr
    assert "Uvicorn" not in out.stderr + out.stdout
    fewer = variant_checkpoint(tc_llava_dir, tmp_path / "ckpt", num_frames=1, max_frames=1)
    assert "default 1 frames" in cli("serve", "--model", fewer, "--max-model-len", "8", "--port", "1").stderr


# ---- requests: refused before the fetch ------------------------------------------------------


class StubEngine:
    ready, dead = True, False

    def __init__(self):
        from framewise.model_plugins.geometry import describe
        from framewise.server.engine import ModelDefaults

        cfg = llava_7b(num_frames=4, max_frames=16)
        self.defaults = ModelDefaults(num_frames=4, max_frames=16, shortest_edge=None, max_model_len=4096,
                                      video_tokens=video_tokens_fn(cfg), describe_video=lambda f: describe(cfg, f),
                                      placeholders={"video": "<video>", "image": "<image>"})

    async def start(self):
        pass

    def shutdown(self):
        pass

    def render(self, messages):  # every video part placed
        return "".join("<video>" for m in messages for p in m["content"] if isinstance(p, dict)
                       and p.get("type") == "video")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    from framewise.server.app import create_app
    from framewise.server.settings import Settings

    origin = RecordingServer({"clip.mp4": b"x"})
    settings = Settings(model="stub", served_model_name="stub", api_keys=["sk-g"], decode_workers=1,
                        files_dir=str(tmp_path_factory.mktemp("files")), allowed_media_hosts=[f"127.0.0.1:{origin.port}"])
    with TestClient(create_app(settings, engine=StubEngine()), headers={"Authorization": "Bearer sk-g"}) as client:
        yield client, origin
    origin.close()


def video(origin, **sampling) -> dict:
    return {"type": "video_url", "video_url": {"url": f"{origin.url}/clip.mp4", **sampling}}


@pytest.mark.parametrize(("parts", "total"), [([{"num_frames": 8}], 4608), ([{}, {}], 4608), ([{"num_frames": 16}], 9216)])
def test_a_video_that_cannot_fit_is_refused_before_the_fetch(gateway, parts, total):
    client, origin = gateway
    hits = len(origin.hits)
    content = [video(origin, **p) for p in parts] + [{"type": "text", "text": "what happens?"}]
    r = client.post("/v1/chat/completions", json={"model": "stub", "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and f"{total} tokens" in error["message"]
    assert "× 576" in error["message"] and "4096" in error["message"]
    assert len(origin.hits) == hits  # nothing fetched
