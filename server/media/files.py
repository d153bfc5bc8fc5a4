"""Uploaded files (``POST /v1/files``), stored content-addressed on disk.

The id is derived from the content (``file-`` + 24 hex digits of its SHA-256), so
uploading the same bytes twice returns the same file and its decoded frames stay
cached across questions.
"""

from __future__ import annotations

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
            if size == 0:
                raise APIError(400, "empty_file", "the uploaded file is empty", "file")
            sha = digest.hexdigest()
            obj = FileObject(id=f"file-{sha[:24]}", bytes=size, created_at=int(time.time()),
                             filename=os.path.basename(upload.filename or "upload"), purpose=purpose, sha256=sha)
            data, meta = self._paths(obj.id)
            os.replace(tmp, data)
            meta.write_text(json.dumps(asdict(obj)))
            return obj
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get(self, file_id: str) -> tuple[FileObject, Path]:
        data, meta = self._paths(file_id)
        try:
            obj = FileObject(**json.loads(meta.read_text()))
        except FileNotFoundError:
            raise APIError(404, "file_not_found", f"no file with id {file_id!r}", "file_id") from None
        return obj, data

    def delete(self, file_id: str) -> None:
        data, meta = self._paths(file_id)
        if not meta.exists():
            raise APIError(404, "file_not_found", f"no file with id {file_id!r}", "file_id")
        meta.unlink()
        data.unlink(missing_ok=True)
