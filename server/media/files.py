"""Uploaded files (``POST /v1/files``): per-owner records over content-addressed bytes on disk.

Every file belongs to the tenant that uploaded it (server/tenants.py). Its id is opaque to others:
``file-`` + 24 hex digits of an HMAC (a random key kept in the directory, ``secret.key``) of the owner and
the content's SHA-256 -- the same bytes uploaded by two tenants are two files with two ids, and one
tenant uploading the same bytes twice gets its same file back. Another tenant asking for an id gets 404
(as for an id that never existed); an admin may see every owner's files.

Layout (the directory may be a volume shared by several gateway replicas and workers)::

    secret.key                     the id key (created once, by whichever replica comes first)
    blobs/<sha256>                 the bytes, once per content (what the frame cache is keyed by, too)
    refs/<sha256>/<file id>        one empty file per record using the bytes
    owners/<tenant>/<file id>.json the record: id, owner, bytes, created_at, expires_at, filename, purpose

Every write is a temporary file in the same file system, fsynced, then renamed into place (``os.replace``
is atomic), in the order ref, bytes, record (metadata last), so a reader on any replica sees no file or a
whole one, never a record without its bytes (a record whose bytes are missing reads as 404). A delete
removes the record first (no replica sees the file from then on), then its ref, and the bytes only when no
ref is left: it removes the ``refs/<sha256>`` directory (``rmdir`` fails while another ref is in it), moves
the bytes aside, and puts them back if a ref appeared meanwhile (an upload of the same bytes on another
replica, which adds its ref before it looks for the bytes) -- so the bytes go only when no owner remains.

Retention: a record has ``expires_at`` (its owner's ``retention_s`` from its upload; none with 0); an
expired record reads as 404 and is removed by :meth:`FileStore.sweep` (on uploads, and periodically).
Storage quota: the bytes of an owner's records (:meth:`FileStore.usage`).

The same store hands a job the bytes a gateway already downloaded (:meth:`FileStore.stage`, purpose
``job_media``, owned by the job's tenant): a long video decided "long" after its download is not fetched a
second time by the worker. A staged file is removed when its job ends (:meth:`FileStore.unstage`, only while
it is still ``job_media``: an upload of the same bytes by the same tenant makes it an upload), or by the
sweep after ``staged_ttl_s``. Staged files are not listed and count toward no quota.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fastapi import UploadFile

from framewise.server.errors import APIError
from framewise.server.tenants import DEFAULT, NAME

_ID = re.compile(r"^file-[0-9a-f]{24}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
STAGED = "job_media"  # the purpose of bytes staged for a job
STORAGE_RETRY_AFTER_S = 60


@dataclass
class FileObject:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    sha256: str
    owner: str = DEFAULT
    expires_at: int | None = None
    object: str = "file"

    def public(self) -> dict:
        d = asdict(self)
        d.pop("sha256")
        d.pop("owner")
        return d

    @classmethod
    def from_json(cls, raw: bytes) -> FileObject:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(raw).items() if k in known})

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (time.time() if now is None else now)


def _not_found(file_id: str) -> APIError:
    return APIError(404, "file_not_found", f"no file with id {file_id!r}", "file_id")


class StorageQuotaExceeded(APIError):
    def __init__(self, owner: str, used: int, size: int, quota: int):
        super().__init__(429, "storage_quota_exceeded", f"tenant {owner!r} stores {used} bytes of uploads; "
                         f"{size} more would pass its quota of {quota} bytes (delete files, or wait for them to "
                         "expire)", "file", headers={"Retry-After": str(STORAGE_RETRY_AFTER_S)})


class FileStore:
    SWEEP_EVERY_S = 600.0

    def __init__(self, root: str, max_bytes: int, staged_ttl_s: float = 2 * 24 * 3600):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.staged_ttl_s = staged_ttl_s
        self._next_sweep = 0.0
        self._key: bytes | None = None
        self.blobs, self.refs, self.owners = self.root / "blobs", self.root / "refs", self.root / "owners"
        for d in (self.root, self.blobs, self.refs, self.owners):
            d.mkdir(parents=True, exist_ok=True)

    # ---- ids and paths -------------------------------------------------------------------------------------
    def _secret(self) -> bytes:
        """The id key, shared by every replica on the directory: the first to come writes it (link: atomic)."""
        if self._key is None:
            path = self.root / "secret.key"
            if not path.is_file():
                fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".secret-")
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(secrets.token_bytes(32))
                        f.flush()
                        os.fsync(f.fileno())
                    with contextlib.suppress(FileExistsError):
                        os.link(tmp, path)
                finally:
                    os.unlink(tmp)
            self._key = path.read_bytes()
        return self._key

    def id_for(self, owner: str, sha256: str) -> str:
        return "file-" + hmac.new(self._secret(), f"{owner}\0{sha256}".encode(), hashlib.sha256).hexdigest()[:24]

    def _owner_dir(self, owner: str) -> Path:
        if not NAME.fullmatch(owner):
            raise ValueError(f"not a tenant name: {owner!r}")
        return self.owners / owner

    def _record(self, owner: str, file_id: str) -> Path:
        return self._owner_dir(owner) / f"{file_id}.json"

    def _blob(self, sha256: str) -> Path:
        if not _SHA.match(sha256):
            raise ValueError("not a SHA-256")
        return self.blobs / sha256

    def _read(self, path: Path) -> FileObject | None:
        try:
            return FileObject.from_json(path.read_bytes())
        except (FileNotFoundError, ValueError, TypeError):
            return None  # missing, or (not written by this code) unreadable: no usable file

    def _find(self, file_id: str, owner: str | None) -> tuple[FileObject, Path]:
        """The record of ``file_id`` owned by ``owner`` (None: any owner); 404 otherwise, and when expired."""
        if not _ID.match(file_id):
            raise _not_found(file_id)
        paths = [self._record(owner, file_id)] if owner is not None else list(self.owners.glob(f"*/{file_id}.json"))
        for path in paths:
            obj = self._read(path)
            if obj is not None and obj.id == file_id and not obj.expired():
                return obj, path
        raise _not_found(file_id)

    # ---- reading --------------------------------------------------------------------------------------------
    def get(self, file_id: str, owner: str | None = DEFAULT) -> tuple[FileObject, Path]:
        """The file's record and its bytes' path; 404 when either is missing (deleted, maybe by another replica),
        expired, or owned by another tenant (``owner`` None: any)."""
        obj, _ = self._find(file_id, owner)
        data = self._blob(obj.sha256)
        if not data.is_file():  # deleted between the two reads
            raise _not_found(file_id)
        return obj, data

    def records(self, owner: str | None = None) -> list[FileObject]:
        """Every record of ``owner`` (None: of every owner), staged and expired ones included."""
        dirs = [self._owner_dir(owner)] if owner is not None else [d for d in self.owners.iterdir() if d.is_dir()]
        out = []
        for d in dirs:
            for path in d.glob("file-*.json"):
                obj = self._read(path)
                if obj is not None:
                    out.append(obj)
        return out

    def list(self, owner: str | None, purpose: str | None = None) -> list[FileObject]:
        """The uploads of ``owner`` (None: everyone's) that can be read, newest first."""
        now = time.time()
        live = [o for o in self.records(owner) if o.purpose != STAGED and not o.expired(now)
                and (purpose is None or o.purpose == purpose) and self._blob(o.sha256).is_file()]
        return sorted(live, key=lambda o: (o.created_at, o.id), reverse=True)

    def usage(self, owner: str) -> int:
        """Bytes of ``owner``'s uploads (its storage quota counts these; staged and expired ones do not)."""
        now = time.time()
        return sum(o.bytes for o in self.records(owner) if o.purpose != STAGED and not o.expired(now))

    # ---- writing --------------------------------------------------------------------------------------------
    def stage(self, path: str, sha256: str, size: int, name: str = "media", owner: str = DEFAULT) -> str:
        """Put a local file (a download in the spool, on the same file system: a hard link, else a copy) in the
        store for a job of ``owner``; its id. A file of ``owner`` already holding these bytes stays as it is."""
        file_id = self.id_for(owner, sha256)
        existing = self._read(self._record(owner, file_id))
        if existing is not None and not existing.expired() and self._blob(sha256).is_file():
            return file_id
        tmp = self.root / f".stage-{uuid.uuid4().hex}"
        try:
            try:
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            now = int(time.time())
            obj = FileObject(id=file_id, bytes=size, created_at=now, filename=os.path.basename(name), purpose=STAGED,
                             sha256=sha256, owner=owner, expires_at=now + int(self.staged_ttl_s))
            self._publish(str(tmp), obj)
        finally:
            tmp.unlink(missing_ok=True)
        self.maybe_sweep()
        return file_id

    def unstage(self, file_id: str, owner: str | None = DEFAULT) -> None:
        """Remove a staged file once its job has ended, unless it became its owner's upload meanwhile."""
        with contextlib.suppress(Exception):
            obj, _ = self._find(file_id, owner)
            if obj.purpose == STAGED:
                self.delete(file_id, obj.owner)

    async def save(self, upload: UploadFile, purpose: str, owner: str = DEFAULT, retention_s: int = 0,
                   quota_bytes: int = 0) -> FileObject:
        """Store an upload for ``owner``: kept ``retention_s`` (0: no expiry); 429 ``storage_quota_exceeded``
        when ``owner``'s uploads would pass ``quota_bytes`` (0: no quota)."""
        digest = hashlib.sha256()
        size = 0
        self._owner_dir(owner)  # a valid name before any byte is written
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
            file_id = self.id_for(owner, sha)
            if quota_bytes > 0:
                await asyncio.to_thread(self.sweep, owner)
                now = time.time()
                used = sum(o.bytes for o in self.records(owner) if o.purpose != STAGED and not o.expired(now)
                           and o.id != file_id)  # the same bytes again replace their record
                if used + size > quota_bytes:
                    raise StorageQuotaExceeded(owner, used, size, quota_bytes)
            now = int(time.time())
            obj = FileObject(id=file_id, bytes=size, created_at=now,
                             filename=os.path.basename(upload.filename or "upload"), purpose=purpose, sha256=sha,
                             owner=owner, expires_at=now + int(retention_s) if retention_s > 0 else None)
            await asyncio.to_thread(self._publish, tmp, obj)
            if time.monotonic() >= self._next_sweep:
                await asyncio.to_thread(self.maybe_sweep)
            return obj
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _publish(self, tmp: str, obj: FileObject) -> None:
        """Ref, then bytes, then record (metadata last: a record means its bytes are there)."""
        self._add_ref(obj.sha256, obj.id)
        data = self._blob(obj.sha256)
        if not data.is_file():
            os.replace(tmp, data)  # same content, same name: replacing a concurrent twin is harmless
        record = self._record(obj.owner, obj.id)
        record.parent.mkdir(exist_ok=True)
        self._write_atomic(record, json.dumps(asdict(obj)).encode())
        self._sync_dir()

    def _add_ref(self, sha256: str, file_id: str) -> None:
        d = self.refs / sha256
        for _ in range(100):
            d.mkdir(exist_ok=True)
            try:
                os.close(os.open(d / file_id, os.O_CREAT | os.O_WRONLY, 0o644))
                return
            except FileNotFoundError:
                continue  # the last owner's delete removed the directory just now: make it again
        raise OSError(f"could not reference {sha256}")

    def _drop_ref(self, sha256: str, file_id: str) -> None:
        """Remove one ref; the bytes too when it was the last (see the module doc)."""
        d = self.refs / sha256
        (d / file_id).unlink(missing_ok=True)
        try:
            os.rmdir(d)
        except OSError:
            return  # other refs remain (or another delete got here first)
        data = self._blob(sha256)
        aside = self.blobs / f".gone-{uuid.uuid4().hex}"
        try:
            os.rename(data, aside)
        except FileNotFoundError:
            return
        if d.exists():  # an upload of the same bytes took a ref meanwhile: it keeps them
            os.replace(aside, data)
        else:
            aside.unlink(missing_ok=True)

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
        for d in (self.blobs, self.owners):
            try:
                fd = os.open(d, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:  # some network file systems refuse fsync on a directory
                pass
            finally:
                os.close(fd)

    def delete(self, file_id: str, owner: str | None = DEFAULT) -> None:
        """``owner``'s file (None: whoever owns it). The record first, so no replica sees the file from then
        on; then its ref; the bytes when no other owner's record uses them."""
        obj, record = self._find(file_id, owner)
        try:
            record.unlink()
        except FileNotFoundError:
            raise _not_found(file_id) from None
        self._drop_ref(obj.sha256, obj.id)

    # ---- retention ------------------------------------------------------------------------------------------
    def sweep(self, owner: str | None = None) -> int:
        """Remove expired records (uploads past their retention, staged files past ``staged_ttl_s``) of
        ``owner`` (None: every owner); how many."""
        removed, now = 0, time.time()
        for obj in self.records(owner):
            if obj.expired(now):
                with contextlib.suppress(Exception):
                    record = self._record(obj.owner, obj.id)
                    if (current := self._read(record)) is not None and current.expired(now):
                        record.unlink()
                        self._drop_ref(obj.sha256, obj.id)
                        removed += 1
        return removed

    sweep_staged = sweep

    def maybe_sweep(self) -> None:
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + self.SWEEP_EVERY_S
            with contextlib.suppress(Exception):
                self.sweep()
