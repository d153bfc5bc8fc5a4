"""One files directory shared by several replicas (``--files-dir`` on a shared volume).

Writes are atomic (temporary file, fsync, rename; data first, metadata last), so a reader on
another replica sees no file or a whole one. First the store alone, two instances on one directory
with a reader racing the writers; then the session's two ``framewise serve`` processes (tests/stack.py), which
share one files directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading

import httpx
import pytest
from fastapi import UploadFile

from framewise.server.errors import APIError
from framewise.server.media.files import FileStore
from framewise.server.video.synth import write_clip
from tests.stack import MODEL


def _upload(data: bytes, name: str = "clip.mp4") -> UploadFile:
    return UploadFile(file=io.BytesIO(data), filename=name)


def test_a_reader_on_another_replica_never_sees_metadata_without_its_data(tmp_path):
    """Two stores (replicas) write files into one directory while a third only reads: every file the
    reader finds is whole (size and SHA-256 as its metadata says); none is ever half there."""
    writers = [FileStore(str(tmp_path), 8 << 20) for _ in range(2)]
    reader = FileStore(str(tmp_path), 8 << 20)
    blobs = [bytes([i]) * (1 << 20) + i.to_bytes(4, "big") for i in range(16)]  # 1 MiB each, distinct
    ids = [reader.id_for("default", hashlib.sha256(b).hexdigest()) for b in blobs]  # one key for all replicas
    done, seen, errors = threading.Event(), set(), []
    published: set[str] = set()  # an upload of it has returned and no delete has begun: must be readable

    def read():
        while not done.is_set():
            for file_id in ids:
                must_exist = file_id in published
                try:
                    obj, path = reader.get(file_id)
                    size = path.stat().st_size
                except APIError as e:
                    assert e.status == 404
                    if must_exist and file_id in published:  # published before and after this read
                        errors.append(f"{file_id}: 404 although its upload had returned")
                    continue
                except FileNotFoundError:  # deleted between get() and stat(): not a torn file
                    continue
                if size != obj.bytes:
                    errors.append(f"{file_id}: metadata says {obj.bytes} bytes, data has {size}")
                seen.add(file_id)

    async def write():
        # both replicas upload every blob at once, three times over (the same content: one id, one file)
        for _ in range(3):
            for blob in blobs:
                a, b = await asyncio.gather(writers[0].save(_upload(blob), "vision"),
                                            writers[1].save(_upload(blob), "vision"))
                assert a.id == b.id
                published.add(a.id)
        for file_id in ids[::2]:
            published.discard(file_id)
            writers[1].delete(file_id)

    t = threading.Thread(target=read)
    t.start()
    try:
        asyncio.run(write())
    finally:
        done.set()
        t.join()
    assert not errors, errors[:3]
    assert len(seen) >= len(ids) // 2  # the reader did race the writers
    for i, file_id in enumerate(ids):  # deleted on one replica = gone on the others
        if i % 2 == 0:
            with pytest.raises(APIError) as e:
                reader.get(file_id)
            assert e.value.status == 404
        else:
            obj, path = reader.get(file_id)
            assert path.read_bytes() == blobs[i]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert not [p.name for p in (tmp_path / "blobs").iterdir() if p.name.startswith(".")]
    assert len(list((tmp_path / "blobs").iterdir())) == len(ids) // 2  # the deleted files' bytes are gone


def test_metadata_without_data_is_not_found(tmp_path):
    """A replica that crashed between the two renames, or a delete racing a read: 404, never a broken file."""
    store = FileStore(str(tmp_path), 1 << 20)
    obj = asyncio.run(store.save(_upload(b"video bytes"), "vision"))
    (tmp_path / "blobs" / obj.sha256).unlink()
    with pytest.raises(APIError) as e:
        store.get(obj.id)
    assert e.value.status == 404


@pytest.mark.engine
def test_two_gateways_share_one_files_dir(gateway, jobs_gateway, tmp_path):
    clip = tmp_path / "shared-clip.mp4"
    write_clip(str(clip), frames=24, fps=24, width=72)
    a, b = gateway, jobs_gateway
    assert a.files_dir == b.files_dir
    up = httpx.post(f"{a.base_url}/v1/files", headers=a.headers, files={"file": ("clip.mp4", clip.read_bytes())},
                    data={"purpose": "vision"}, timeout=60)
    assert up.status_code == 200, up.text
    file_id = up.json()["id"]
    got = httpx.get(f"{b.base_url}/v1/files/{file_id}", headers=b.headers, timeout=30)
    assert got.status_code == 200 and got.json() == up.json()

    def chat(gw):
        return httpx.post(f"{gw.base_url}/v1/chat/completions", headers=gw.headers, timeout=120, json={
            "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": file_id, "num_frames": 2}},
                {"type": "text", "text": "What happens?"}]}]})

    r = chat(b)
    assert r.status_code == 200, r.text
    assert r.json()["framewise"]["media"][0]["frames"] == 2
    assert httpx.delete(f"{a.base_url}/v1/files/{file_id}", headers=a.headers).json()["deleted"] is True
    gone = httpx.get(f"{b.base_url}/v1/files/{file_id}", headers=b.headers, timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "file_not_found"
    r = chat(b)
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"
    again = httpx.delete(f"{b.base_url}/v1/files/{file_id}", headers=b.headers)
    assert again.status_code == 404
