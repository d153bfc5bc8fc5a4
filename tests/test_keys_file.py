"""The API keys file (issue 22, item 1): ``NAME KEY`` / ``NAME sha256:<hex>`` lines with limit overrides.

Hashed keys are accepted (the plaintext is never in the file), several keys of one tenant all work (rotation),
and the file is re-read without a restart: when it changes (looked at on requests, at most once a second) and
on ``SIGHUP`` (a real server process: ``framewise serve``'s, on the stand-in engine). A file that does not
parse is refused at startup and, later, leaves the keys in force as they were.
"""

from __future__ import annotations

import hashlib
import os
import signal
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient

from framewise.server.app import create_app
from framewise.server.settings import Settings
from framewise.server.tenants import DEFAULT, MB, KeyFileError, KeyRing, parse_keys_file
from tests.live_support import MODEL, LiveGateway, StandInEngine, wait_for


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def ring(path=None, keys=()) -> KeyRing:
    return KeyRing(Settings(model="m", api_keys=list(keys), api_keys_file=str(path) if path else None))


def test_lines_comments_hashes_and_overrides(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"""
# tenants of this deployment
alice {sha("sk-alice-new")}   rpm=600 concurrent=8 jobs=100 storage_mb=2048 retention_h=168
alice sk-alice-old             # rotation: the old key still works until this line goes
ops   {sha("sk-ops")} role=admin
""")
    r = ring(path)
    new, old, ops = (r.authenticate(k.encode()) for k in ("sk-alice-new", "sk-alice-old", "sk-ops"))
    assert new is old and new.name == "alice" and new.role == "user"
    lim = new.limits
    assert (lim.rpm, lim.concurrent, lim.jobs, lim.storage_bytes, lim.retention_s) == (600, 8, 100, 2048 * MB,
                                                                                       168 * 3600)
    assert ops.admin and ops.scope is None and new.scope == "alice"
    assert ops.limits.rpm == Settings(model="m").tenant_rpm  # no override: the defaults
    for wrong in (b"sk-alice", b"", sha("sk-alice-new").encode(), "sk-ops".encode("utf-16")):
        assert r.authenticate(wrong) is None  # the hash itself is no key
    assert r.authenticate(None) is None
    assert r.names == {"alice", "ops"} and r.label("alice") == "alice" and r.label("bob") == "other"


@pytest.mark.parametrize("text", ["alice", "al/ice sk-1", "alice sha256:abc", "alice sk-1 rpm=lots",
                                  "alice sk-1 color=red", "alice sk-1 role=root", "alice sk-1 rpm", "bob k jobs=-1"])
def test_a_bad_line_is_refused(text):
    with pytest.raises(KeyFileError):
        parse_keys_file(text)


def test_command_line_keys_and_the_bare_key():
    r = KeyRing(SimpleNamespace(api_keys=["sk-bare", "alice:sk-a", "bob:sk-b:with:colons"], admin_tenants=["bob"]))
    assert r.authenticate(b"sk-bare").name == DEFAULT
    assert r.authenticate(b"sk-a").name == "alice" and r.authenticate(b"sk-b:with:colons").admin
    assert ring(keys=[]).authenticate(None).name == DEFAULT and not ring(keys=[]).enabled  # development mode


def test_reload_when_the_file_changes_and_a_broken_file_keeps_the_old_keys(tc_llava_dir, tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"alice {sha('sk-alice-1')}\n")
    settings = Settings(model=str(tc_llava_dir), served_model_name=MODEL, decode_workers=1,
                        api_keys_file=str(path), files_dir=str(tmp_path / "files"))
    app = create_app(settings, engine=StandInEngine(tc_llava_dir))

    def status(key: str) -> int:
        return client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code

    with TestClient(app) as client:
        assert status("sk-alice-1") == 200 and status("sk-alice-2") == 401
        # rotation: a second key for alice, no restart
        path.write_text(f"alice {sha('sk-alice-1')}\nalice {sha('sk-alice-2')}\n")
        wait_for(lambda: status("sk-alice-2") == 200, 15, "the new key to be accepted")
        assert status("sk-alice-1") == 200
        # the old key retired
        path.write_text(f"alice {sha('sk-alice-2')}\n")
        wait_for(lambda: status("sk-alice-1") == 401, 15, "the old key to be refused")
        assert status("sk-alice-2") == 200
        # a file that does not parse: the keys in force stay
        keys = app.state.services.tenants
        loads = keys.reloads
        path.write_text("alice\n")
        wait_for(lambda: status("x") == 401 and keys._stamp == keys._stat(), 15, "the broken file to be looked at")
        assert keys.reloads == loads and status("sk-alice-2") == 200
    # at startup it is an error
    with pytest.raises(KeyFileError):
        create_app(settings, engine=StandInEngine(tc_llava_dir))


def test_sighup_reloads_the_keys_file(tc_llava_dir, tmp_path):
    """The new file has the same size and mtime as the old (the change watch cannot see it): SIGHUP does."""
    path = tmp_path / "keys"
    path.write_text(f"alice {sha('sk-alice-1')}\n")
    stamp = os.stat(path)
    gw = LiveGateway(tmp_path, tc_llava_dir, api_keys=[], api_keys_file=str(path))
    try:
        def status(key: str) -> int:
            return httpx.get(gw.url("/v1/models"), headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code

        assert status("sk-alice-1") == 200
        with open(path, "r+") as f:  # in place: same inode, same size
            f.write(f"alice {sha('sk-alice-2')}\n")
        os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        assert os.stat(path).st_mtime_ns == stamp.st_mtime_ns and os.stat(path).st_size == stamp.st_size
        assert status("sk-alice-2") == 401 and status("sk-alice-1") == 200  # the watch sees no change
        os.kill(gw.proc.pid, signal.SIGHUP)
        wait_for(lambda: status("sk-alice-2") == 200, 15, "SIGHUP to reload the keys")
        assert status("sk-alice-1") == 401
        assert gw.proc.poll() is None  # SIGHUP did not end the server
    finally:
        gw.close()


def test_a_file_override_is_the_tenants_limit(tc_llava_dir, tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"alice {sha('sk-a')} rpm=2\nbob {sha('sk-b')}\n")
    settings = Settings(model=str(tc_llava_dir), served_model_name=MODEL, decode_workers=1, api_keys_file=str(path),
                        files_dir=str(tmp_path / "files"))
    with TestClient(create_app(settings, engine=StandInEngine(tc_llava_dir))) as client:
        got = [client.get("/v1/models", headers={"Authorization": "Bearer sk-a"}).status_code for _ in range(3)]
        assert got == [200, 200, 429]
        assert [client.get("/v1/models", headers={"Authorization": "Bearer sk-b"}).status_code
                for _ in range(3)] == [200] * 3


def test_every_stored_digest_is_compared_in_constant_time(monkeypatch):
    import framewise.server.tenants as tenants

    seen, real = [], tenants.hmac.compare_digest

    def spy(a, b):
        seen.append((type(a), len(a), type(b), len(b)))
        return real(a, b)

    monkeypatch.setattr(tenants.hmac, "compare_digest", spy)
    r = KeyRing(SimpleNamespace(api_keys=["a:k1", "b:k2", "c:k3"]))
    assert r.authenticate(b"k1").name == "a" and r.authenticate("ü".encode()) is None
    assert seen == [(bytes, 32, bytes, 32)] * 6  # all three digests each time: no early exit, never str
