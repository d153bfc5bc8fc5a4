"""A corrupted-media corpus, generated at test time from a fixed seed: byte-level mutations (bit
flips, truncations, duplicated and zeroed ranges) of valid MP4/WebM/AVI/MKV/MOV clips and of
images, plus playlists and manifests naming a loopback server that records every hit.

Every input must end in a result or a client error with a media code (never 5xx, never an
unexpected error), leave the decode pool serving, and leave no temporary file or process behind.
All of it goes through the decode service in-process; a share of it, and every playlist, through
a real gateway (demo model) by URL, as a data: URL and uploaded to /v1/files."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import random
import subprocess
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from framewise.server.video.decode import DecodeLimits, MediaError, SampledVideo
from framewise.server.video.pool import DecodePool
from framewise.server.video.sampling import FrameSampling
from framewise.server.video.service import FrameCache, VideoService
from framewise.server.video.synth import read_index, write_clip
from tests.gateway_support import RecordingServer
from tests.stack import KEY, MODEL
from tests.test_media_safety import REFUSED, playlists

SEED = 20261129
PER_FORMAT = 64  # x 5 containers = 320 mutated clips
MEDIA_CODES = {"invalid_video", "unsupported_codec", "video_too_long", "resolution_too_large", "decode_failed",
               "decode_timeout", "invalid_sampling", "invalid_image", "media_too_large"}


def _clips(d: Path) -> dict[str, bytes]:
    small = dict(frames=24, fps=12, width=96, height=64)
    paths = [write_clip(str(d / "c.mp4"), **small), write_clip(str(d / "c.webm"), codec="libvpx-vp9", **small),
             write_clip(str(d / "c.avi"), codec="mpeg4", **small), write_clip(str(d / "c.mkv"), audio=True, **small),
             write_clip(str(d / "c.mov"), gop=6, **small)]
    return {Path(p).suffix[1:]: Path(p).read_bytes() for p in paths}


def _images() -> dict[str, bytes]:
    img = Image.fromarray(np.random.default_rng(SEED).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    out = {}
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP"):
        buf = io.BytesIO()
        img.save(buf, fmt)
        out[fmt.lower()] = buf.getvalue()
    return out


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One of four byte-level mutations; positions favour the first and last KiB (headers, MP4's moov)."""
    n = len(data)

    def pos() -> int:
        zone = rng.random()
        if zone < 0.3:
            return rng.randrange(min(n, 1024))
        if zone < 0.5:
            return n - 1 - rng.randrange(min(n, 1024))
        return rng.randrange(n)

    out = bytearray(data)
    kind = rng.choice(["flip", "truncate", "duplicate", "zero"])
    if kind == "flip":
        for _ in range(rng.choice([1, 2, 4, 16, 64])):
            out[pos()] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        out = out[: pos()]
    elif kind == "duplicate":
        a, length = pos(), rng.choice([4, 16, 256, 4096])
        out[pos():pos()] = out[a:a + length]  # insert a copy of a range elsewhere
    else:
        a, length = pos(), rng.choice([1, 8, 64, 512, 8192])
        out[a:a + length] = bytes(len(out[a:a + length]))
    return kind, bytes(out)


def corpus(originals: dict[str, bytes], per_item: int, seed: int) -> list[tuple[str, str, bytes]]:
    """``(name, kind, bytes)``, the same for the same seed."""
    rng = random.Random(seed)
    return [(f"{ext}-{i:03d}", *mutate(data, rng)) for ext, data in sorted(originals.items()) for i in range(per_item)]


def test_the_corpus_is_deterministic_and_mutated():
    originals = {"a": bytes(range(256)) * 40, "b": os.urandom(5000)}
    one, two = corpus(originals, 50, SEED), corpus(originals, 50, SEED)
    assert one == two and len(one) == 100
    assert Counter(k for _, k, _ in one).keys() == {"flip", "truncate", "duplicate", "zero"}
    assert all(data != originals[name[0]] for name, _, data in one)


def _decode_processes(pid: int) -> set[int]:
    """Live spawned children of ``pid`` other than vLLM's: the decode workers (multiprocessing's
    resource tracker is no spawned child)."""
    out = set()
    for child in psutil.Process(pid).children():
        try:
            if (child.status() != psutil.STATUS_ZOMBIE and "VLLM" not in child.name()
                    and any("spawn_main" in part for part in child.cmdline())):
                out.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return out


