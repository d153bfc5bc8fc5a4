"""Shared fixtures: tiny checkpoints and session-wide vLLM engines."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from multiprocessing.connection import Listener
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ROOT = Path(__file__).resolve().parents[1]


class EngineError(RuntimeError):
    def __init__(self, type_name: str, message: str):
        super().__init__(f"{type_name}: {message}")
        self.type_name, self.message = type_name, message


class EngineHandle:
    """A vLLM engine in a subprocess (tests/engine_server.py)."""

    def __init__(self, model: str, log_path: Path, **engine_args):
        self._dir = tempfile.mkdtemp(prefix="fw-engine-")
        address = os.path.join(self._dir, "sock")
        key = secrets.token_bytes(16)
        listener = Listener(address, authkey=key)
        self.log = open(log_path, "w")  # noqa: SIM115 - lives as long as the engine
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "engine_server.py"), "--address", address,
             "--authkey", key.hex(), "--model", model, "--engine-args", json.dumps(engine_args)],
            cwd=self._dir,  # never a directory holding a folder named like the package
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.conn = listener.accept()
        listener.close()
        msg = self.conn.recv()
        if msg[0] != "ready":
            self.close()
            raise EngineError(msg[1], f"{msg[2]} (log: {log_path})")

    def generate(self, prompts: list[dict], params: list[dict] | dict) -> list[dict]:
        if isinstance(params, dict):
            params = [params] * len(prompts)
        self.conn.send(("generate", prompts, params))
        msg = self.conn.recv()
        if msg[0] == "error":
            raise EngineError(msg[1], msg[2])
        return msg[1]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(("stop",))
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        # the whole process group: engine core and multiprocessing helpers included
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def variant_checkpoint(base: Path, out: Path, **config_changes) -> Path:
    """The same weights and tokenizer with some config.json values changed."""
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.name != "config.json":
            os.link(f, out / f.name)
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(config_changes)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


@pytest.fixture(scope="session")
def tc_llava_dir(tmp_path_factory) -> Path:
    from model_plugins.reference.demo_checkpoint import write_demo_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tc-llava"
    write_demo_checkpoint("tc-llava", str(out))
    return out


@pytest.fixture(scope="session")
def plain_llava_dir(tc_llava_dir, tmp_path_factory) -> Path:
    """gamma = 0, frame mask off: LLaVA-1.5 semantics on the same weights."""
    return variant_checkpoint(tc_llava_dir, tmp_path_factory.mktemp("ckpt") / "plain",
                              temporal_rope_gamma=0.0, frame_block_mask=False)


@pytest.fixture(scope="session")
def tokenizer(tc_llava_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tc_llava_dir)


@pytest.fixture(scope="session")
def reference(tc_llava_dir):
    from model_plugins.reference.tc_llava import TCLlavaReference

    return TCLlavaReference.from_pretrained(str(tc_llava_dir))


def _engine(model: Path, tmp_path_factory, name: str, **kw):
    log = tmp_path_factory.mktemp("logs") / f"{name}.log"
    handle = EngineHandle(str(model), log, max_model_len=2048, seed=0, **kw)
    yield handle
    handle.close()


@pytest.fixture(scope="session")
def tc_engine(tc_llava_dir, tmp_path_factory):
    """TC-LLaVA (gamma 1, frame mask on) with prefix caching on."""
    yield from _engine(tc_llava_dir, tmp_path_factory, "tc", enable_prefix_caching=True)


@pytest.fixture(scope="session")
def plain_engine(plain_llava_dir, tmp_path_factory):
    yield from _engine(plain_llava_dir, tmp_path_factory, "plain", enable_prefix_caching=False)


def random_video(num_frames: int, seed: int, size: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8)
