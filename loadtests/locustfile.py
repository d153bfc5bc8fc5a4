"""Locust scenarios for a Framewise gateway (any OpenAI-compatible server with ``video_url`` parts works for
the chat scenarios; jobs, uploads and the frame report are Framewise's).

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --clip-base-url http://127.0.0.1:8765 \\
        --clips 60s-h264.mp4,60s-vp9.webm --tags stream --headless -u 4 -r 1 -t 60s

Scenarios, picked with ``--tags`` (no tags: every user class):
  stream     streamed video chat; ``time_to_first_token`` and ``inter_token_latency`` (from the SSE stream)
             and ``e2e_latency`` are their own entries
  nonstream  non-streamed video chat
  repeat     several questions about one video (frame cache and prefix cache): first vs follow-up TTFT
  upload     ``POST /v1/files``, then ask about ``file-<id>``
  image      image chat
  job        long-video job: ``POST /v1/jobs``, follow ``/events`` to ``done``; ``job_queue_wait`` and
             ``job_duration`` entries
  mixed      all of the above in one user with weights (stream 4, nonstream 2, repeat 2, upload 1, image 1, job 1)
Every response is checked (status, non-empty answer, ``usage``, frames reported); anything else is a failure
(a stream cut mid-way included).
Options below are locust options (``--model`` ...) or environment variables (``LOCUST_MODEL`` ...).

``FRAMEWISE_LOCUST_LOG=PATH`` (``python -m loadtests.chaos`` sets it) appends one JSON line per request (its start
and end time, name, HTTP status -- 0: no response --, the error and the gateway's error code when it failed)
and one per job id the gateway accepted (a ``POST /v1/jobs``, or a chat completion that ran as a job: its id
from the result, the error that ended the wait, or the stream's ``: queued as`` comment), and one per metric
sample (TTFT ...: its name and value, for exact percentiles: ``python -m bench.affinity``).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import time
from collections.abc import Callable

from locust import HttpUser, between, events, tag
from locust.exception import StopUser
from requests.exceptions import RequestException

QUESTIONS = ("What happens in this video?", "Describe the moving object.", "What colour is the square?",
             "How many scenes are there?", "Where does the square end up?", "Summarise the clip in one line.")


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    g = parser.add_argument_group("Framewise")
    g.add_argument("--model", env_var="LOCUST_MODEL", default="", help="model name (default: the first of /v1/models)")
    g.add_argument("--api-key", env_var="LOCUST_API_KEY", default="", help="bearer key")
    g.add_argument("--clip-base-url", env_var="LOCUST_CLIP_BASE_URL", default="http://127.0.0.1:8765",
                   help="where --clips, --long-clip and --image live (loadtests/clips.py serve)")
    g.add_argument("--clips", env_var="LOCUST_CLIPS", default="short-h264.mp4,short-vp9.webm",
                   help="comma list of clip file names (or full URLs) for the chat scenarios")
    g.add_argument("--long-clip", env_var="LOCUST_LONG_CLIP", default="",
                   help="clip for the job scenario (default: the last of --clips)")
    g.add_argument("--image", env_var="LOCUST_IMAGE", default="picture.png", help="image for image chat")
    g.add_argument("--frames", env_var="LOCUST_FRAMES", type=int, default=8,
                   help="num_frames per video (0: the model's default, not checked)")
    g.add_argument("--max-tokens", env_var="LOCUST_MAX_TOKENS", type=int, default=16)
    g.add_argument("--questions", env_var="LOCUST_QUESTIONS", type=int, default=4,
                   help="questions per video in the repeat scenario")
    g.add_argument("--clip-order", env_var="LOCUST_CLIP_ORDER", choices=("random", "cycle"), default="random",
                   help="repeat scenario: a random clip each time, or the clips in turn across users (many videos, "
                        "each new until the list wraps)")
    g.add_argument("--request-timeout", env_var="LOCUST_REQUEST_TIMEOUT", type=float, default=600)


@events.init.add_listener
def _drop_untagged_classes(environment, **_kw) -> None:
    """With ``--tags``, keep only the user classes that still have a task (locust would start the others, which
    then fail with "No tasks defined")."""
    environment._filter_tasks_by_tags()
    kept = [c for c in environment.user_classes if c.tasks]
    if kept:
        environment.user_classes[:] = kept


class CheckFailed(Exception):
    """A response that does not look like a correct answer."""


# ---- the request log (FRAMEWISE_LOCUST_LOG): what loadtests/chaos.py builds its ledger from ----------

_LOG_PATH = os.environ.get("FRAMEWISE_LOCUST_LOG", "")
_jobs_noted: set[str] = set()
_JOB_ID = re.compile(r"job-[0-9a-f]{32}")
_ERROR_CODE = re.compile(r"""["']code["']:\s*["'](\w+)["']""")


