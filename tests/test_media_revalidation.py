"""A video URL asked about again is revalidated (conditional GET), not downloaded again, when the
server gave a strong validator and its frames are still cached; changed bytes are never served
from the cache. The real app in-process with the scripted engine of ``test_pipeline``, and a real
loopback HTTP server that records every request and honours ``If-Modified-Since`` / ``If-None-Match``.
"""

from __future__ import annotations

import email.utils
import os
import shutil
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from framewise.server.app import create_app
from framewise.server.media.fetch import strong_validators
from framewise.server.settings import Settings
from framewise.server.video.synth import write_clip
from tests.test_pipeline import KEY, MODEL, ScriptedEngine, video_message


class ValidatingServer:
    """Static files with ``Last-Modified`` (Python's handler: 304 on ``If-Modified-Since``), or,
    with ``etags``, a strong ``ETag`` per file (304 on a matching ``If-None-Match``) or a weak one."""

    def __init__(self, root: Path):
        self.root, self.etags, self.requests = root, {}, []
        outer = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(outer.root), **kw)

            def log_message(self, *a):
                pass

            def send_response(self, code, message=None):
                outer.requests[-1]["status"] = code
                super().send_response(code, message)

            def do_GET(self):
                name = self.path.lstrip("/")
                outer.requests.append({"path": name, "ims": self.headers.get("If-Modified-Since"),
                                       "inm": self.headers.get("If-None-Match")})
                etag = outer.etags.get(name)
                if etag is None:
                    return super().do_GET()
                if self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.end_headers()
                    return None
                body = (outer.root / name).read_bytes()
                self.send_response(200)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _clip(path: Path, frames: int, age_s: float) -> None:
    write_clip(str(path), frames=frames, fps=12)
    t = time.time() - age_s
    os.utime(path, (t, t))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    _clip(root / "a.mp4", 24, age_s=60)
    shutil.copy(root / "a.mp4", root / "etag.mp4")
    shutil.copy(root / "a.mp4", root / "weak.mp4")
    server = ValidatingServer(root)
    yield server
    server.close()


@pytest.fixture(scope="module")
def app(tc_llava_dir, site, tmp_path_factory):
    settings = Settings(model=str(tc_llava_dir), served_model_name=MODEL, api_keys=[KEY], decode_workers=1,
                        files_dir=str(tmp_path_factory.mktemp("files")),
                        allowed_media_hosts=[f"127.0.0.1:{site.port}"])
    application = create_app(settings, engine=ScriptedEngine(tc_llava_dir))
    with TestClient(application, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client, application.state.services


def ask(client, url: str, **sampling) -> dict:
    r = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 3,
                                                   "messages": video_message(url, **sampling)})
    assert r.status_code == 200, r.text
    return r.json()["framewise"]["media"][0]


def counters(services) -> tuple[float, float]:
    reg = services.metrics.registry
    return (reg.get_sample_value("framewise_fetch_bytes_total") or 0.0,
            reg.get_sample_value("framewise_fetch_not_modified_total") or 0.0)


def test_strong_validators_only():
    now = time.time()
    date = email.utils.formatdate(now, usegmt=True)
    assert strong_validators({"ETag": '"v1"'}, "s", 1).etag == '"v1"'
    assert strong_validators({"ETag": 'W/"v1"'}, "s", 1) is None  # weak: equivalent, not byte-identical
    old = email.utils.formatdate(now - 5, usegmt=True)
    assert strong_validators({"Last-Modified": old, "Date": date}, "s", 1).last_modified == old
    # modified within the second the response was made: the same date could stand for other bytes
    assert strong_validators({"Last-Modified": date, "Date": date}, "s", 1) is None
    assert strong_validators({"Last-Modified": old}, "s", 1) is None  # no Date to judge it by
    assert strong_validators({"ETag": '"v1"', "Cache-Control": "private, no-store"}, "s", 1) is None
    assert strong_validators({}, "s", 1) is None


def test_same_url_again_is_revalidated_not_downloaded(app, site, tmp_path):
    client, services = app
    url = site.url("a.mp4")
    size = (site.root / "a.mp4").stat().st_size
    bytes0, nm0 = counters(services)

    first = ask(client, url)
    assert not first["cache_hit"] and site.requests[-1] == {"path": "a.mp4", "ims": None, "inm": None,
                                                            "status": 200}
    assert counters(services) == (bytes0 + size, nm0)

    again = ask(client, url)  # conditional GET -> 304 -> the cached frames
    assert site.requests[-1]["ims"] is not None and site.requests[-1]["status"] == 304
    assert again["cache_hit"] and again["timestamps"] == first["timestamps"]
    assert counters(services) == (bytes0 + size, nm0 + 1)

    other = ask(client, url, num_frames=2)  # frames for this sampling not cached: a plain download
    assert site.requests[-1]["ims"] is None and site.requests[-1]["status"] == 200
    assert not other["cache_hit"] and len(other["timestamps"]) == 2

    # new bytes at the same URL (a later modification time): the conditional GET gets them, and
    # the frames are those of the new video, not the cached ones
    _clip(site.root / "a.mp4", 48, age_s=30)
    changed = ask(client, url)
    assert site.requests[-1]["ims"] is not None and site.requests[-1]["status"] == 200
    assert not changed["cache_hit"] and changed["duration_s"] == pytest.approx(4.0, abs=0.1)
    assert first["duration_s"] == pytest.approx(2.0, abs=0.1)
    assert counters(services)[1] == nm0 + 1


def test_strong_etag_is_revalidated_weak_is_not(app, site):
    client, services = app
    site.etags["etag.mp4"] = '"clip-v1"'
    ask(client, site.url("etag.mp4"))
    again = ask(client, site.url("etag.mp4"))
    assert site.requests[-1]["inm"] == '"clip-v1"' and site.requests[-1]["status"] == 304 and again["cache_hit"]

    site.etags["weak.mp4"] = 'W/"clip-v1"'  # no Last-Modified either: nothing strong to revalidate with
    for _ in range(2):
        hit = ask(client, site.url("weak.mp4"))
        assert site.requests[-1]["inm"] is None and site.requests[-1]["status"] == 200
    assert hit["cache_hit"]  # same bytes downloaded again: same content hash, decode still skipped


def test_frames_evicted_after_the_304_are_decoded_from_a_download(app, site, monkeypatch):
    client, services = app
    url = site.url("a.mp4")
    ask(client, url, num_frames=3)
    services.video.cache.__init__(services.video.cache.max_bytes)  # empty the frame cache
    monkeypatch.setattr(services.video, "cached", lambda *a, **kw: True)  # ... after the check said "cached"
    media = ask(client, url, num_frames=3)
    statuses = [r["status"] for r in site.requests[-2:]]
    assert statuses == [304, 200] and not media["cache_hit"] and len(media["timestamps"]) == 3
