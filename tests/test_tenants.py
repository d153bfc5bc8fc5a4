"""Tenants (issue 22, items 1, 2, 4, 5): two customers of one deployment, through the openai SDK.

The real application in-process (the stand-in engine of tests/live_support.py, its own job worker), on the
in-process queue and on Redis (a private ``redis-server``). Tenants ``alice`` and ``bob`` (and ``root``, an
admin) each with their key. Every cross-tenant operation -- a file's get, delete and use in a chat or a job; a
job's get, events, cancel; listings; an ``Idempotency-Key`` reused -- is a 404 (or an empty listing, or a new
job) and leaves the owner's data as it was. The same bytes uploaded by both are two files with two ids, and
deleting one leaves the other readable (and its bytes on disk). Logs carry the tenant's name and metrics a
bounded ``tenant`` label, never a key; ``serve`` warns when it binds a non-loopback address without keys.
"""

from __future__ import annotations

import io
import json
import logging

import openai
import pytest
from fastapi.testclient import TestClient

from framewise.server.app import create_app
from framewise.server.cli import warn_if_open
from framewise.server.logs import JsonFormatter
from framewise.server.settings import Settings
from framewise.server.video.synth import write_clip
from tests.live_support import MODEL, StandInEngine, wait_for
from tests.redis_support import RedisServer

KEYS = {"alice": "sk-alice-0123", "bob": "sk-bob-4567", "root": "sk-root-89ab"}
HI = [{"role": "user", "content": "hi"}]


def video(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url, "num_frames": 2}},
                                         {"type": "text", "text": "What happens?"}]}]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_clip(str(path), frames=12, fps=12)
    return path.read_bytes()


@pytest.fixture(params=["memory", "redis"])
def gateway(request, tc_llava_dir, tmp_path):
    """(TestClient, services, {tenant: openai.OpenAI})."""
    redis_server = None
    extra = {}
    if request.param == "redis":
        (tmp_path / "redis").mkdir()
        redis_server = RedisServer(tmp_path / "redis")
        extra = {"redis_url": redis_server.url, "consume": True}
    settings = Settings(model=str(tc_llava_dir), served_model_name=MODEL, decode_workers=1,
                        api_keys=[f"{name}:{key}" for name, key in KEYS.items()], admin_tenants=["root"],
                        files_dir=str(tmp_path / "files"), job_heartbeat_s=0.2, **extra)
    app = create_app(settings, engine=StandInEngine(tc_llava_dir))
    try:
        with TestClient(app) as client:
            sdks = {name: openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client,
                                        max_retries=0) for name, key in KEYS.items()}
            yield client, app.state.services, sdks
    finally:
        if redis_server is not None:
            redis_server.close()


def not_found(call, code: str) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        call()
    assert e.value.status_code == 404 and e.value.body["code"] == code, e.value.body


def chat(sdk, url: str):
    return sdk.chat.completions.create(model=MODEL, messages=video(url), max_tokens=2)


def job(sdk, messages, key: str | None = None) -> dict:
    options = {"headers": {"Idempotency-Key": key}} if key else {}
    return sdk.post("/jobs", cast_to=object, body={"model": MODEL, "max_tokens": 2, "messages": messages},
                    options=options)


def finished(sdk, job_id: str) -> dict:
    return wait_for(lambda: (j := sdk.get(f"/jobs/{job_id}", cast_to=object))["status"] in
                    ("succeeded", "failed", "cancelled") and j, 60, f"job {job_id} to finish")


