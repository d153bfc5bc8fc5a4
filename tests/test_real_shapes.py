"""Checkpoints at the published shapes (issue 23, items 1-2): the published repositories' layout, vocabulary
size, special-token ids, chat templates and token geometry (``model_plugins/reference/published.py``, tiny
widths), converted by the converters a user runs, then served with default settings through the openai SDK:
prompt tokens follow the published geometry and the greedy answer is the reference implementation's on the
same frames. TC-LLaVA at llava-1.5-7b's geometry does not fit its 4096-token context at 8 frames: it refuses
to start, naming the numbers and the fix, and serves once converted with ``--frame-pooling 2`` (the README's
flag)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.conftest import cli

QUESTION = "What happens in this video?"
MAX_TOKENS = 8

# family -> (tokenizer length, embedding rows, {token: id}) of the published repository
PUBLISHED = {
    "tc-llava": (32003, 32064, {"<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001, "<video>": 32002}),
    "video-ccam": (151667, 152064, {"<|endoftext|>": 151643, "<|im_end|>": 151645, "<image>": 151665,
                                    "<video>": 151666}),
    "stave": (151657, 152064, {"<|endoftext|>": 151643, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                               "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}),
    "red-villm": (151860, 151936, {"<|endoftext|>": 151643, "<|im_end|>": 151645, "<img>": 151857,
                                   "</img>": 151858, "<imgpad>": 151859}),
}


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, Path]:
    """Each family written by ``framewise demo-model --shape real`` (source + conversion), in-process."""
    root = tmp_path_factory.mktemp("real-shape")
    out = {}
    for arch in PUBLISHED:
        result = cli("demo-model", "--arch", arch, "--shape", "real", "--out", str(root / arch))
        assert result.returncode == 0, result.stderr
        out[arch] = root / arch
    return out


def config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("arch", list(PUBLISHED))
def test_published_vocabulary_special_tokens_and_rows(real, arch):
    length, rows, ids = PUBLISHED[arch]
    tok = AutoTokenizer.from_pretrained(real[arch])
    assert len(tok) == length
    assert {t: tok.convert_tokens_to_ids(t) for t in ids} == ids
    cfg = config(real[arch])
    assert (cfg.get("text_config") or cfg).get("vocab_size", cfg.get("vocab_size")) == rows


def test_sources_are_laid_out_like_the_published_repositories(real):
    src = {arch: real[arch].with_name(arch + ".source") for arch in ("tc-llava", "stave", "red-villm")}
    assert config(src["tc-llava"])["model_type"] == "llava"
    assert (src["tc-llava"] / "chat_template.json").exists()
    assert len(json.loads((src["tc-llava"] / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert any(k.startswith("language_model.model.") for k in
               json.loads((src["tc-llava"] / "model.safetensors.index.json").read_text())["weight_map"])
    assert config(src["stave"])["model_type"] == "qwen2_vl"
    assert json.loads((src["stave"] / "preprocessor_config.json").read_text())["max_pixels"] == 12845056
    assert config(src["red-villm"])["model_type"] == "qwen"
    assert (src["red-villm"] / "qwen.tiktoken").read_text().count("\n") == 151643
    assert not (src["red-villm"] / "tokenizer.json").exists()  # the converter makes it from qwen.tiktoken
    assert config(real["video-ccam"])["model_type"] == "videoccam"
    assert len(list(real["video-ccam"].glob("model-*-of-00004.safetensors"))) == 4


def test_chat_templates_are_the_published_ones(real):
    """Qwen2.5's template (Video-CCAM v1.2) takes only string content: the gateway joins typed parts into the
    authors' ``"<video>\\n{question}"``; the other templates place a typed video part themselves."""
    from framewise.model_plugins.chat_template import as_string_content, takes_typed_parts

    probe = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    rendered = {}
    for arch, placeholder in (("tc-llava", "<video>"), ("stave", "<|video_pad|>"),
                              ("red-villm", "<img><imgpad></img>"), ("video-ccam", "<video>")):
        tok = AutoTokenizer.from_pretrained(real[arch])

        def render(messages, tok=tok):
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

        typed = takes_typed_parts(render, {"video": placeholder})
        assert typed is (arch != "video-ccam")
        rendered[arch] = render(probe if typed else as_string_content(probe, {"video": placeholder}))
    assert rendered["tc-llava"] == f"USER: <video>\n{QUESTION} ASSISTANT:"
    assert rendered["video-ccam"] == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                                      f"assistant.<|im_end|>\n<|im_start|>user\n<video>\n{QUESTION}<|im_end|>\n"
                                      "<|im_start|>assistant\n")
    assert "<|vision_start|><|video_pad|><|vision_end|>" + QUESTION in rendered["stave"]
    assert f"Video 1: <img><imgpad></img>\n{QUESTION}" in rendered["red-villm"]


