"""Uploaded files (``POST /v1/files``), stored content-addressed on disk.

The id is derived from the content (``file-`` + 24 hex digits of its SHA-256), so
uploading the same bytes twice returns the same file and its decoded frames stay
cached across questions.

The directory may be a volume shared by several gateway replicas and workers: every
write is a temporary file in the same directory, fsynced, then renamed into place
(``os.replace`` is atomic), data first and metadata last, so a reader on any replica sees
either no file or a whole one, never metadata without its data.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import UploadFile

from server.errors import APIError

_ID = re.compile(r"^file-[0-9a-f]{24}$")


@dataclass
class FileObject:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    sha256: str
    object: str = "file"

    def public(self) -> dict:
        d = asdict(self)
        d.pop("sha256")
        return d


class FileStore:
    def __init__(self, root: str, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    def _paths(self, file_id: str) -> tuple[Path, Path]:
        if not _ID.match(file_id):
            raise APIError(404, "file_not_found", f"no file with id {file_id!r}", "file_id")
        return self.root / f"{file_id}.bin", self.root / f"{file_id}.json"

    async def save(self, upload: UploadFile, purpose: str) -> FileObject:
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                while chunk := await upload.read(1 << 20):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise APIError(413, "file_too_large", f"upload exceeds the limit of {self.max_bytes} bytes",
                                       "file")
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                await asyncio.to_thread(os.fsync, f.fileno())
            if size == 0:
                raise APIError(400, "empty_file", "the uploaded file is empty", "file")
            sha = digest.hexdigest()
            obj = FileObject(id=f"file-{sha[:24]}", bytes=size, created_at=int(time.time()),
                             filename=os.path.basename(upload.filename or "upload"), purpose=purpose, sha256=sha)
            await asyncio.to_thread(self._publish, tmp, obj)
            return obj
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _publish(self, tmp: str, obj: FileObject) -> None:
        data, meta = self._paths(obj.id)
        os.replace(tmp, data)  # same content, same name: replacing a concurrent twin is harmless
        self._write_atomic(meta, json.dumps(asdict(obj)).encode())  # last: metadata means the data is there
        self._sync_dir()

    def _write_atomic(self, path: Path, payload: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".meta-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _sync_dir(self) -> None:
        """Make the renames durable (a replica crash must not leave metadata whose rename survived alone)."""
        try:
            fd = os.open(self.root, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:  # some network file systems refuse fsync on a directory
            pass
        finally:
            os.close(fd)

    def get(self, file_id: str) -> tuple[FileObject, Path]:
        """The file's metadata and data path; 404 when either is missing (deleted, maybe by another replica)."""
        data, meta = self._paths(file_id)
        try:
            obj = FileObject(**json.loads(meta.read_bytes()))
        except (FileNotFoundError, ValueError, TypeError):
            # missing, or (not written by this code) unreadable: either way there is no usable file
            raise APIError(404, "file_not_found", f"no file with id {file_id!r}", "file_id") from None
        if not data.is_file():  # deleted between the two reads
            raise APIError(404, "file_not_found", f"no file with id {file_id!r}", "file_id")
        return obj, data

    def delete(self, file_id: str) -> None:
        """Metadata first, so no replica sees the file from then on; then the data."""
        data, meta = self._paths(file_id)
        try:
            meta.unlink()
        except FileNotFoundError:
            raise APIError(404, "file_not_found", f"no file with id {file_id!r}", "file_id") from None
        data.unlink(missing_ok=True)
