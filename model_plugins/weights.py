"""Checkpoint weights streamed shard by shard, tensor by tensor.

A loader built on these holds the model plus about one tensor (or, when writing, one
output shard), never the whole checkpoint as a second copy in RAM. vLLM's own loaders
stream the same way; the models' ``load_weights`` consume its stream lazily.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open


def safetensors_files(model_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint's shards: those its index names, else every ``*.safetensors``."""
    path = Path(model_dir)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    return files


def iter_safetensors(model_dir: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of every shard, one tensor read at a time."""
    for file in safetensors_files(model_dir):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, f.get_tensor(name)


def load_streamed(module: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """``module.load_state_dict(dict(weights), strict=True)`` without the dict: each tensor is
    copied into its parameter/buffer as it arrives and then dropped."""
    targets = module.state_dict(keep_vars=True)
    seen, unexpected = set(), []
    with torch.no_grad():
        for name, tensor in weights:
            target = targets.get(name)
            if target is None:
                unexpected.append(name)
                continue
            if target.shape != tensor.shape:
                raise RuntimeError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model {tuple(target.shape)}")
            target.copy_(tensor)
            seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match {type(module).__name__}: missing {missing[:8]}"
                           f"{'...' if len(missing) > 8 else ''}, unexpected {sorted(unexpected)[:8]}"
                           f"{'...' if len(unexpected) > 8 else ''}")


class ShardWriter:
    """Write tensors as they come into ``model-0000i-of-0000n.safetensors`` shards of at most
    ``max_shard_bytes`` (plus ``model.safetensors.index.json``), or one ``model.safetensors``
    when everything fits in one shard; only the current shard is held in memory."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 2 << 30):
        self.out = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._shard: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._shard and self._bytes + size > self.max_shard_bytes:
            self._flush()
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        self._shard[name] = tensor.contiguous()
        self._bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp = self.out / f".shard-{len(self._written):05d}.safetensors"
        save_file(self._shard, tmp, metadata={"format": "pt"})
        self._written.append((tmp, list(self._shard)))
        self._shard, self._bytes = {}, 0

    def abort(self) -> None:
        """Remove the shards written so far (a failed conversion leaves no partial checkpoint)."""
        for tmp, _ in self._written:
            tmp.unlink(missing_ok=True)
        self._written, self._shard = [], {}

    def close(self) -> list[Path]:
        """Flush, name the shards, write the index (several shards) and return the files."""
        if self._shard or not self._written:
            self._flush()
        n = len(self._written)
        if n == 1:
            final = self.out / "model.safetensors"
            os.replace(self._written[0][0], final)
            return [final]
        files, weight_map = [], {}
        for i, (tmp, keys) in enumerate(self._written):
            final = self.out / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, final)
            files.append(final)
            weight_map.update(dict.fromkeys(keys, final.name))
        (self.out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2))
        return files