def test_llava_7b_geometry_refuses_to_start_naming_the_fix(real):
    """8 frames x 576 = 4608 tokens > 4096: exit 2 before any engine, with the numbers and the flags."""
    out = cli("serve", "--model", str(real["tc-llava"]), "--port", "1")
    assert out.returncode == 2, out.stderr
    assert "8 frames × 576 = 4608" in out.stderr and "4096" in out.stderr
    assert "--max-model-len 4672" in out.stderr and "frame_pooling" in out.stderr


# ---- served with default settings, against the reference ------------------------------------------------


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from framewise.server.video.synth import write_clip
    from tests.gateway_support import MediaServer

    d = tmp_path_factory.mktemp("real-media")
    write_clip(str(d / "clip.mp4"), frames=84, fps=24)  # 3.5 s, 192x120
    write_clip(str(d / "long.mp4"), frames=480, fps=24)  # 20 s
    write_clip(str(d / "short.mp4"), frames=24, fps=24)  # 1 s: RED-VILLM takes every frame up to 100
    write_clip(str(d / "readme.mp4"), frames=84, fps=2)  # 42 s: the README asks 16 frames of 10-40 s
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 10, 10)).save(d / "picture.png")
    server = MediaServer(d)
    yield d, server
    server.close()


def reference_answer(arch: str, model: Path, video: Path, rendered: str):
    """The reference implementation's prompt ids and greedy tokens for the gateway's default sampling of
    ``video`` (the same decode function, parameters and frames)."""
    from transformers import AutoConfig

    from framewise.model_plugins import register
    from framewise.server.engine import model_defaults
    from framewise.server.video.decode import sample_video
    from framewise.server.video.sampling import FrameSampling

    register()
    tok = AutoTokenizer.from_pretrained(model)
    cfg = AutoConfig.from_pretrained(model)
    d = model_defaults(cfg, tok, str(model), 32768)
    sampled = sample_video(str(video), FrameSampling(fps=d.fps, fps_rule=d.fps_rule), default_frames=d.num_frames,
                           max_frames=d.max_frames, shortest_edge=d.shortest_edge)
    ids = tok(rendered).input_ids
    if arch == "tc-llava":
        from framewise.model_plugins.reference.tc_llava import TCLlavaReference as Reference
    elif arch == "stave":
        from framewise.model_plugins.reference.stave import StaveReference as Reference
    elif arch == "video-ccam":
        from framewise.model_plugins.reference.video_ccam import VideoCCAMReference as Reference
    else:
        from framewise.model_plugins.reference.red_villm import RedVillmReference as Reference
    ref = Reference.from_pretrained(str(model))
    prep = (ref.expand_prompt(ids, videos=[sampled.frames]) if arch == "red-villm"
            else ref.prepare(ids, videos=[sampled.frames]))
    tokens, _ = ref.greedy(prep, MAX_TOKENS)
    return sampled, prep.input_ids, tokens, tok


RENDERED = {
    "tc-llava": f"USER: <video>\n{QUESTION} ASSISTANT:",
    "stave": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
              f"<|video_pad|><|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n"),
    "video-ccam": ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                   f"<|im_end|>\n<|im_start|>user\n<video>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"),
    "red-villm": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nVideo 1: "
                  f"<img><imgpad></img>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"),
}
# video tokens of the clip at the published geometry, with the defaults: TC-LLaVA 8 frames x 24^2/2^2;
# STAVE 8 frames (2 fps, even) of 192x120 -> 196x112: 4 temporal steps x (14 x 8 patches / 4); Video-CCAM
# its 1024 queries; RED-VILLM 100 temporal (padded) + 256 spatial
VIDEO_TOKENS = {"tc-llava": 8 * 144, "stave": 4 * 28, "video-ccam": 1024, "red-villm": 356}
PLACEHOLDER_IDS = {"tc-llava": 32002, "stave": 151656, "video-ccam": 151666, "red-villm": 151859}


