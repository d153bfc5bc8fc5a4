"""The ``framewise`` CLI, the plugin self-check and the llava-hf -> TC-LLaVA converter."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from framewise import model_plugins
from framewise.model_plugins.reference.published import LLAVA_HF_CHAT_TEMPLATE
from framewise.model_plugins.selfcheck import PluginSelfCheckError, check_plugin
from tests.conftest import ROOT, _engine, cli, random_video

FRAMEWISE = [sys.executable, "-m", "framewise.server.cli"]


def run_cli(*args, env=None, cwd=None):
    """The installed console script, in a process of its own (its entry point and environment are the test)."""
    return subprocess.run(["framewise", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}", **(env or {})},
                          cwd=cwd or ROOT)


def test_plugin_entry_point_registers_the_architecture():
    assert check_plugin() == ["TCLlavaForConditionalGeneration", "VideoCCAM", "StaveQwen2VLForConditionalGeneration",
                              "CustomQwen2VLForConditionalGeneration", "Qwen2VLOnPluginPreprocessing",
                              "RedVillmForConditionalGeneration"]
    model_plugins.register()  # idempotent
    from transformers import AutoConfig

    from framewise.model_plugins.configs import TCLlavaConfig

    assert AutoConfig.for_model("tc_llava").__class__ is TCLlavaConfig


def test_selfcheck_names_the_cause_when_registration_fails(monkeypatch):
    def broken():
        raise ImportError("cannot import name 'LlamaConfig'")

    monkeypatch.setattr(model_plugins, "register", broken)
    with pytest.raises(PluginSelfCheckError, match="failed to register: ImportError: cannot import name 'LlamaConfig'"):
        check_plugin()


def test_selfcheck_cli(tmp_path):
    ok = run_cli("selfcheck")
    assert ok.returncode == 0 and "TCLlavaForConditionalGeneration" in ok.stdout
    excluded = run_cli("selfcheck", env={"VLLM_PLUGINS": "some_other_plugin"})
    assert excluded.returncode == 1
    assert "VLLM_PLUGINS='some_other_plugin' excludes 'framewise'" in excluded.stderr


def test_demo_model_cli_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "demo"
    res = cli("demo-model", "--arch", "tc-llava", "--out", str(out))
    assert res.returncode == 0, res.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["TCLlavaForConditionalGeneration"]
    from framewise.model_plugins.reference.tc_llava import TCLlavaReference

    TCLlavaReference.from_pretrained(str(out))
    bad = cli("demo-model", "--arch", "nope", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


# ---- converter ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava_hf_dir(tmp_path_factory):
    """A llava-hf checkpoint with the keys transformers 4.52-4.57 wrote (``model.*``; 5.x saves
    the original names again), an image-only tokenizer and a vocabulary padded past the
    tokenizer, like llava-1.5-7b-hf (32064 rows, 32002 tokens)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    from framewise.model_plugins.reference.demo_checkpoint import write_tc_llava

    base = tmp_path_factory.mktemp("ckpt")
    tc = base / "tc-src"
    write_tc_llava(str(tc), seed=7, video_token=False, vocab_size=520)
    raw = json.loads((tc / "config.json").read_text())
    cfg = LlavaConfig.from_dict({k: v for k, v in raw.items()
                                 if k not in ("model_type", "architectures", "video_token_index",
                                              "temporal_rope_gamma", "frame_block_mask", "is_mm_prefix_lm",
                                              "frame_pooling", "num_frames", "max_frames")})
    cfg.architectures = ["LlavaForConditionalGeneration"]
    out = base / "llava-hf"
    LlavaForConditionalGeneration.from_pretrained(tc, config=cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tc).save_pretrained(out)
    shutil.copy(tc / "preprocessor_config.json", out)
    renames = {"language_model.model.": "model.language_model.", "vision_tower.": "model.vision_tower.",
               "multi_modal_projector.": "model.multi_modal_projector.", "language_model.lm_head.": "lm_head."}
    state = load_file(out / "model.safetensors")
    new = {}
    for k, v in state.items():
        prefix = next(p for p in renames if k.startswith(p))
        new[renames[prefix] + k[len(prefix):]] = v
    save_file(new, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_convert_llava_hf_checkpoint(llava_hf_dir, tmp_path):
    from safetensors import safe_open

    from framewise.model_plugins.reference.tc_llava import TCLlavaReference

    with safe_open(llava_hf_dir / "model.safetensors", "pt") as f:
        assert any(k.startswith("model.language_model.") for k in f.keys())  # noqa: SIM118 - safe_open  # the new layout
    out = tmp_path / "tc"
    res = cli("convert-llava", "--src", str(llava_hf_dir), "--out", str(out), "--gamma", "0.5")
    assert res.returncode == 0, res.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "tc_llava" and cfg["architectures"] == ["TCLlavaForConditionalGeneration"]
    assert cfg["video_token_index"] == 512 and cfg["temporal_rope_gamma"] == 0.5 and cfg["frame_block_mask"]
    assert os.path.samefile(out / "model.safetensors", llava_hf_dir / "model.safetensors")  # linked, not copied
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<video>") == 512
    assert tok("a <video> b").input_ids.count(512) == 1
    ref = TCLlavaReference.from_pretrained(str(out))
    prep = ref.prepare(tok("USER: <video>\nWhat happens? ASSISTANT:").input_ids, videos=[random_video(2, seed=3)])
    assert torch.isfinite(ref.logits(prep.embeds, prep.spans)).all()


@pytest.mark.engine
def test_converted_checkpoint_in_vllm_matches_reference(llava_hf_dir, tmp_path_factory):
    """vLLM loads the transformers-saved (``model.*``) weights through the plugin's mapper."""
    from transformers import AutoTokenizer

    from framewise.model_plugins.convert import llava_to_tc_llava
    from framewise.model_plugins.reference.tc_llava import TCLlavaReference
    from tests.test_vllm_tc_llava import GREEDY, assert_matches_reference, request

    out = llava_to_tc_llava(llava_hf_dir, tmp_path_factory.mktemp("ckpt") / "converted")
    tok = AutoTokenizer.from_pretrained(out)
    reference = TCLlavaReference.from_pretrained(str(out))
    reqs = [request(tok, "USER: <video>\nWhat happens? ASSISTANT:", videos=[random_video(3, seed=5)]),
            request(tok, "USER: <image>\nWhat is this? ASSISTANT:", images=[random_video(1, seed=6)[0]])]
    for engine in _engine(out, tmp_path_factory, "converted", enable_prefix_caching=False, enforce_eager=True):
        results = engine.generate(reqs, GREEDY)
    for req, result in zip(reqs, results, strict=True):
        assert_matches_reference(result, reference, req)


# llava-hf/llava-1.5-*-hf ship their template in chat_template.json; it renders image and text
# parts only. Earlier revisions went through the parts in order; later ones render the images
# first (and mark assistant text with {% generation %}).
LLAVA_HF_IN_ORDER = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] + ' '}}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_HF_IMAGES_FIRST = LLAVA_HF_CHAT_TEMPLATE  # llava-1.5-7b-hf's chat_template.json: images first


