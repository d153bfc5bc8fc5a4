"""Where the gateway's TTFT goes: one streamed chat completion, stage by stage, vs ``AsyncLLM`` in-process.

    .venv/bin/python bench/gateway_stages.py [--reps 40] [--out bench/results/gateway_stages.json]

The same pre-decoded frames (a ``file-<id>`` upload: frame-cache hit after the first request) through a real
``framewise serve`` app (uvicorn, the same options as ``cmd_serve``), pinned to one CPU, with a client pinned
to the other. Timing is bench-only: this script's server process wraps the gateway's functions (nothing in
``server/`` times these stages) and records ``time.perf_counter`` (``CLOCK_MONOTONIC``: one clock for the
client and server processes) at each boundary:

  http_in        client sends -> the ASGI app gets the request        (client, TCP, uvicorn's parser)
  parse_validate ASGI app -> route handler entered                    (middleware, body, JSON, pydantic, deps)
  route          handler -> prompt rendering begins                   (model check, deadline, admission)
  render         chat template (``render_prompt``)
  media          file-<id> resolution (``MediaResolver.resolve``)
  frames         frame cache lookup (``VideoService.sample``)
  run_setup      media prepared -> ``engine.generate`` called          (``ChatRun``: SamplingParams, ids)
  engine         ``generate`` called -> first output                  (vLLM: processor, engine core, detokenizer)
    of which vllm_inputs: ``process_inputs_async`` (tokenisation, multimodal processor, hashing)
  serialise      first output -> first chunk string built             (StreamingResponse pulls, ``chunk``)
  asgi_send      chunk string -> ASGI ``http.response.body`` sent
  http_out       body sent -> the client has parsed the first chunk with a choice

Modes, one request each per round, interleaved (a shared machine's load hits them alike):
  gateway            the app as ``framewise serve`` builds it (pure-ASGI ``RecordMiddleware``)
  basehttp-record    the same app with that middleware as the ``BaseHTTPMiddleware`` it used to be
  direct             the same engine, in the gateway's process, called straight (no HTTP, no gateway code)
  inprocess-asyncio  ``AsyncLLM`` in a process of its own (the issue's baseline), asyncio event loop
  inprocess-uvloop   the same on uvloop (uvicorn's loop)
Overhead = a gateway mode's TTFT p50 - a baseline's TTFT p50.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from loadtests import clips, servers  # noqa: E402
from loadtests.servers import chat_body  # noqa: E402

STAGES = ["http_in", "parse_validate", "route", "render", "media", "frames", "run_setup", "engine", "serialise",
          "asgi_send", "http_out"]


# ---- the instrumented server (a child process) -----------------------------------------------------------


def record_basehttp(services):
    """The request-id / metrics / access-log middleware as it was before it became pure ASGI
    (``server.app.RecordMiddleware``): a ``BaseHTTPMiddleware`` (what ``@app.middleware("http")`` makes), which
    runs the app in a task of its own and passes every message through a memory stream. Variant
    ``basehttp-record`` measures what that cost."""
    from starlette.middleware.base import BaseHTTPMiddleware

    from framewise.server import logs

    class RecordBaseHTTP(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            start = time.perf_counter()
            rid = logs.new_request_id(request.headers.get("x-request-id"))
            request.state.request_id = rid
            token = logs.request_id.set(rid)
            try:
                response = await call_next(request)
            finally:
                logs.request_id.reset(token)
            route = getattr(request.scope.get("route"), "path", "unmatched")
            elapsed = time.perf_counter() - start
            services.metrics.requests.labels(route, str(response.status_code)).inc()
            services.metrics.request_seconds.labels(route).observe(elapsed)
            response.headers["X-Request-ID"] = rid
            logging.getLogger("framewise.access").info(
                "%s %s %d", request.method, request.url.path, response.status_code,
                extra={"request_id": rid, "route": route, "status": response.status_code,
                       "ms": round(elapsed * 1000, 1), "client": request.client.host if request.client else None})
            return response

    return RecordBaseHTTP


def serve(model: str, port: int, files_dir: str) -> None:
    """``framewise serve`` with spans around each stage (bench-only wrappers), plus, in the same process and
    on the same engine: the app with the former ``BaseHTTPMiddleware`` record (header
    ``x-bench-variant: basehttp-record``) and
    ``/bench/direct`` (one generate straight into the engine with the cached frames; the TTFT it measured)."""
    import uvicorn
    from starlette.middleware import Middleware

    from framewise.server.app import RecordMiddleware, create_app
    from framewise.server.chat import media as media_mod
    from framewise.server.chat import pipeline
    from framewise.server.engine import Engine
    from framewise.server.logs import configure_logging
    from framewise.server.schemas import ChatCompletionRequest
    from framewise.server.settings import Settings

    settings = Settings(model=model, served_model_name="tc-llava", port=port, files_dir=files_dir,
                        log_level="warning")
    configure_logging(settings.log_level, settings.log_format)
    engine = Engine(settings)
    app = create_app(settings, engine)
    services = app.state.services
    alt = create_app(settings, engine)  # its own services are never started: it uses the first app's
    alt.state.services = services
    [i] = [i for i, m in enumerate(alt.user_middleware) if m.cls is RecordMiddleware]
    alt.user_middleware[i] = Middleware(record_basehttp(services))
    spans: list[dict] = []
    # the spans of the request being handled (a context variable: the end of one streamed request can overlap
    # the start of the next)
    current: contextvars.ContextVar[dict] = contextvars.ContextVar("spans", default=None)
    now = time.perf_counter

    class Cur:
        def setdefault(self, k, v):
            rec = current.get()
            return v if rec is None else rec.setdefault(k, v)

    cur = Cur()

    def wrap_sync(obj, name, before, after=None):
        fn = getattr(obj, name)

        def w(*a, **kw):
            cur.setdefault(before, now())
            try:
                return fn(*a, **kw)
            finally:
                if after:
                    cur.setdefault(after, now())
        setattr(obj, name, w)

    def wrap_async(obj, name, before, after):
        fn = getattr(obj, name)

        async def w(*a, **kw):
            cur.setdefault(before, now())
            try:
                return await fn(*a, **kw)
            finally:
                cur.setdefault(after, now())
        setattr(obj, name, w)

    wrap_sync(pipeline, "check_model", "handler_in")
    wrap_sync(media_mod, "render_prompt", "render_in", "render_out")
    wrap_async(services.media, "resolve", "media_in", "media_out")
    wrap_async(services.video, "sample", "frames_in", "frames_out")
    wrap_async(pipeline, "prepare", "prepare_in", "prepare_out")
    wrap_sync(pipeline, "chunk", "chunk_in", "chunk_out")
    generate = engine.generate

    def gen(prompt, params, request_id):
        cur.setdefault("generate_in", now())
        llm = engine.llm
        if not getattr(llm.input_processor, "_bench_wrapped", False):
            wrap_async(llm.input_processor, "process_inputs_async", "inputs_in", "inputs_out")
            llm.input_processor._bench_wrapped = True

        async def it():
            async for out in generate(prompt, params, request_id):
                cur.setdefault("engine_first", now())
                yield out
        return it()
    engine.generate = gen
    direct_n = [0]

    async def direct() -> dict:
        """The in-process baseline on this engine: the cached frames, the same rendered prompt and
        SamplingParams, straight into ``generate``; no HTTP, no gateway code."""

        [video] = list(services.video.cache._items.values())
        body = ChatCompletionRequest.model_validate(chat_body("framewise", "x", 8, 1))
        text = engine.render([{"role": "user", "content": [{"type": "video"},
                                                           {"type": "text", "text": "What happens in this video?"}]}])
        prompt = {"prompt": text, "multi_modal_data": {"video": [video.frames]}}
        rec = {}
        current.set(rec)
        direct_n[0] += 1
        start = now()
        params = pipeline.sampling_params(body)
        first = None
        async for _ in generate(prompt, params, f"direct-{direct_n[0]}"):
            first = first or now()
        return {"ttft": first - start, "vllm_inputs": rec.get("inputs_out", 0) - rec.get("inputs_in", 0)}

    async def reply(send, obj) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(obj).encode()})

    async def outer(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        if scope["path"] == "/bench/spans":
            out = list(spans)
            spans.clear()
            return await reply(send, out)
        if scope["path"] == "/bench/direct":
            return await reply(send, await direct())
        chat = scope["path"] == "/v1/chat/completions"
        variant = dict(scope["headers"]).get(b"x-bench-variant", b"").decode()
        rec = {"asgi_in": now(), "variant": variant}
        current.set(rec)

        async def snd(msg):
            await send(msg)
            if chat and msg["type"] == "http.response.body" and msg.get("body"):
                rec.setdefault("asgi_first_body", now())
        await (alt if variant == "basehttp-record" else app)(scope, receive, snd)
        if chat:
            spans.append(rec)

    uvicorn.run(outer, host="127.0.0.1", port=port, log_config=None, access_log=False, log_level="warning",
                lifespan="on")


def inprocess(model: str, clip: str, loop: str, max_tokens: int = 1) -> None:
    """The baseline in a process of its own: the same frames, rendered prompt and SamplingParams straight into
    ``AsyncLLM`` (Framewise's ``Engine``, same engine arguments); one request per ``go`` line on stdin, its
    TTFT (and vLLM's input processing) as a JSON line on stdout. ``loop``: asyncio or uvloop (uvicorn's)."""
    from framewise.server.chat.pipeline import sampling_params
    from framewise.server.engine import Engine
    from framewise.server.schemas import ChatCompletionRequest
    from framewise.server.settings import Settings
    from framewise.server.video.decode import sample_video
    from framewise.server.video.sampling import FrameSampling

    now = time.perf_counter
    # stdout is the protocol: everything else written to it (vLLM logs there) goes to stderr, the log file
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    async def go() -> None:
        engine = Engine(Settings(model=model, served_model_name="tc-llava"))
        await engine.start()
        d = engine.defaults
        frames = sample_video(clip, FrameSampling(num_frames=8), default_frames=d.num_frames,
                              max_frames=d.max_frames, shortest_edge=d.shortest_edge).frames
        body = ChatCompletionRequest.model_validate(chat_body("framewise", "x", 8, max_tokens))
        text = engine.render([{"role": "user", "content": [{"type": "video"},
                                                           {"type": "text", "text": "What happens in this video?"}]}])
        prompt = {"prompt": text, "multi_modal_data": {"video": [frames]}}
        proc = engine.llm.input_processor
        fn, cur = proc.process_inputs_async, {}

        async def timed(*a, **kw):
            cur["inputs_in"] = now()
            try:
                return await fn(*a, **kw)
            finally:
                cur["inputs_out"] = now()
        proc.process_inputs_async = timed
        print("ready", file=proto, flush=True)
        i = 0
        while (await asyncio.to_thread(sys.stdin.readline)).strip() == "go":
            i += 1
            cur.clear()
            params = sampling_params(body)
            start = now()
            first = None
            async for _ in engine.generate(prompt, params, f"inproc-{i}"):
                first = first or now()
            print(json.dumps({"ttft": first - start, "e2e": now() - start,
                              "vllm_inputs": cur["inputs_out"] - cur["inputs_in"]}), file=proto, flush=True)
        engine.shutdown()

    if loop == "uvloop":
        import uvloop

        uvloop.run(go())
    else:
        asyncio.run(go())
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter teardown, which can abort after vLLM on CPU


class InProcess:
    """A running :func:`inprocess` worker, pinned to ``cpus``."""

    def __init__(self, model: Path, clip: Path, loop: str, cpus: list[int], log: Path, env: dict | None = None,
                 max_tokens: int = 1):
        self.log = open(log, "w")  # noqa: SIM115 - lives as long as the worker
        self.proc = subprocess.Popen(
            ["taskset", "-c", ",".join(map(str, cpus)), sys.executable, str(Path(__file__).resolve()),
             "--inprocess", str(model), str(clip), loop, str(max_tokens)], cwd=tempfile.gettempdir(), text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, start_new_session=True,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                 **(env or {})})
        try:
            line = self.proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"in-process worker failed: {log.read_text()[-2000:]}")
        except BaseException:
            self.close()
            raise

    def request(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
            self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


# ---- the client -------------------------------------------------------------------------------------------


MODES = ("gateway", "basehttp-record", "direct", "inprocess-asyncio", "inprocess-uvloop")


async def client_run(base: str, file_id: str, reps: int, warm: int, workers: dict[str, InProcess]
                     ) -> dict[str, list[dict]]:
    """``warm + reps`` rounds, each one request per mode (interleaved: the machine's load hits every mode alike)."""

    body = chat_body("framewise", file_id, 8, 1)
    modes = [m for m in MODES if not m.startswith("inprocess") or m in workers]
    out: dict[str, list[dict]] = {m: [] for m in modes}
    async with httpx.AsyncClient(timeout=120) as c:
        for i in range(warm + reps):
            for mode in modes:
                if mode in workers:
                    res = workers[mode].request()
                    if i >= warm:
                        out[mode].append(res)
                    continue
                if mode == "direct":
                    res = (await c.get(f"{base}/bench/direct")).json()
                    if i >= warm:
                        out[mode].append(res)
                    continue
                sent, first = time.perf_counter(), None
                headers = {"x-bench-variant": mode}
                async with c.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers) as r:
                    assert r.status_code == 200, await r.aread()
                    async for line in r.aiter_lines():
                        if (first is None and line.startswith("data: ") and line != "data: [DONE]"
                                and json.loads(line[6:]).get("choices")):
                            first = time.perf_counter()
                if i >= warm:
                    out[mode].append({"sent": sent, "first": first})
    return out


def stage_rows(client: list[dict], spans: list[dict]) -> list[dict]:
    rows = []
    for c, s in zip(client, spans, strict=True):
        t = {**s, **c}
        rows.append({
            "ttft": t["first"] - t["sent"],
            "http_in": t["asgi_in"] - t["sent"],
            "parse_validate": t["handler_in"] - t["asgi_in"],
            "route": t["render_in"] - t["handler_in"],
            "render": t["render_out"] - t["render_in"],
            "media": t["media_out"] - t["media_in"],
            "frames": t["frames_out"] - t["frames_in"],
            "prepare_rest": (t["prepare_out"] - t["prepare_in"]) - (t["render_out"] - t["render_in"])
            - (t["frames_out"] - t["media_in"]),
            "run_setup": t["generate_in"] - t["prepare_out"],
            "engine": t["engine_first"] - t["generate_in"],
            "vllm_inputs": t["inputs_out"] - t["inputs_in"],
            "serialise": t["chunk_out"] - t["engine_first"],
            "asgi_send": t["asgi_first_body"] - t["chunk_out"],
            "http_out": t["first"] - t["asgi_first_body"],
        })
    return rows


def summary(rows: list[dict]) -> dict:
    """p50 and mean (ms) of every column."""
    return {stat: {k: round(fn(r[k] for r in rows) * 1000, 3) for k in rows[0]}
            for stat, fn in (("p50", statistics.median), ("mean", statistics.fmean))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--model", type=Path, default=servers.DEMO_MODEL)
    ap.add_argument("--inprocess-loops", default="asyncio,uvloop", help="in-process baselines to run ('' for none)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gateway_stages.json")
    ap.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--inprocess", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(*args.serve)
        return 0
    if args.inprocess:
        m, c, loop, max_tokens = args.inprocess
        inprocess(m, c, loop, int(max_tokens))
    os.environ.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm-serve-e2e"))
    server_cpus, client_cpus = [servers.server_cpu()], servers.other_cpus()
    os.sched_setaffinity(0, client_cpus)
    clip = clips.ensure(["short-h264"])["short-h264"]
    work = Path(tempfile.mkdtemp(prefix="fw-stages-"))
    port = servers.free_port()
    workers: dict[str, InProcess] = {}
    srv = servers.Server("framewise-stages", [sys.executable, str(Path(__file__).resolve()), "--serve",
                                              str(args.model), str(port), str(work / "files")],
                         port, work / "server.log", ready_path="/ready", cpus=server_cpus,
                         env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"})
    try:
        for loop in filter(None, args.inprocess_loops.split(",")):
            workers[f"inprocess-{loop}"] = InProcess(args.model, clip, loop, server_cpus, work / f"inprocess-{loop}.log")
        up = httpx.post(f"{srv.base_url}/v1/files", files={"file": (clip.name, clip.read_bytes())}, timeout=60)
        up.raise_for_status()
        load_before = os.getloadavg()
        client = asyncio.run(client_run(srv.base_url, up.json()["id"], args.reps, args.warm, workers))
        spans = httpx.get(f"{srv.base_url}/bench/spans", timeout=10).json()
        load_after = os.getloadavg()
    finally:
        for w in workers.values():
            w.close()
        srv.close()
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "reps": args.reps,
           "server_cpus": server_cpus, "client_cpus": client_cpus, "load_before": load_before,
           "load_after": load_after}
    for mode in ("gateway", "basehttp-record"):
        mine = [s for s in spans if s["variant"] == mode][args.warm:]
        res[mode] = summary(stage_rows(client[mode], mine))
        print(mode, json.dumps(res[mode]["p50"]), flush=True)
    for mode in ["direct", *workers]:
        res[mode] = summary(client[mode])
        print(mode, json.dumps(res[mode]["p50"]), flush=True)
    overhead = {f"{a} - {b}": round(res[a]["p50"]["ttft"] - res[b]["p50"]["ttft"], 2)
                for a in ("gateway", "basehttp-record") for b in ["direct", *workers]}
    res["ttft_overhead_ms_p50"] = overhead
    print(json.dumps({k: v for k, v in res.items() if k not in MODES}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