@pytest.mark.engine
@pytest.mark.long
@pytest.mark.parametrize("arch", list(PUBLISHED))
def test_served_with_defaults_answers_as_the_reference(real, media, arch, tmp_path):
    import openai

    from tests.gateway_support import Gateway, free_port

    model, name, key = real[arch], arch, "sk-real"
    media_dir, server = media
    port = free_port()
    args = ("--served-model-name", arch, "--enforce-eager")
    if arch == "tc-llava":  # the README's example: llava-1.5-7b converted with --frame-pooling 2, served as shown
        model = tmp_path / "tc-llava-7b"
        out = cli("convert-llava", "--src", str(real[arch].with_name("tc-llava.source")), "--out", str(model),
                  "--frame-pooling", "2")
        assert out.returncode == 0, out.stderr
        name, key, args = "tc-llava-7b", README_KEY, readme_serve_args(model, port, f"127.0.0.1:{server.port}")
    # TC-LLaVA through the README's `make serve` (set-up check, self-check, serve) with its serve example's flags
    gw = Gateway(model, tmp_path, api_key=key, allowed_hosts=f"127.0.0.1:{server.port}", args=args, pin=True,
                 ready_s=300, port=port, make_serve=arch == "tc-llava")
    try:
        client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0, timeout=300)

        def ask(clip: str = "clip.mp4", **kw):
            part = {"type": "video_url", "video_url": {"url": server.url(clip)}}
            return client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}],
                max_tokens=MAX_TOKENS, temperature=0, **{"extra_body": {"ignore_eos": True}, **kw})

        clip = "short.mp4" if arch == "red-villm" else "clip.mp4"
        answer = ask(clip, extra_body={"ignore_eos": True, "return_token_ids": True})
        sampled, prompt_ids, tokens, tok = reference_answer(arch, model, media_dir / clip, RENDERED[arch])
        [video] = answer.model_extra["framewise"]["media"]
        assert video["frames"] == len(sampled.frames)
        assert video["timestamps"] == pytest.approx(sampled.timestamps, abs=1e-3)
        assert prompt_ids.count(PLACEHOLDER_IDS[arch]) == VIDEO_TOKENS[arch]
        assert answer.usage.prompt_tokens == len(prompt_ids)
        assert answer.usage.completion_tokens == MAX_TOKENS
        assert answer.model_extra["prompt_token_ids"] == prompt_ids  # the reference's prompt, expanded
        assert answer.choices[0].model_extra["token_ids"] == tokens  # the same greedy tokens
        text = tok.decode(tokens, skip_special_tokens=True)
        if "\ufffd" not in text:  # vLLM holds back text that ends in an incomplete UTF-8 sequence
            assert answer.choices[0].message.content == text

        if arch == "stave":  # the authors' evaluation sampling at 2 fps, capped at 32 frames; streaming agrees
            assert video["frames"] == 8
            chunks = list(ask(stream=True, extra_body={"ignore_eos": True, "return_token_ids": True}))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
                answer.choices[0].message.content
            assert chunks[0].model_extra["prompt_token_ids"] == prompt_ids
            assert [t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids", [])] == tokens
            assert ask("long.mp4").model_extra["framewise"]["media"][0]["frames"] == 32
            picture = client.chat.completions.create(model=name, max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": server.url("picture.png")}}, {"type": "text", "text": "?"}]}])
            assert picture.model_extra["framewise"]["media"][0]["type"] == "image"
            assert picture.usage.completion_tokens == 2
        if arch == "video-ccam":  # 16 frames by default, 96 on request: always the 1024 queries
            assert video["frames"] == 16
            long = client.chat.completions.create(
                model=name, max_tokens=2, messages=[{"role": "user", "content": [
                    {"type": "video_url", "video_url": {"url": server.url("long.mp4"), "num_frames": 96}},
                    {"type": "text", "text": QUESTION}]}])
            assert long.model_extra["framewise"]["media"][0]["frames"] == 96
            assert long.usage.prompt_tokens == answer.usage.prompt_tokens
        if arch == "tc-llava":  # the README's Python example, against this server and a 42 s clip
            r = run_readme_example(gw.base_url, server.url("readme.mp4"))
            [seen] = r.model_extra["framewise"]["media"]
            assert seen["frames"] == 16 and all(10 <= t <= 40 for t in seen["timestamps"])
            assert r.usage.prompt_tokens > 16 * 144 and r.choices[0].finish_reason in ("stop", "length")
    finally:
        gw.close()


README_KEY = "sk-mine"


def readme_blocks(lang: str) -> list[str]:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    return [b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith(lang + "\n")]


def readme_serve_args(model: Path, port: int, media_host: str) -> tuple[str, ...]:
    """The flags of the README's ``framewise serve`` example, with this test's model, port and media host."""
    import shlex

    [command] = [b for b in readme_blocks("bash") if b.startswith("framewise serve")]
    words = shlex.split(command.replace("\\\n", " "), comments=True)
    assert words[:2] == ["framewise", "serve"]
    values = dict(zip(words[2::2], words[3::2], strict=True))
    assert values["--model"] == "/models/tc-llava-7b" and values["--api-key"] == README_KEY
    values.update({"--model": str(model), "--port": str(port), "--allowed-media-hosts": media_host})
    return (*(x for kv in values.items() for x in kv), "--enforce-eager")


def run_readme_example(base_url: str, clip_url: str):
    """The README's Python example, run as written but for the server's address and the clip's URL."""
    import contextlib
    import io

    [code] = [b for b in readme_blocks("python") if "chat.completions.create" in b]
    assert "http://127.0.0.1:8000/v1" in code and "https://example.org/clip.mp4" in code
    code = code.replace("http://127.0.0.1:8000/v1", f"{base_url}/v1").replace("https://example.org/clip.mp4",
                                                                               clip_url)
    scope: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the project's own README
    assert scope["r"].choices[0].message.content in printed.getvalue()
    return scope["r"]