def _log(record: dict) -> None:
    if _LOG_PATH:
        with open(_LOG_PATH, "a") as f:  # one short line per write: lines from users never interleave
            f.write(json.dumps(record) + "\n")


def _note_job(job_id: object, how: str) -> None:
    """A job the gateway accepted (logged once per id)."""
    if _LOG_PATH and isinstance(job_id, str) and _JOB_ID.fullmatch(job_id) and job_id not in _jobs_noted:
        _jobs_noted.add(job_id)
        _log({"kind": "job", "t": time.time(), "id": job_id, "how": how})


def _note_job_in(text: str | bytes | None, how: str) -> None:
    """The job id an error body (``error.job_id``) or a ``: queued as`` comment names, if any."""
    if text:
        m = _JOB_ID.search(text.decode(errors="replace") if isinstance(text, bytes) else text)
        if m:
            _note_job(m.group(0), how)


if _LOG_PATH:
    @events.request.add_listener
    def _log_request(request_type, name, response_time, response_length, exception=None, response=None,
                     start_time=None, **_kw) -> None:
        if request_type == "METRIC":  # a TTFT or latency sample: kept for exact percentiles (bench/affinity.py)
            _log({"kind": "metric", "t": time.time(), "name": name, "ms": response_time})
            return
        end = time.time()
        status = getattr(response, "status_code", None) or 0
        record = {"kind": "request", "start": start_time or end - response_time / 1000, "end": end,
                  "type": request_type, "name": name, "status": status, "ok": exception is None}
        if exception is not None:
            text = str(exception)
            m = _ERROR_CODE.search(text)
            cause = getattr(response, "error", None)  # no response: the connection error
            record["code"] = (_error_code(response) or (m.group(1) if m else None)
                              or ("stream cut" if text.startswith("stream cut") else None)
                              or (type(cause).__name__ if cause is not None else None))
            record["error"] = text[:300]
        _log(record)

    def _error_code(response) -> str | None:
        """The gateway's ``error.code`` from a body that was read (not a stream's, which was iterated)."""
        if getattr(response, "_content", False) in (False, None, b""):
            return None
        try:
            code = response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return None
        return code if isinstance(code, str) else None


def _metric(user: HttpUser, name: str, seconds: float, length: int = 0) -> None:
    user.environment.events.request.fire(request_type="METRIC", name=name, response_time=seconds * 1000,
                                         response_length=length, exception=None, context={})


def _check_frames(user: VideoUser, framewise: dict | None) -> None:
    media = (framewise or {}).get("media") or []
    videos = [m for m in media if m.get("type") == "video"]
    if not videos:
        raise CheckFailed("no frames reported (framewise.media)")
    want = user.opts.frames
    if want and videos[0].get("frames") != want:
        raise CheckFailed(f"{videos[0].get('frames')} frames reported, {want} requested")


def _check_usage(usage: dict | None) -> None:
    if not usage or usage.get("prompt_tokens", 0) <= 0 or usage.get("completion_tokens", 0) <= 0:
        raise CheckFailed(f"missing or empty usage: {usage}")


def _check_completion(user: VideoUser, body: dict, video: bool = True) -> None:
    choices = body.get("choices") or []
    if not choices or not (choices[0].get("message") or {}).get("content"):
        raise CheckFailed("empty answer")
    _check_usage(body.get("usage"))
    if video:
        _check_frames(user, body.get("framewise"))


