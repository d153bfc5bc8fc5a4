"""The chat pipeline (server/chat/pipeline.py): one path for HTTP requests and jobs, the request
timeout, engine failures classified, media a chat template cannot place refused.

Part 1 runs the gateway in-process with a stand-in engine (the checkpoint's real tokenizer and chat
template; ``generate`` plays back a script) for what a real engine cannot be made to do on demand:
abort a request on its own, fail mid-generation; and for a decode waiting on a busy decode pool.
Part 2 (``engine``): the session's Redis-backed ``framewise serve`` (small ``request_timeout_s``) and its worker.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures as cf
import contextlib
import functools
import json
import logging
import time

import httpx
import openai
import psutil
import pytest
from fastapi.testclient import TestClient

from framewise.server.app import create_app
from framewise.server.engine import ModelDefaults
from framewise.server.settings import Settings
from framewise.server.video.synth import write_clip
from tests.conftest import variant_checkpoint
from tests.stack import KEY, MODEL, REQUEST_TIMEOUT_S

# the chat template llava-hf checkpoints ship (llava-1.5-7b-hf): images first, then text; any other
# part type (a video) renders nothing
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def video_message(url: str, text: str = "What happens?", **sampling) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url, **sampling}},
                                         {"type": "text", "text": text}]}]


def image_message(url: str, text: str = "What is this?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def sse_events(lines) -> tuple[list[dict], bool]:
    """The JSON events of a stream and whether it ended with [DONE]."""
    events, done = [], False
    for line in lines:
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            events.append(json.loads(line[6:]))
    return events, done


# ---- part 1: a stand-in engine ------------------------------------------------------------------


class ScriptedEngine:
    """The gateway's engine interface without vLLM: a checkpoint's real tokenizer and chat template;
    ``generate`` yields vLLM ``RequestOutput`` deltas as scripted by :attr:`finish` / :attr:`fail`."""

    def __init__(self, model_dir):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.defaults = ModelDefaults(num_frames=4, max_frames=16, shortest_edge=None, max_model_len=2048)
        self.ready = True
        self.finish, self.fail, self.steps, self.step_s = "length", None, 3, 0.0
        self.generated: list[str] = []
        self.aborted: list[str] = []

    async def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    async def generate(self, prompt: dict, params, request_id: str):
        from vllm.outputs import CompletionOutput, RequestOutput

        self.generated.append(request_id)
        for step in range(self.steps):
            await asyncio.sleep(self.step_s)
            last = step == self.steps - 1
            if last and self.fail is not None:
                raise self.fail
            outs = [CompletionOutput(index=i, text=f" t{step}", token_ids=[10 + step], cumulative_logprob=None,
                                     logprobs=None, finish_reason=self.finish if last else None)
                    for i in range(params.n)]
            yield RequestOutput(request_id, None, [1, 2, 3], None, outs, finished=last)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


@pytest.fixture(scope="module")
def llava_hf_dir(tc_llava_dir, tmp_path_factory):
    """The demo checkpoint with the chat template llava-hf ships."""
    out = variant_checkpoint(tc_llava_dir, tmp_path_factory.mktemp("ckpt") / "llava-hf-template")
    (out / "chat_template.jinja").unlink()  # a hard link to the base checkpoint's
    (out / "chat_template.jinja").write_text(LLAVA_HF_TEMPLATE)
    return out


@pytest.fixture(scope="module")
def clip_url(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_clip(str(path), frames=12, fps=12)
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def png_url() -> str:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 200, 10)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def scripted(tc_llava_dir, tmp_path_factory):
    """(client, engine, services): the real app in-process, its engine scripted."""
    engine = ScriptedEngine(tc_llava_dir)
    settings = Settings(model=str(tc_llava_dir), served_model_name=MODEL, api_keys=[KEY], decode_workers=1,
                        files_dir=str(tmp_path_factory.mktemp("files")), job_heartbeat_s=0.2)
    app = create_app(settings, engine=engine)
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client, engine, app.state.services


@pytest.fixture
def engine(scripted):
    """The scripted engine, its script and tokenizer reset after each test."""
    eng = scripted[1]
    tokenizer = eng.tokenizer
    yield eng
    eng.finish, eng.fail, eng.steps, eng.step_s, eng.tokenizer = "length", None, 3, 0.0, tokenizer


def chat(client, body: dict) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 3, **body})


def test_template_without_video_placeholder_is_refused(scripted, engine, llava_hf_dir, clip_url, png_url):
    client, _, services = scripted
    assert chat(client, {"messages": video_message(clip_url)}).status_code == 200  # the demo template places it
    from transformers import AutoTokenizer

    engine.tokenizer = AutoTokenizer.from_pretrained(llava_hf_dir)
    fetched = services.metrics.registry.get_sample_value("framewise_fetch_bytes_total")
    generated = len(engine.generated)
    r = chat(client, {"messages": video_message(clip_url)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_media_in_template"
    assert "video" in r.json()["error"]["message"]
    # refused before anything was fetched or generated
    assert services.metrics.registry.get_sample_value("framewise_fetch_bytes_total") == fetched > 0
    assert len(engine.generated) == generated
    job = client.post("/v1/jobs", json={"model": MODEL, "max_tokens": 3, "messages": video_message(clip_url)})
    final = _wait_job(client, job.json()["id"])
    assert final["status"] == "failed" and final["error"]["code"] == "unsupported_media_in_template"
    # images are what this template renders: they pass
    ok = chat(client, {"messages": image_message(png_url)})
    assert ok.status_code == 200 and ok.json()["framewise"]["media"][0]["type"] == "image"


def _wait_job(client, job_id: str, timeout: float = 60) -> dict:
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:]).get("stage") in ("done", "failed", "cancelled"):
                break
    return client.get(f"/v1/jobs/{job_id}").json()


def test_engine_abort_is_an_error_not_a_stop(scripted, engine, caplog):
    client, _, services = scripted
    engine.finish = "abort"
    with caplog.at_level(logging.INFO, logger="framewise.chat"):
        r = chat(client, {"messages": [{"role": "user", "content": "hi"}], "n": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "request_aborted"
        sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0)
        chunks = []
        with pytest.raises(openai.APIError) as e:
            for c in sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, stream=True):
                chunks.append(c)
        assert e.value.body["code"] == "request_aborted" and chunks  # tokens came, then the error event
        assert not [c for c in chunks if c.choices and c.choices[0].finish_reason]  # never "stop"
    lines = [r for r in caplog.records if r.getMessage() == "chat completion request_aborted"]
    assert len(lines) == 2 and all(r.levelno == logging.ERROR for r in lines)

    engine.finish = "error"
    r = chat(client, {"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"

    # a job meeting an engine failure is retried (not the client's fault), then dead-lettered
    engine.finish = "abort"
    job = client.post("/v1/jobs", json={"model": MODEL, "max_tokens": 3, "messages": [{"role": "user",
                                                                                        "content": "hi"}]})
    deadline = time.time() + 60
    while (final := client.get(f"/v1/jobs/{job.json()['id']}").json())["status"] not in ("failed", "succeeded"):
        assert time.time() < deadline, final
        time.sleep(0.05)
    assert final["status"] == "failed" and final["attempts"] == services.settings.job_max_attempts
    assert "request_aborted" in json.dumps(final["error"])


def test_engine_death_is_logged_as_such(scripted, engine, caplog):
    from vllm.v1.engine.exceptions import EngineDeadError

    client, _, _ = scripted
    engine.fail = EngineDeadError()
    with caplog.at_level(logging.INFO, logger="framewise.chat"):
        r = chat(client, {"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        with client.stream("POST", "/v1/chat/completions", json={"model": MODEL, "max_tokens": 3, "stream": True,
                                                                 "messages": [{"role": "user", "content": "hi"}]}) as s:
            events, done = sse_events(s.iter_lines())
    assert not done and events[-1]["error"]["code"] == "engine_dead"
    outcomes = [r.outcome for r in caplog.records if r.name == "framewise.chat" and hasattr(r, "outcome")]
    assert outcomes == ["engine_dead", "engine_dead"]  # not client_disconnected


def test_generation_past_the_deadline_is_aborted(scripted, engine):
    client, _, services = scripted
    engine.steps, engine.step_s = 50, 0.1  # 5 s of generation
    services.settings.request_timeout_s = 1.0
    try:
        start = time.monotonic()
        r = chat(client, {"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert time.monotonic() - start < 3
        assert engine.aborted and engine.aborted[-1] == engine.generated[-1]
        with client.stream("POST", "/v1/chat/completions", json={"model": MODEL, "stream": True,
                                                                 "messages": [{"role": "user", "content": "hi"}]}) as s:
            events, done = sse_events(s.iter_lines())
        assert not done and events[-1]["error"]["code"] == "timeout" and len(events) > 2
        assert engine.aborted[-1] == engine.generated[-1]
    finally:
        services.settings.request_timeout_s = 600.0


def test_a_decode_waiting_for_a_busy_pool_times_out(scripted, engine, clip_url):
    client, _, services = scripted
    services.settings.request_timeout_s = 1.0
    try:
        # the pool's only worker is busy for 4 s: a request's decode waits in the queue
        busy = client.portal.start_task_soon(functools.partial(services.pool.run, time.sleep, 4, timeout=20))
        start = time.monotonic()
        r = chat(client, {"messages": video_message(clip_url, num_frames=2)})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert time.monotonic() - start < 3.5 and not busy.done()
        busy.result(timeout=20)
    finally:
        services.settings.request_timeout_s = 600.0
    assert chat(client, {"messages": video_message(clip_url, num_frames=2)}).status_code == 200  # pool healthy


# ---- part 2: a real engine ----------------------------------------------------------------------

TIMEOUT_S = REQUEST_TIMEOUT_S
GENERATED = "vllm:generation_tokens_total"


@pytest.fixture(scope="module")
def media(media_origin):
    folder = media_origin.folder("pipeline")
    write_clip(str(folder.root / "h264.mp4"), frames=48, fps=24)
    write_clip(str(folder.root / "long.mp4"), frames=150, fps=24)  # 6.25 s: above --queue-above-s
    return folder


@pytest.fixture(scope="module")
def gateway(jobs_gateway, workers):
    """Requests time out after TIMEOUT_S; jobs (long videos too) run on the session's worker."""
    return jobs_gateway