def llava_hf_template_checkpoint(llava_hf_dir, out, template: str, where: str):
    """``llava_hf_dir`` with only ``template`` as its chat template, in ``chat_template.json``
    (llava-hf's layout) or in ``tokenizer_config.json``."""
    out.mkdir()
    for f in llava_hf_dir.iterdir():
        if f.name != "chat_template.jinja":
            os.link(f, out / f.name) if f.suffix == ".safetensors" else shutil.copy(f, out / f.name)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    if where == "tokenizer_config.json":
        tok_cfg["chat_template"] = template
    else:
        (out / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return out


def _parts(*items):
    return [{"type": "text", "text": x} if x not in ("image", "video") else {"type": x} for x in items]


@pytest.mark.parametrize(("template", "where"), [(LLAVA_HF_IN_ORDER, "chat_template.json"),
                                                 (LLAVA_HF_IMAGES_FIRST, "chat_template.json"),
                                                 (LLAVA_HF_IN_ORDER, "tokenizer_config.json")])
def test_convert_installs_a_chat_template_that_places_video(llava_hf_dir, tmp_path, template, where):
    from transformers import AutoTokenizer

    from framewise.model_plugins.convert import llava_to_tc_llava

    src = llava_hf_template_checkpoint(llava_hf_dir, tmp_path / "src", template, where)
    source_tok = AutoTokenizer.from_pretrained(src)
    out = llava_to_tc_llava(src, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(out)

    def original(messages):  # the source template, as shipped, on image/text parts
        return source_tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                              tokenize=False)

    def converted(messages):  # what the gateway renders (server/engine.py)
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    video = [{"role": "user", "content": _parts("video", "What happens?")}]
    image = [{"role": "user", "content": _parts("image", "What happens?")}]
    assert converted(video) == original(image).replace("<image>", "<video>") == "USER: <video>\nWhat happens? ASSISTANT:"
    assert converted(image) == original(image)
    assert tok(converted(video)).input_ids.count(tok.convert_tokens_to_ids("<video>")) == 1
    # several turns, images and videos mixed: each video where the source puts that image
    mixed = [{"role": "user", "content": _parts("Compare", "video", "with", "image")},
             {"role": "assistant", "content": _parts("They differ.")},
             {"role": "user", "content": _parts("And", "video")}]
    as_images = [{**m, "content": [{"type": "image"} if p["type"] == "video" else p for p in m["content"]]}
                 for m in mixed]
    pieces = original(as_images).split("<image>")
    assert len(pieces) == 4
    assert converted(mixed) == "<video>".join(pieces[:2]) + "<image>" + "<video>".join(pieces[2:])
    # no stale copy of the image-only template anywhere transformers looks (the processor
    # prefers chat_template.json over chat_template.jinja; old tokenizers read tokenizer_config.json)
    installed = (out / "chat_template.jinja").read_text()
    assert installed == tok.chat_template
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == installed
    if where == "chat_template.json":
        assert json.loads((out / "chat_template.json").read_text())["chat_template"] == installed
    assert template in installed  # the source runs unchanged inside: same conversation format


def test_convert_refuses_a_template_with_no_place_for_video(llava_hf_dir, tmp_path):
    from framewise.model_plugins.chat_template import ChatTemplateError
    from framewise.model_plugins.convert import llava_to_tc_llava

    one_image_per_turn = ("{% for message in messages %}USER: <image>\n{{ message['content'][-1]['text'] }} "
                          "{% endfor %}ASSISTANT:")
    src = llava_hf_template_checkpoint(llava_hf_dir, tmp_path / "src", one_image_per_turn, "chat_template.json")
    with pytest.raises(ChatTemplateError, match="renders 1 <image> for 2 image parts"):
        llava_to_tc_llava(src, tmp_path / "out")


def test_convert_rejects_other_model_types(tmp_path):
    src = tmp_path / "qwen"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    res = cli("convert-llava", "--src", str(src), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "not llava-hf" in res.stderr


@pytest.mark.engine
def test_demo_command_answers_about_a_generated_clip(tc_llava_dir, tmp_path):
    # output to files: vLLM's multiprocessing helpers may outlive the command and hold a pipe open
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([*FRAMEWISE, "demo", "--model", str(tc_llava_dir), "--max-tokens", "4"], cwd=ROOT,
                                stdout=out, stderr=err, start_new_session=True)
        try:
            code = proc.wait(300)
            time.sleep(2)
            leftovers = subprocess.run(["pgrep", "-g", str(proc.pid), "-f", "VLLM"], capture_output=True,
                                       text=True).stdout.split()
        finally:  # nothing of the engine may outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert not leftovers, "vLLM engine processes outlived `framewise demo`"
    stdout = (tmp_path / "out").read_text()
    assert code == 0, (tmp_path / "err").read_text()[-2000:]
    report, _ = json.JSONDecoder().raw_decode(stdout[stdout.rindex("{\n  \"model\""):])
    assert report["frames"] == 8 and report["completion_tokens"] >= 1
    assert report["prompt_tokens"] > 8 * 16 and isinstance(report["answer"], str)