class VideoUser(HttpUser):
    """Shared plumbing: options, headers, the model name, request bodies, checked requests."""

    abstract = True
    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        self.opts = self.environment.parsed_options
        self.headers = {"Authorization": f"Bearer {self.opts.api_key}"} if self.opts.api_key else {}
        self.model = self.opts.model or self._discover_model()
        self.clips = [self._url(c) for c in self.opts.clips.split(",") if c]
        self.long_clip = self._url(self.opts.long_clip) if self.opts.long_clip else self.clips[-1]
        self.uploaded: dict[str, str] = {}

    def _url(self, name: str) -> str:
        return name if "://" in name else f"{self.opts.clip_base_url.rstrip('/')}/{name}"

    def _discover_model(self) -> str:
        r = self.client.get("/v1/models", headers=self.headers, name="/v1/models")
        try:
            return r.json()["data"][0]["id"]
        except (ValueError, KeyError, IndexError):
            raise StopUser() from None

    def body(self, url: str, question: str, stream: bool, image: bool = False) -> dict:
        if image:
            part = {"type": "image_url", "image_url": {"url": url}}
        else:
            part = {"type": "video_url", "video_url": {"url": url, **({"num_frames": self.opts.frames}
                                                                       if self.opts.frames else {})}}
        body = {"model": self.model, "max_tokens": self.opts.max_tokens, "ignore_eos": True, "stream": stream,
                "messages": [{"role": "user", "content": [part, {"type": "text", "text": question}]}]}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def chat(self, body: dict, name: str, video: bool = True) -> None:
        """Non-streamed chat completion, checked."""
        with self.client.post("/v1/chat/completions", json=body, headers=self.headers, name=name,
                              catch_response=True, timeout=self.opts.request_timeout) as r:
            try:
                if r.status_code != 200:
                    _note_job_in(r.text, "chat completion run as a job")  # the error that ended its wait
                    raise CheckFailed(f"HTTP {r.status_code}: {r.text[:200]}")
                answer = r.json()
                _note_job(((answer.get("framewise") or {}).get("job_id")), "chat completion run as a job")
                _check_completion(self, answer, video)
            except (CheckFailed, ValueError) as e:
                r.failure(str(e))

    def stream(self, body: dict, name: str, ttft_name: str = "time_to_first_token", video: bool = True) -> None:
        """Streamed chat completion: TTFT = the first SSE chunk with a choice (both Framewise and vLLM send it
        once the engine produced the first token); inter-token latency = gaps between later content chunks."""
        start = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=body, headers=self.headers, name=name, stream=True,
                              catch_response=True, timeout=self.opts.request_timeout) as r:
            try:
                if r.status_code != 200:
                    _note_job_in(r.text, "chat completion run as a job")
                    raise CheckFailed(f"HTTP {r.status_code}: {r.text[:200]}")
                first = last = None
                text, usage, framewise, done, gaps = "", None, None, False, []
                for line in r.iter_lines():
                    if line.startswith(b": queued as "):  # a long video: the completion runs as a job
                        _note_job_in(line, "chat completion run as a job")
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:]
                    if data == b"[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise CheckFailed(f"error in stream: {chunk['error']}")
                    now = time.perf_counter()
                    framewise = framewise or chunk.get("framewise")
                    usage = chunk.get("usage") or usage
                    for c in chunk.get("choices") or []:
                        if first is None:
                            first = now
                        content = (c.get("delta") or {}).get("content")
                        if content:
                            if last is not None:
                                gaps.append(now - last)
                            last = now
                            text += content
                if not done:
                    raise CheckFailed("stream ended without [DONE]")
                if first is None or not text:
                    raise CheckFailed("empty answer")
                _check_usage(usage)
                if video:
                    _check_frames(self, framewise)
            except (CheckFailed, ValueError) as e:
                r.failure(str(e))
                return
            except RequestException as e:  # the connection broke mid-stream
                r.failure(f"stream cut: {type(e).__name__}: {e}")
                return
        _metric(self, ttft_name, first - start)
        for g in gaps:
            _metric(self, "inter_token_latency", g)
        _metric(self, "e2e_latency", time.perf_counter() - start, len(text))


# ---- scenarios (plain functions, so the mixed user can reuse them) ---------------------------


def stream_chat(user: VideoUser) -> None:
    user.stream(user.body(random.choice(user.clips), random.choice(QUESTIONS), True), "chat [stream]")


def nonstream_chat(user: VideoUser) -> None:
    user.chat(user.body(random.choice(user.clips), random.choice(QUESTIONS), False), "chat [nonstream]")


_next_clip = itertools.count()  # --clip-order cycle: shared by the users of this process


def repeat_questions(user: VideoUser) -> None:
    """One video, several questions: the first decodes, the rest hit the frame cache and the prefix cache."""
    if user.opts.clip_order == "cycle":
        url = user.clips[next(_next_clip) % len(user.clips)]
    else:
        url = random.choice(user.clips)
    for i in range(user.opts.questions):
        name = "first" if i == 0 else "next"
        user.stream(user.body(url, QUESTIONS[i % len(QUESTIONS)], True), f"chat [repeat {name}]",
                    ttft_name=f"time_to_first_token [repeat {name}]")