def _post(gateway, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{gateway.base_url}/v1/chat/completions", json={"model": MODEL, **body},
                      headers=gateway.headers, timeout=timeout)


def _metric(gateway, prefix: str) -> float:
    return sum(v for k, v in gateway.metrics().items() if k.startswith(prefix))


def _comparable(completion: dict) -> dict:
    """A completion without what differs between two runs of one request: ids, times, cache hits."""
    c = json.loads(json.dumps(completion))
    for key in ("id", "created"):
        c.pop(key)
    c["framewise"].pop("job_id", None)
    for m in c["framewise"]["media"]:
        for key in ("fetch_ms", "decode_ms", "cache_hit", "frame_cache", "bytes_read"):
            m.pop(key, None)
    return c


@pytest.mark.engine
def test_http_and_job_paths_give_the_same_completion(gateway, media):
    body = {"messages": video_message(media.url("h264.mp4"), num_frames=2), "max_tokens": 6, "n": 2,
            "temperature": 1.0, "seed": 11, "logprobs": True, "top_logprobs": 2}
    http = _post(gateway, body)
    assert http.status_code == 200, http.text
    submitted = httpx.post(f"{gateway.base_url}/v1/jobs", json={"model": MODEL, **body}, headers=gateway.headers)
    with httpx.stream("GET", f"{gateway.base_url}/v1/jobs/{submitted.json()['id']}/events", headers=gateway.headers,
                      timeout=120) as r:
        stages = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    job = httpx.get(f"{gateway.base_url}/v1/jobs/{submitted.json()['id']}", headers=gateway.headers).json()
    assert job["status"] == "succeeded", job
    a, b = _comparable(http.json()), _comparable(job["result"])
    assert [c["index"] for c in a["choices"]] == [0, 1]
    assert all(len(c["logprobs"]["content"]) == len(c["logprobs"]["content"]) > 0 for c in a["choices"])
    assert all(len(t["top_logprobs"]) == 2 for c in a["choices"] for t in c["logprobs"]["content"])
    assert a == b
    assert [s["stage"] for s in stages][-1] == "done" and {"fetching", "decoding"} <= {s["stage"] for s in stages}
    assert [s["tokens"] for s in stages if s["stage"] == "generating"][-1] == a["usage"]["completion_tokens"]

    # streamed, the same tokens and logprobs arrive as deltas
    with httpx.stream("POST", f"{gateway.base_url}/v1/chat/completions", headers=gateway.headers, timeout=120,
                      json={"model": MODEL, **body, "stream": True}) as s:
        events, done = sse_events(s.iter_lines())
    assert done
    for c in a["choices"]:
        deltas = [ch for e in events for ch in e["choices"] if ch["index"] == c["index"]]
        assert "".join(d["delta"].get("content") or "" for d in deltas) == c["message"]["content"]
        assert [t for d in deltas if d["logprobs"] for t in d["logprobs"]["content"]] == c["logprobs"]["content"]


