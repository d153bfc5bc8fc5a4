"""Sampled frames shared by gateway replicas, on the shared files volume.

Behind each replica's in-memory :class:`~framewise.server.video.service.FrameCache`: a video one replica
decoded is a hit for the others (same content hash, sampling and size). One entry is two files in
``<dir>/<2 hex>/``: ``<key>.npy`` (the frames, ``uint8 (T, H, W, 3)``, read without pickle) and ``<key>.json``
(timestamps and the video's info), each written to a temporary name and renamed into place, the JSON last:
a reader sees whole entries or none. The total is bounded: past ``max_bytes`` the least recently used
entries (modification time, refreshed on each hit) are deleted, by whichever replica writes. Anything
unreadable is a miss (and removed), never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np

from framewise.server.video.decode import SampledVideo, VideoInfo


class SharedFrameStore:
    def __init__(self, root: str | os.PathLike, max_bytes: int):
        self.root, self.max_bytes = Path(root), max_bytes
        self._evicting = threading.Lock()

    @staticmethod
    def name(key: tuple) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def _paths(self, key: tuple) -> tuple[Path, Path]:
        name = self.name(key)
        folder = self.root / name[:2]
        return folder / f"{name}.npy", folder / f"{name}.json"

    def has(self, key: tuple) -> bool:
        return self._paths(key)[1].exists()

    def get(self, key: tuple) -> SampledVideo | None:
        frames_path, meta_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_text())
            frames = np.load(frames_path, allow_pickle=False)
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != len(meta["timestamps"]):
                raise ValueError("frames do not match their metadata")
            video = SampledVideo(frames=frames, timestamps=list(meta["timestamps"]), info=VideoInfo(**meta["info"]),
                                 extra={k: list(meta[k]) for k in ("targets", "seek_used") if k in meta})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            self._remove(frames_path, meta_path)
            return None
        with contextlib.suppress(OSError):
            os.utime(meta_path)  # recently used
        return video

    def put(self, key: tuple, video: SampledVideo) -> None:
        frames = np.ascontiguousarray(video.frames, dtype=np.uint8)
        if frames.nbytes > self.max_bytes:
            return
        frames_path, meta_path = self._paths(key)
        frames_path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"timestamps": list(video.timestamps), "info": asdict(video.info),
                **{k: list(video.extra[k]) for k in ("targets", "seek_used") if k in video.extra}}
        self._write(frames_path, lambda f: np.save(f, frames, allow_pickle=False))
        self._write(meta_path, lambda f: f.write(json.dumps(meta).encode()))
        self._evict()

    def _write(self, path: Path, write) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _remove(self, *paths: Path) -> None:
        for p in paths:
            with contextlib.suppress(OSError):
                p.unlink()

    def entries(self) -> list[tuple[float, int, Path, Path]]:
        """``(last used, bytes, frames file, metadata file)`` of every whole entry."""
        out = []
        for meta in self.root.glob("*/*.json"):
            frames = meta.with_suffix(".npy")
            with contextlib.suppress(OSError):
                st_meta, st_frames = meta.stat(), frames.stat()
                out.append((st_meta.st_mtime, st_meta.st_size + st_frames.st_size, frames, meta))
        return out

    def _evict(self) -> None:
        if not self._evicting.acquire(blocking=False):
            return  # another thread of this replica is at it
        try:
            entries = sorted(self.entries())
            total = sum(size for _, size, _, _ in entries)
            for _, size, frames, meta in entries:
                if total <= self.max_bytes:
                    break
                self._remove(meta, frames)
                total -= size
        finally:
            self._evicting.release()