def upload_then_ask(user: VideoUser) -> None:
    url = random.choice(user.clips)
    data = user.uploaded.get(url)
    if data is None:
        data = user.uploaded[url] = user.client.get(url, name="clip download (client side)").content
    with user.client.post("/v1/files", files={"file": (url.rsplit("/", 1)[-1], data)}, data={"purpose": "vision"},
                          headers=user.headers, name="/v1/files", catch_response=True) as r:
        file_id = r.json().get("id") if r.status_code == 200 else None
        if not file_id:
            r.failure(f"upload: HTTP {r.status_code}: {r.text[:200]}")
            return
    user.chat(user.body(file_id, random.choice(QUESTIONS), False), "chat [upload]")


def image_chat(user: VideoUser) -> None:
    user.chat(user.body(user._url(user.opts.image), "What is in this picture?", False, image=True), "chat [image]",
              video=False)


def long_video_job(user: VideoUser) -> None:
    """``POST /v1/jobs``; SSE events until ``done``: queue wait = submit -> ``running``, duration = ``running`` ->
    ``done``; then the stored result is checked."""
    submitted = time.perf_counter()
    with user.client.post("/v1/jobs", json=user.body(user.long_clip, "Summarise this video.", False),
                          headers=user.headers, name="/v1/jobs", catch_response=True) as r:
        job_id = r.json().get("id") if r.status_code in (200, 202) else None
        if not job_id:
            r.failure(f"submit: HTTP {r.status_code}: {r.text[:200]}")
            return
        _note_job(job_id, "POST /v1/jobs")
    running = end = None
    stage = None
    with user.client.get(f"/v1/jobs/{job_id}/events", headers=user.headers, name="/v1/jobs/{id}/events",
                         stream=True, catch_response=True, timeout=user.opts.request_timeout) as r:
        if r.status_code != 200:
            r.failure(f"job {job_id} events: HTTP {r.status_code}: {r.text[:200]}")
            return
        try:
            for line in r.iter_lines():
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    if "error" in event:  # the stream's last event: the job queue stopped answering
                        r.failure(f"job {job_id} events: error event: {event['error']}")
                        return
                    stage = event.get("stage")
                    if stage == "running" and running is None:
                        running = time.perf_counter()
                    if stage in ("done", "failed", "cancelled"):
                        end = time.perf_counter()
                        break
        except RequestException as e:  # the connection broke mid-stream
            r.failure(f"stream cut: job {job_id}: {type(e).__name__}: {e}")
            return
        if stage != "done" or running is None:
            r.failure(f"job {job_id} ended with stage {stage!r}")
            return
    with user.client.get(f"/v1/jobs/{job_id}", headers=user.headers, name="/v1/jobs/{id}", catch_response=True) as r:
        try:
            job = r.json()
            if r.status_code != 200 or job.get("status") != "succeeded":
                raise CheckFailed(f"job status {job.get('status')!r} (HTTP {r.status_code})")
            _check_completion(user, job.get("result") or {})
        except (CheckFailed, ValueError) as e:
            r.failure(str(e))
            return
    _metric(user, "job_queue_wait", running - submitted)
    _metric(user, "job_duration", end - running)


def _task(fn: Callable[[VideoUser], None], *tags: str) -> Callable:
    """``fn`` as a locust task with its own tags (a wrapper, so one scenario can carry different tags)."""

    def run(user):
        fn(user)

    run.__name__ = fn.__name__
    return tag(*tags)(run)


class StreamChatUser(VideoUser):
    tasks = [_task(stream_chat, "stream")]


class ChatUser(VideoUser):
    tasks = [_task(nonstream_chat, "nonstream")]


class RepeatQuestionsUser(VideoUser):
    tasks = [_task(repeat_questions, "repeat")]


class UploadUser(VideoUser):
    tasks = [_task(upload_then_ask, "upload")]


class ImageChatUser(VideoUser):
    tasks = [_task(image_chat, "image")]


class JobUser(VideoUser):
    tasks = [_task(long_video_job, "job")]


class MixedUser(VideoUser):
    tasks = {_task(stream_chat, "mixed"): 4, _task(nonstream_chat, "mixed"): 2, _task(repeat_questions, "mixed"): 2,
             _task(upload_then_ask, "mixed"): 1, _task(image_chat, "mixed"): 1, _task(long_video_job, "mixed"): 1}


SCENARIO_TAGS = ("stream", "nonstream", "repeat", "upload", "image", "job")