def _wait_engine_idle(gateway, timeout: float = 30) -> float:
    """Waits until the engine runs and queues nothing; the generated-token count then."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _metric(gateway, "vllm:num_requests_running") == 0 and _metric(gateway, "vllm:num_requests_waiting") == 0:
            return _metric(gateway, GENERATED)
        time.sleep(0.2)
    raise AssertionError("the engine still has requests")


@pytest.mark.engine
def test_request_timeout_aborts_the_engine_request(gateway, media):
    generated = _wait_engine_idle(gateway)
    long = {"max_tokens": 4000, "n": 8, "ignore_eos": True}  # 3 x 32000 tokens: minutes of work

    def plain():
        return _post(gateway, {"messages": video_message(media.url("h264.mp4"), num_frames=2), **long})

    def streamed():
        with httpx.stream("POST", f"{gateway.base_url}/v1/chat/completions", headers=gateway.headers, timeout=120,
                          json={"model": MODEL, "messages": video_message(media.url("h264.mp4"), num_frames=2),
                                "stream": True, **long}) as s:
            return sse_events(s.iter_lines())

    def queued():  # a long video: the completion runs as a job on the worker, its wait bounded by queued_wait_s
        return _post(gateway, {"messages": video_message(media.url("long.mp4"), num_frames=2), **long})

    def slow_fetch():  # the media server answers after 30 s
        return _post(gateway, {"messages": video_message(media.url("slow/h264.mp4")), "max_tokens": 2})

    start = time.monotonic()
    with cf.ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(f) for f in (plain, streamed, queued, slow_fetch)]
        plain_r, (events, done), queued_r, slow_r = [f.result() for f in futures]
    elapsed = time.monotonic() - start
    for r in (plain_r, queued_r, slow_r):
        assert (r.status_code, r.json()["error"]["code"]) == (504, "timeout"), r.text
    assert not done and events[-1]["error"]["code"] == "timeout" and len(events) > 1
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 15
    # the engine stopped: it goes idle with the requests unfinished. With ignore_eos, requests that were not
    # aborted would run until all 2 x 8 x 4000 tokens exist (or keep the engine busy past the wait). How many
    # tokens came before the timeout depends on the machine's speed.
    after = _wait_engine_idle(gateway)
    assert 0 < after - generated < 2 * 8 * 4000
    time.sleep(1.0)  # a second look: the counter no longer moves
    assert _metric(gateway, GENERATED) == after
    # the queued completion's wait ended, its job did not: the answer names it, a worker still runs it, and only
    # an explicit cancel (or the client leaving) stops it
    job_id = queued_r.json()["error"]["job_id"]
    job = httpx.get(f"{gateway.base_url}/v1/jobs/{job_id}", headers=gateway.headers).json()
    assert job["status"] in ("queued", "running"), job
    cancelled = httpx.delete(f"{gateway.base_url}/v1/jobs/{job_id}", headers=gateway.headers).json()
    assert cancelled["status"] == "cancelled"


def _engine_core(gateway) -> psutil.Process:
    procs = psutil.Process(gateway.proc.pid).children(recursive=True)
    core = [p for p in procs if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())]
    assert len(core) == 1, [(p.pid, p.name()) for p in procs]
    return core[0]


@pytest.mark.engine
@pytest.mark.ends_shared  # after every other engine test: it ends the session's default gateway
def test_engine_killed_mid_request_is_reported_as_engine_dead(request, media):
    gateway = request.getfixturevalue("_gateway").wait_ready()  # the session's default gateway (tests/stack.py)
    body = {"model": MODEL, "messages": video_message(media.url("h264.mp4"), num_frames=2), "max_tokens": 3900,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{gateway.base_url}/v1/chat/completions", json=body, headers=gateway.headers,
                      timeout=60) as s:
        lines = s.iter_lines()
        first = [next(lines) for _ in range(4)]
        completion_id = json.loads(first[0][6:])["id"]
        _engine_core(gateway).kill()
        events, done = sse_events(lines)
    assert not done and events[-1]["error"]["code"] == "engine_dead"
    # the process is dead for good: the liveness probe says so while it lingers (2 s), then it exits with
    # status 1 and the orchestrator restarts it
    try:
        health = httpx.get(f"{gateway.base_url}/health", timeout=5)
        assert (health.status_code, health.json()["error"]["code"]) == (503, "engine_dead")
    except httpx.ConnectError:  # already gone: a loaded machine stalled this test past those 2 s (the 503
        pass  # itself: tests/test_engine_death.py); the exit status says the rest
    assert gateway.proc.wait(60) == 1
    entries = []
    for line in gateway.log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("completion_id") == completion_id:
                entries.append(entry)
    assert [(e["outcome"], e["level"]) for e in entries] == [("engine_dead", "error")]