def test_files_are_owned_and_invisible_to_other_tenants(gateway, clip):
    client, services, sdk = gateway
    a, b, root = sdk["alice"], sdk["bob"], sdk["root"]
    fa = a.files.create(file=("alice.mp4", clip), purpose="vision")
    assert fa.id.startswith("file-") and fa.filename == "alice.mp4" and fa.expires_at > fa.created_at
    # bob: the id names nothing he can see, use or delete
    not_found(lambda: b.files.retrieve(fa.id), "file_not_found")
    not_found(lambda: b.files.delete(fa.id), "file_not_found")
    not_found(lambda: chat(b, fa.id), "file_not_found")
    assert fa.id not in [f.id for f in b.files.list()]
    gone = finished(b, job(b, video(fa.id))["id"])  # a job runs with its owner's identity
    assert gone["status"] == "failed" and gone["error"]["code"] == "file_not_found"
    # the same bytes uploaded by bob: another file, another id; alice's filename untouched
    fb = b.files.create(file=("bob.mp4", clip), purpose="vision")
    assert fb.id != fa.id and fb.bytes == fa.bytes
    assert a.files.retrieve(fa.id).filename == "alice.mp4"
    assert [f.id for f in a.files.list()] == [fa.id] and [f.id for f in b.files.list()] == [fb.id]
    assert {fa.id, fb.id} <= {f.id for f in root.files.list()}  # an admin lists everyone's
    assert root.files.retrieve(fa.id).filename == "alice.mp4"
    # bob deleting his copy leaves alice's file and its bytes
    assert b.files.delete(fb.id).deleted
    not_found(lambda: b.files.retrieve(fb.id), "file_not_found")
    assert a.files.retrieve(fa.id).bytes == len(clip)
    r = chat(a, fa.id)
    assert r.choices[0].message.content and r.model_extra["framewise"]["media"][0]["frames"] == 2
    done = finished(a, job(a, video(fa.id))["id"])
    assert done["status"] == "succeeded", done
    blobs = list(services.files.blobs.iterdir())
    assert [p.read_bytes() == clip for p in blobs] == [True]  # one copy on disk, still there
    # and when its last owner deletes it, the bytes go
    assert a.files.delete(fa.id).deleted
    not_found(lambda: a.files.retrieve(fa.id), "file_not_found")
    assert list(services.files.blobs.iterdir()) == []


def test_jobs_events_and_idempotency_keys_are_per_tenant(gateway):
    client, services, sdk = gateway
    a, b, root = sdk["alice"], sdk["bob"], sdk["root"]
    ja = job(a, HI, key="order-1")
    done = finished(a, ja["id"])
    assert done["status"] == "succeeded" and done["result"]["choices"]
    # bob: get, events, cancel -> 404; his listing does not show it
    not_found(lambda: b.get(f"/jobs/{ja['id']}", cast_to=object), "job_not_found")
    not_found(lambda: b.get(f"/jobs/{ja['id']}/events", cast_to=object), "job_not_found")
    not_found(lambda: b.delete(f"/jobs/{ja['id']}", cast_to=object), "job_not_found")
    assert b.get("/jobs", cast_to=object)["data"] == []
    # bob reusing alice's Idempotency-Key gets a job of his own, not hers (nor her result)
    jb = job(b, HI, key="order-1")
    assert jb["id"] != ja["id"] and jb["status"] == "queued" and jb["result"] is None
    assert job(b, HI, key="order-1")["id"] == jb["id"]  # his key still works for him
    assert job(a, HI, key="order-1")["id"] == ja["id"]  # and hers for her
    finished(b, jb["id"])
    # alice's job as it was; each lists only their own; the admin sees both
    again = a.get(f"/jobs/{ja['id']}", cast_to=object)
    assert again["status"] == "succeeded" and again["result"] == done["result"]
    assert [j["id"] for j in a.get("/jobs", cast_to=object)["data"]] == [ja["id"]]
    assert [j["id"] for j in b.get("/jobs", cast_to=object)["data"]] == [jb["id"]]
    assert {ja["id"], jb["id"]} <= {j["id"] for j in root.get("/jobs", cast_to=object)["data"]}
    assert root.get(f"/jobs/{ja['id']}", cast_to=object)["id"] == ja["id"]
    # the owner's events stream is whole
    events = client.get(f"/v1/jobs/{ja['id']}/events", headers={"Authorization": f"Bearer {KEYS['alice']}"})
    stages = [json.loads(line[6:])["stage"] for line in events.text.splitlines() if line.startswith("data: ")]
    assert stages[0] == "queued" and stages[-1] == "done"
    # bob cannot cancel alice's running job; she can
    services.engine.steps, services.engine.step_s = 100, 0.05
    try:
        running = job(a, HI)
        wait_for(lambda: a.get(f"/jobs/{running['id']}", cast_to=object)["status"] == "running", 30, "a running job")
        not_found(lambda: b.delete(f"/jobs/{running['id']}", cast_to=object), "job_not_found")
        assert a.get(f"/jobs/{running['id']}", cast_to=object)["status"] == "running"
        assert a.delete(f"/jobs/{running['id']}", cast_to=object)["status"] == "cancelled"
    finally:
        services.engine.steps, services.engine.step_s = 3, 0.0