# ---- the whole corpus through the decode service (worker processes, no engine) --------------------


def test_corrupted_clips_through_the_decode_service(tmp_path):
    originals = _clips(tmp_path)
    cases = corpus(originals, PER_FORMAT, SEED)
    assert len(cases) >= 300
    images = corpus(_images(), 12, SEED + 1)
    before = _decode_processes(os.getpid())

    async def main():
        pool = DecodePool(2)
        await pool.start()
        service = VideoService(pool, FrameCache(1 << 20), DecodeLimits(max_duration_s=600), decode_timeout_s=20)
        gate = asyncio.Semaphore(2)

        async def one(i: int, data: bytes, image: bool):
            path = tmp_path / f"case-{i}"
            path.write_bytes(data)
            async with gate:
                try:
                    if image:
                        return "ok", await service.load_image(str(path))
                    res = await service.sample(str(path), hashlib.sha256(data).hexdigest(), FrameSampling(4),
                                               default_frames=4, max_frames=8, shortest_edge=None)
                    return "ok", res.video
                except MediaError as e:
                    return e.code, e.status
                except Exception as e:  # noqa: BLE001 - an unexpected error is the finding
                    return "unexpected", repr(e)
                finally:
                    path.unlink()

        try:
            results = await asyncio.gather(*[one(i, d, False) for i, (_, _, d) in enumerate(cases)],
                                           *[one(-i - 1, d, True) for i, (_, _, d) in enumerate(images)])
            workers = len(_decode_processes(os.getpid()) - before)
            good = await service.sample(str(tmp_path / "c.mp4"), "good", FrameSampling(4), default_frames=4,
                                        max_frames=8, shortest_edge=None)
            return results, workers, good, pool.restarts
        finally:
            await pool.close()

    results, workers, good, restarts = asyncio.run(main())
    outcomes = Counter(code for code, _ in results)
    bad = [(name, kind, r) for (name, kind, _), r in zip(cases + images, results, strict=True)
           if r[0] not in MEDIA_CODES | {"ok"} or (r[0] != "ok" and r[1] not in (400, 413))]
    assert not bad, bad[:5]
    assert outcomes["ok"] and sum(outcomes[c] for c in MEDIA_CODES) > 50, outcomes  # both outcomes really occur
    assert all(isinstance(v, (SampledVideo, np.ndarray)) for code, v in results if code == "ok")
    assert workers == 2  # replaced workers were reaped, none leaked
    assert [read_index(f) for f in good.video.frames] == [3, 9, 15, 21]  # the pool still decodes correctly
    assert _decode_processes(os.getpid()) - before == set()  # every worker is gone after close()
    print(f"decode service: {dict(outcomes)}, worker restarts {restarts}")


# ---- through a real gateway ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(media_origin):
    folder = media_origin.folder("fuzz")
    d = folder.root
    originals = _clips(d)
    recorder = RecordingServer()
    secret = d / "secret.ts"  # a server-side file that playlists name
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(d / "c.mp4"), "-c", "copy", "-f", "mpegts",
                    str(secret)], check=True)
    for name, text in playlists(recorder.url, str(secret)).items():
        (d / name).write_text(text)
    yield d, originals, folder, recorder
    recorder.close()


def _part(kind: str, url: str) -> dict:
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": url}}
    return {"type": "video_url", "video_url": {"url": url, "num_frames": 2}}


def _chat(gw, url: str, kind: str = "video") -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "user", "content": [_part(kind, url), {"type": "text", "text": "What is it?"}]}]}
    return httpx.post(f"{gw.base_url}/v1/chat/completions", json=body, headers=gw.headers, timeout=120)


