"""OpenAI fields Framewise cannot honour are refused, never silently dropped (issue 23, item 5): 400
``unsupported_parameter`` naming the field, before any media is fetched or any job is queued; their no-op forms
are accepted. ``logit_bias`` is honoured (tests/test_gateway.py runs it through the engine); its shape is
checked here. The real app in-process, with a stand-in engine that records what reaches it."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from framewise.server.app import create_app
from framewise.server.settings import Settings
from tests.gateway_support import RecordingServer

MODEL, KEY = "stub", "sk-fields"


class StubEngine:
    ready = True
    dead = False

    def __init__(self):
        self.generated = []

    async def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def generate(self, prompt, params, request_id):
        self.generated.append(params)
        raise AssertionError("a refused request reached the engine")


@pytest.fixture(scope="module")
def origin():
    server = RecordingServer({"clip.mp4": b"not fetched"})
    yield server
    server.close()


@pytest.fixture(scope="module")
def gateway(origin, tmp_path_factory):
    engine = StubEngine()
    settings = Settings(model="stub-model", served_model_name=MODEL, api_keys=[KEY], decode_workers=1,
                        files_dir=str(tmp_path_factory.mktemp("files")),
                        allowed_media_hosts=[f"127.0.0.1:{origin.port}"])
    app = create_app(settings, engine=engine)
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client, engine, app.state.services


def body(origin, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"{origin.url}/clip.mp4"}},
        {"type": "text", "text": "what happens?"}]}], **fields}


REFUSED = [
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("tool_choice", "auto"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("functions", [{"name": "f", "parameters": {"type": "object"}}]),
    ("function_call", "auto"),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("prediction", {"type": "content", "content": "x"}),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/jobs"])
@pytest.mark.parametrize(("field", "value"), REFUSED, ids=[f"{f}-{i}" for i, (f, _) in enumerate(REFUSED)])
def test_unimplemented_fields_are_refused_naming_the_field(gateway, origin, path, field, value):
    client, engine, services = gateway
    hits = len(origin.hits)
    r = client.post(path, json=body(origin, **{field: value}))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"], error["type"]) == ("unsupported_parameter", field, "invalid_request_error")
    assert field in error["message"]
    assert len(origin.hits) == hits and not engine.generated  # refused before the fetch and the engine
    if path == "/v1/jobs":
        assert client.get("/v1/jobs").json()["data"] == []  # and no job was queued


NO_OPS = [("response_format", {"type": "text"}), ("tools", []), ("tool_choice", "none"), ("functions", []),
          ("function_call", "none"), ("tools", None)]


@pytest.mark.parametrize(("field", "value"), NO_OPS)
def test_no_op_forms_are_accepted(gateway, origin, field, value):
    client, _, _ = gateway
    r = client.post("/v1/jobs", json=body(origin, **{field: value}))
    assert r.status_code == 202, r.text
    assert client.delete(f"/v1/jobs/{r.json()['id']}").status_code == 200


@pytest.mark.parametrize("bias", [{"abc": 5}, {"-1": 5}, {"12": 101}, {"12": -100.5}, {"12": float("nan")}])
def test_logit_bias_shape_is_validated(gateway, origin, bias):
    client, _, _ = gateway
    r = client.post("/v1/chat/completions", content=__import__("json").dumps(body(origin, logit_bias=bias)),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"].startswith("logit_bias")


def test_logit_bias_reaches_the_sampler():
    from framewise.server.chat.pipeline import sampling_params
    from framewise.server.schemas import ChatCompletionRequest

    req = ChatCompletionRequest.model_validate({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                "logit_bias": {"12": 100, "7": -100}})
    assert sampling_params(req).logit_bias == {12: 100.0, 7: -100.0}
    assert ChatCompletionRequest.model_validate({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
                                                ).logit_bias is None