def test_logs_and_metrics_name_the_tenant_never_the_key(gateway):
    client, services, sdk = gateway
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())  # formats as it is logged: in the request's context
    access = logging.getLogger("framewise.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        sdk["alice"].models.list()
        sdk["bob"].models.list()
        bad = openai.OpenAI(base_url="http://testserver/v1", api_key="sk-nobody", http_client=client, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert {line.get("tenant") for line in lines if line.get("route") == "/v1/models"} >= {"alice", "bob"}
    text = buf.getvalue() + client.get("/metrics").text
    assert not [k for k in KEYS.values() if k in text] and "sk-nobody" not in text
    metrics = client.get("/metrics").text
    assert 'framewise_tenant_requests_total{status="200",tenant="alice"}' in metrics
    assert 'tenant="sk-' not in metrics
    assert services.tenants.label("someone-else") == "other"  # only configured names become labels


def test_a_bare_key_is_tenant_default_and_no_keys_is_development_mode(tc_llava_dir, tmp_path, clip):
    for keys in (["sk-bare"], []):
        settings = Settings(model=str(tc_llava_dir), served_model_name=MODEL, decode_workers=1, api_keys=keys,
                            files_dir=str(tmp_path / f"files-{len(keys)}"))
        app = create_app(settings, engine=StandInEngine(tc_llava_dir))
        with TestClient(app, headers={"Authorization": "Bearer sk-bare"}) as client:
            up = client.post("/v1/files", files={"file": ("c.mp4", clip)}, data={"purpose": "vision"})
            assert up.status_code == 200, up.text
            assert [o.owner for o in app.state.services.files.records()] == ["default"]
            j = client.post("/v1/jobs", json={"model": MODEL, "messages": HI, "max_tokens": 2}).json()
            assert wait_for(lambda c=client, i=j["id"]: c.get(f"/v1/jobs/{i}").json()["status"] == "succeeded",
                            30, "the job")
            assert [x["id"] for x in client.get("/v1/jobs").json()["data"]] == [j["id"]]
            assert client.get("/v1/files").json()["data"][0]["id"] == up.json()["id"]
            wrong = client.get("/v1/models", headers={"Authorization": "Bearer sk-other"})
            assert wrong.status_code == (401 if keys else 200)


def test_serve_warns_loudly_without_keys_on_a_public_address(capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="framewise.security"):
        assert warn_if_open("0.0.0.0", keys=False)
    err = capsys.readouterr().err
    assert "WARNING" in err and "WITHOUT API KEYS" in err and "0.0.0.0" in err
    assert any(r.levelno == logging.WARNING and "WITHOUT API KEYS" in r.getMessage() for r in caplog.records)
    for host, keys in (("127.0.0.1", False), ("::1", False), ("localhost", False), ("0.0.0.0", True),
                       ("10.1.2.3", True)):
        assert not warn_if_open(host, keys)
    assert warn_if_open("10.1.2.3", keys=False) and warn_if_open("gateway.example", keys=False)
    capsys.readouterr()


def test_file_ids_are_opaque_and_per_owner(tmp_path):
    import hashlib

    from framewise.server.media.files import FileStore

    store = FileStore(str(tmp_path), 1 << 20)
    sha = hashlib.sha256(b"x").hexdigest()
    a, b = store.id_for("alice", sha), store.id_for("bob", sha)
    assert a != b and sha[:24] not in (a, b)  # not the content's hash: no oracle from known bytes
    assert FileStore(str(tmp_path), 1 << 20).id_for("alice", sha) == a  # every replica on the directory agrees
    assert FileStore(str(tmp_path / "other"), 1 << 20).id_for("alice", sha) != a  # another deployment: another key