def _upload(gw, name: str, data: bytes) -> str:
    r = httpx.post(f"{gw.base_url}/v1/files", headers=gw.headers, files={"file": (name, data)},
                   data={"purpose": "vision"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _deliver(gw, media, root: Path, how: str, name: str, data: bytes) -> str:
    if how == "url":
        (root / name).write_bytes(data)
        return media.url(name)
    if how == "data":
        return "data:application/octet-stream;base64," + base64.b64encode(data).decode()
    return _upload(gw, name, data)


def _media_error(r: httpx.Response) -> str | None:
    """None for a 200 completion; the code of a 4xx media error; raises on anything else."""
    if r.status_code == 200:
        assert r.json()["object"] == "chat.completion", r.text
        return None
    assert r.status_code in (400, 413), r.text
    code = r.json()["error"]["code"]
    assert code in MEDIA_CODES, r.text
    return code


def _leftovers(gw) -> list[str]:
    spool = gw.files_dir / ".spool"
    return [str(p) for p in spool.iterdir()] + [str(p) for p in gw.files_dir.glob(".upload-*")]


@pytest.mark.engine
def test_corrupted_media_over_http(gateway, served):
    """The whole clip corpus (by URL, data: URL and upload, in turn) and mutated images."""
    root, originals, media, _ = served
    workers = _decode_processes(gateway.proc.pid)
    assert len(workers) == 2
    cases = corpus(originals, PER_FORMAT, SEED)
    assert len(cases) >= 300
    images = corpus(_images(), 12, SEED + 1)[::2]  # includes a GIF whose damaged header claims 4.9 Gpx
    outcomes: Counter = Counter()
    for i, (name, _, data) in enumerate(cases):
        how = ("url", "data", "upload")[i % 3]
        outcomes[_media_error(_chat(gateway, _deliver(gateway, media, root, how, f"m-{name}", data)))] += 1
    for i, (name, _, data) in enumerate(images):
        url = _deliver(gateway, media, root, ("url", "data")[i % 2], f"i-{name}", data)
        outcomes[_media_error(_chat(gateway, url, "image"))] += 1
    assert outcomes[None] and len(outcomes) > 2, outcomes  # successes and several kinds of refusal
    print(f"over HTTP ({len(cases)} clips, {len(images)} images): {dict(outcomes)}")
    # still healthy: a good clip is answered, and its frames are the right ones
    r = _chat(gateway, media.url("c.mp4"))
    assert r.status_code == 200 and r.json()["framewise"]["media"][0]["timestamps"] == pytest.approx(
        [6 / 12, 18 / 12], abs=1e-3)
    assert _leftovers(gateway) == []
    assert len(_decode_processes(gateway.proc.pid)) == 2  # replaced workers reaped, none leaked


@pytest.mark.engine
def test_playlists_over_http_are_refused_without_a_fetch(gateway, served):
    root, _, media, recorder = served
    names = list(playlists(recorder.url, "x"))
    for name in names:
        text = (root / name).read_bytes()
        urls = [media.url(name), f"file://{root}/{name}",  # keeps its .m3u8/.mpd/.ffconcat name
                "data:application/vnd.apple.mpegurl;base64," + base64.b64encode(text).decode(),
                _upload(gateway, "playlist.m3u8", text)]
        for url in urls:
            r = _chat(gateway, url)
            assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_video"), (name, url[:60], r.text)
    assert recorder.hits == []
    # an uploaded concat list naming another upload by its stored name (FFmpeg's safe mode allows a
    # plain relative name): FFmpeg alone would read the other file; the allow-list refuses the list
    clip = (root / "c.mp4").read_bytes()
    clip_id = _upload(gateway, "clip.mp4", clip)
    stored = hashlib.sha256(clip).hexdigest()  # the blob's name, next to the list's own blob (server/media/files.py)
    list_id = _upload(gateway, "list.m3u8", f"ffconcat version 1.0\nfile '{stored}'\n".encode())
    assert (gateway.files_dir / "blobs" / stored).exists()
    r = _chat(gateway, list_id)
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_video"), r.text
    assert _chat(gateway, clip_id).status_code == 200
    assert _leftovers(gateway) == []


@pytest.mark.engine
def test_refused_address_ranges_over_http(gateway):
    for label, ip in REFUSED.items():
        host = f"[{ip}]" if ":" in ip else ip
        r = _chat(gateway, f"http://{host}/v.mp4")
        assert (r.status_code, r.json()["error"]["code"]) == (400, "url_not_allowed"), (label, r.text)


@pytest.mark.engine
def test_non_ascii_bearer_tokens_are_401(gateway):
    url = f"{gateway.base_url}/v1/models"
    for value in ("Bearer ключ".encode(), "Bearer clé".encode("latin-1"), b"Bearer \xff", b"Bearer " + KEY.encode()
                  + b"\xc3\xa9"):
        r = httpx.get(url, headers={"Authorization": value}, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (value, r.text)
    assert httpx.get(url, headers=gateway.headers, timeout=10).status_code == 200
