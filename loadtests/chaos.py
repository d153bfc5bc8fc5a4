"""``make chaos``: the mixed locust profile against a gateway, a job worker and Redis on this machine while faults
hit them, then a ledger: every job accepted ended exactly once (or failed with a reason), and the requests that
failed during each fault, by HTTP status.

    python -m loadtests.chaos [--quick] [--run-time 240] [--users 3] [--out DIR] [--faults a,b,...]

The stack (all on 127.0.0.1, every server's engine pinned to the last CPU, locust on the others):

- ``redis-server``: a private one (its own directory and free port), AOF on, ``appendfsync always``;
- ``framewise serve`` on that Redis, ``--queue-above-s 5``: chat completions about the 20 s clip in the clip set
  run as jobs (the client's connection waits for the job), the short clips run on the gateway's engine;
- ``framewise worker`` on that Redis (``--visibility-timeout-s 10``), its ``/health`` on a metrics port;
- the loopback clip server (loadtests/clips.py), and locust's ``mixed`` profile (loadtests/swarm.py), every
  request and every job id the gateway accepted written to a log (``FRAMEWISE_LOCUST_LOG``).

A supervisor restarts a server whenever it exits (as Compose's ``restart: unless-stopped`` or a Kubernetes
Deployment does), killing what is left of its process group first (the container going away), and records the
exit status and when the new process was ready (gateway ``/ready``, worker ``/health``, Redis ``PING``).

Faults (``--faults``; spread over ``--run-time``, each one after the previous one's service is back):

- ``gateway-engine-core``: SIGKILL the gateway's vLLM engine core. Detected by the gateway itself: ``/health``
  503 ``engine_dead``, then the process exits with status 1; the supervisor restarts it.
- ``redis``: SIGKILL ``redis-server``; the supervisor restarts it on its AOF. Back when it answers ``PING`` and
  the worker's ``/health`` is 200 again (the worker reaches it).
- ``gateway-sigterm``: SIGTERM the gateway's main process (a rolling deploy): it stops accepting, drains
  (``--drain-timeout-s 10``), answers clients waiting on queued completions with their job ids, exits 0 (or
  -15: uvicorn re-raises the signal; 143 in a container); the supervisor restarts it.
- ``worker-kill``: SIGKILL the whole worker (its process group, engine included: a crash, an OOM kill), the
  issue's "restarts a worker". Its running jobs are taken over by the restarted worker after the visibility
  timeout (an attempt is spent); the supervisor restarts it.
- ``worker-engine-core`` (not in the default set): SIGKILL the worker's engine core; the worker hands its jobs
  back without spending an attempt and exits with status 1 (tests/test_faults.py checks the same in isolation).

Each fault's window runs from the injection to the moment its service is back. Then the load stops (users
finish their task), every job reaches a final status, and each job's record is read from Redis: exactly once =
``succeeded`` with ``completions`` 1, or ``failed`` with an error code (``completions`` 0). Lost (no record),
stuck (still queued or running), stored twice (``completions`` > 1) and cancelled (no client of this run
cancels a job: a fault must not) are failures. ``<out>/chaos_ledger.json`` holds it all, ``chaos_ledger.md``
the tables this prints.

Exit status: 0 when the ledger holds, every fault's service came back with the expected exit status, no server
exited outside a fault and at least one job was accepted; 1 otherwise; 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import redis

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests import clips, servers  # noqa: E402

RESULTS = ROOT / "loadtests" / "results" / "runs"
PREFIX = "fw"  # the queue's Redis key prefix (the default)
QUEUE_ABOVE_S = 5
LONG_CLIP = clips.ClipSpec("chaos-20s-h264", 20, 320, 240, 24)  # above QUEUE_ABOVE_S: its chats run as jobs
CHAT_CLIPS = ("short-h264", "short-vp9")
READY_TIMEOUT_S = 900.0  # an engine start on a loaded 2-core machine
EXIT_TIMEOUT_S = 180.0  # a fault's process exiting (a drain is 10 s; the engine watcher notices in seconds)


@dataclass(frozen=True)
class Fault:
    name: str
    service: str
    action: str  # engine-core | sigterm | sigkill-group
    what: str
    expect_exit: tuple[int, ...]


FAULTS = {f.name: f for f in (
    Fault("gateway-engine-core", "gateway", "engine-core", "SIGKILL the gateway's engine core", (1,)),
    Fault("redis", "redis", "sigkill-group", "SIGKILL redis-server (restarted on its AOF)", (-9,)),
    Fault("gateway-sigterm", "gateway", "sigterm", "SIGTERM the gateway (rolling deploy)", (0, -15, 143)),
    Fault("worker-kill", "worker", "sigkill-group", "SIGKILL the worker (process group)", (-9,)),
    Fault("worker-engine-core", "worker", "engine-core", "SIGKILL the worker's engine core", (1,)),
)}
DEFAULT_FAULTS = ("gateway-engine-core", "redis", "gateway-sigterm", "worker-kill")


def say(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Service:
    """A supervised server process (its own session: the process group is its "container")."""

    def __init__(self, name: str, cmd: list[str], ready, logs: Path, *, env: dict | None = None,
                 cpus: list[int] | None = None, restart_delay_s: float = 0.0):
        self.name, self.cmd, self.ready_check, self.logs = name, cmd, ready, logs
        self.restart_delay_s = restart_delay_s
        self.env = {**os.environ, **(env or {})}
        self.pin = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
        self.proc: subprocess.Popen | None = None
        self.incarnation = 0
        self.ready = False
        self.exits: list[dict] = []
        self.stopping = False
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    def log_path(self, incarnation: int | None = None) -> Path:
        return self.logs / f"{self.name}-{incarnation or self.incarnation}.log"

    def _spawn(self) -> bool:
        with self.cond:
            if self.stopping:
                return False
            self.incarnation += 1
            with open(self.log_path(), "w") as log:
                self.proc = subprocess.Popen([*self.pin, *self.cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True, env=self.env)
            self.ready = False
            return True

    def _wait_ready(self, proc: subprocess.Popen, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline and not self.stopping:
            if proc.poll() is not None:
                return False
            with contextlib.suppress(Exception):
                if self.ready_check():
                    with self.cond:
                        self.ready = True
                        self.cond.notify_all()
                    return True
            time.sleep(0.25)
        return False

    def start(self) -> None:
        """The first start (waits until ready), then supervision."""
        self._spawn()
        if not self._wait_ready(self.proc, READY_TIMEOUT_S):
            raise RuntimeError(f"{self.name} did not start; log {self.log_path()}:\n"
                               + self.log_path().read_text()[-3000:])
        self.thread = threading.Thread(target=self._supervise, name=f"supervise-{self.name}", daemon=True)
        self.thread.start()

    def _supervise(self) -> None:
        while True:
            proc, incarnation = self.proc, self.incarnation
            rc = proc.wait()
            exited = time.time()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # what is left of the "container"
            rec = {"service": self.name, "incarnation": incarnation, "pid": proc.pid, "exit_code": rc,
                   "exited_at": exited, "ready_at": None, "at_shutdown": self.stopping}
            with self.cond:
                self.ready = False
                self.exits.append(rec)
                self.cond.notify_all()
            if self.stopping:
                return
            say(f"{self.name} (pid {proc.pid}) exited with status {rc}: restarting it"
                + (f" in {self.restart_delay_s:g} s" if self.restart_delay_s else ""))
            time.sleep(self.restart_delay_s)
            if not self._spawn():
                return
            if self._wait_ready(self.proc, READY_TIMEOUT_S):
                with self.cond:
                    rec["ready_at"] = time.time()
                    self.cond.notify_all()
                say(f"{self.name} is back ({rec['ready_at'] - exited:.1f} s after the exit)")
            elif not self.stopping:
                say(f"{self.name} did not come back; log {self.log_path()}")

    def wait_ready(self, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.ready, timeout)

    def wait_exit(self, incarnation: int, timeout: float) -> dict | None:
        def found():
            return next((e for e in self.exits if e["incarnation"] == incarnation), None)

        with self.cond:
            self.cond.wait_for(found, timeout)
            return found()

    def wait_back(self, rec: dict, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: rec["ready_at"] is not None, timeout)

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if self.thread is not None:
            self.thread.join(10)


def engine_core(pid: int) -> psutil.Process | None:
    for p in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()):
                return p
    return None


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class Stack:
    """Redis, a gateway and a worker, supervised; the clip server."""

    def __init__(self, out: Path, model: Path, clip_port: int, redis_down_s: float = 0.0):
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        (out / "redis").mkdir(exist_ok=True)
        files = out / "files"
        files.mkdir(exist_ok=True)
        exe = shutil.which("redis-server")
        if not exe:
            raise SystemExit("redis-server is not installed (make setup installs it)")
        self.redis_port, self.gateway_port, self.worker_port = (servers.free_port() for _ in range(3))
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.base_url = f"http://127.0.0.1:{self.gateway_port}"
        engine_cpu = [servers.server_cpu()]
        allowed = f"127.0.0.1:{clip_port}"
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "FRAMEWISE_ALLOWED_MEDIA_HOSTS": allowed}
        common = ["--model", str(model), "--served-model-name", servers.MODEL, "--files-dir", str(files),
                  "--redis-url", self.redis_url, "--log-level", "info", "--enforce-eager"]

        def redis_ready() -> bool:
            with redis.Redis(port=self.redis_port, socket_connect_timeout=0.5, socket_timeout=1) as r:
                return bool(r.ping())

        self.redis = Service("redis", [exe, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir",
                                       str(out / "redis"), "--save", "", "--appendonly", "yes", "--appendfsync",
                                       "always", "--daemonize", "no"], redis_ready, self.logs,
                             restart_delay_s=redis_down_s)
        self.gateway = Service("gateway", [sys.executable, "-m", "framewise.server.cli", "serve", *common, "--port",
                                           str(self.gateway_port), "--queue-above-s", str(QUEUE_ABOVE_S),
                                           "--drain-timeout-s", "10"],
                               lambda: http_ok(self.base_url + "/ready"), self.logs, cpus=engine_cpu,
                               env={**env, "FRAMEWISE_QUEUE_KEEPALIVE_S": "1"})
        self.worker = Service("worker", [sys.executable, "-m", "framewise.server.cli", "worker", *common,
                                         "--visibility-timeout-s", "10", "--heartbeat-s", "1", "--concurrency", "2",
                                         "--grace-s", "5", "--metrics-port", str(self.worker_port),
                                         "--metrics-host", "127.0.0.1"],
                              self.worker_healthy, self.logs, cpus=engine_cpu, env=env)
        self.services = {s.name: s for s in (self.redis, self.gateway, self.worker)}

    def worker_healthy(self) -> bool:
        return http_ok(f"http://127.0.0.1:{self.worker_port}/health")

    def start(self) -> None:
        self.redis.start()
        say(f"redis-server on {self.redis_url} (AOF, appendfsync always)")
        errors: list[BaseException] = []

        def start(s: Service) -> None:
            try:
                s.start()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=start, args=(s,)) for s in (self.gateway, self.worker)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        say(f"gateway on {self.base_url}, worker /health on port {self.worker_port} (engines on CPU "
            f"{servers.server_cpu()})")

    def close(self) -> None:
        for s in (self.gateway, self.worker, self.redis):
            s.stop()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.redis_port, decode_responses=True, socket_connect_timeout=1, socket_timeout=5)

    def running_jobs(self) -> list[str]:
        try:
            with self.client() as r:
                return sorted(r.smembers(f"{PREFIX}:running"))
        except redis.RedisError:
            return []

    def gateway_in_flight(self) -> int:
        """``framewise_requests_in_flight`` (chat requests, waits on queued completions included)."""
        try:
            text = httpx.get(self.base_url + "/metrics", timeout=2).text
        except httpx.HTTPError:
            return 0
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith(("framewise_requests_in_flight ", "framewise_requests_in_flight{"))))

    def busy(self, fault: Fault, wait_s: float) -> dict:
        """Wait (``wait_s`` at most) until the fault will hit work in flight: a job running for the worker and
        Redis; a chat request in flight on the gateway, and a job running (a queued completion's client may
        be waiting on it). What was in flight."""
        deadline = time.time() + wait_s
        while True:
            jobs = self.running_jobs()
            inflight = self.gateway_in_flight() if fault.service == "gateway" else 0
            hit = bool(jobs) and (fault.service != "gateway" or inflight > 0)
            if hit or time.time() >= deadline:
                return {"jobs_running": jobs, **({"gateway_requests": inflight} if fault.service == "gateway" else {})}
            time.sleep(0.1)


def inject(stack: Stack, fault: Fault, t0: float, busy_wait_s: float = 30.0) -> dict:
    """One fault: injected when its service is ready; its window ends when the service is back."""
    svc = stack.services[fault.service]
    rec = {"fault": fault.name, "service": fault.service, "what": fault.what, "expect_exit": list(fault.expect_exit),
           "start": None, "end": None, "back": False, "exit_code": None, "problems": []}
    if not svc.wait_ready(READY_TIMEOUT_S):
        rec["problems"].append(f"{fault.service} was not ready: fault not injected")
        return rec
    rec["in_flight"] = stack.busy(fault, busy_wait_s)
    proc, incarnation = svc.proc, svc.incarnation
    start = time.time()
    if fault.action == "engine-core":
        core = engine_core(proc.pid)
        if core is None:
            rec["problems"].append(f"no engine core under {fault.service} pid {proc.pid}")
            return rec
        start = time.time()
        core.kill()
        rec["killed_pid"] = core.pid
    elif fault.action == "sigterm":
        proc.send_signal(signal.SIGTERM)  # the main process only, as tini and the kubelet do
    else:
        os.killpg(proc.pid, signal.SIGKILL)
    rec["start"] = start - t0
    say(f"fault {fault.name}: {fault.what} (pid {rec.get('killed_pid', proc.pid)})")
    if fault.name == "gateway-engine-core":  # the gateway reports its dead engine before it goes
        rec["health_after"] = _health_after_engine_death(stack.base_url)
    exit_rec = svc.wait_exit(incarnation, EXIT_TIMEOUT_S)
    if exit_rec is None:
        rec["problems"].append(f"{fault.service} did not exit within {EXIT_TIMEOUT_S:.0f} s")
        return rec
    rec["exit_code"] = exit_rec["exit_code"]
    rec["exited_after_s"] = round(exit_rec["exited_at"] - start, 2)
    exit_rec["fault"] = fault.name
    if exit_rec["exit_code"] not in fault.expect_exit:
        rec["problems"].append(f"{fault.service} exited with {exit_rec['exit_code']}, expected one of "
                               f"{list(fault.expect_exit)}")
    if not svc.wait_back(exit_rec, READY_TIMEOUT_S):
        rec["problems"].append(f"{fault.service} did not come back")
        return rec
    end = exit_rec["ready_at"]
    if fault.service == "redis":  # back = the worker reaches it again
        deadline = time.time() + 120
        while not stack.worker_healthy() and time.time() < deadline:
            time.sleep(0.25)
        if not stack.worker_healthy():
            rec["problems"].append("the worker's /health did not recover after Redis came back")
            return rec
        end = max(end, time.time())
    rec.update(end=end - t0, back=True, window_s=round(end - start, 2))
    say(f"fault {fault.name}: {fault.service} exited with {rec['exit_code']}, back after {rec['window_s']:.1f} s")
    return rec


def _health_after_engine_death(base_url: str) -> str:
    """What ``/health`` answered first after the kill (within 15 s): ``503 engine_dead`` expected."""
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            r = httpx.get(base_url + "/health", timeout=2)
        except httpx.HTTPError:
            return "no answer (exited)"
        if r.status_code != 200:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return f"{r.status_code} {r.json()['error']['code']}"
            return str(r.status_code)
        time.sleep(0.1)
    return "200 (still healthy after 15 s)"


# ---- the ledger -----------------------------------------------------------------------------------------


def read_log(path: Path) -> tuple[list[dict], dict[str, str]]:
    requests, jobs = [], {}
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("kind") == "request":
                    requests.append(rec)
                elif rec.get("kind") == "job":
                    jobs.setdefault(rec["id"], rec["how"])
    return requests, jobs


def all_job_ids(stack: Stack, client_ids) -> list[str]:
    with stack.client() as r:
        return sorted(set(client_ids) | set(r.zrange(f"{PREFIX}:index", 0, -1)))


def wait_final(stack: Stack, client_ids, timeout: float) -> list[str]:
    """Until every job is final (or ``timeout``); the ids still active."""
    deadline = time.time() + timeout
    active: list[str] = []
    while True:
        try:
            ids = all_job_ids(stack, client_ids)
            with stack.client() as r:
                pipe = r.pipeline()
                for job_id in ids:
                    pipe.hget(f"{PREFIX}:job:{job_id}", "status")
                active = [i for i, s in zip(ids, pipe.execute(), strict=True) if s in ("queued", "running")]
        except redis.RedisError as e:
            say(f"waiting for the jobs: Redis: {e}")
        else:
            if not active:
                return []
        if time.time() >= deadline:
            return active
        time.sleep(1)


def job_ledger(stack: Stack, client_jobs: dict[str, str]) -> dict:
    ids = all_job_ids(stack, client_jobs)
    records, problems = [], []
    outcome: Counter = Counter()
    with stack.client() as r:
        for job_id in ids:
            h = r.hgetall(f"{PREFIX}:job:{job_id}")
            error = None
            with contextlib.suppress(ValueError, TypeError):
                error = json.loads(h["error"]) if h.get("error") else None
            rec = {"id": job_id, "how": client_jobs.get(job_id, "not told to its client"),
                   "status": h.get("status"), "attempts": int(h.get("attempts") or 0),
                   "completions": int(h.get("completions") or 0),
                   "error": (error or {}).get("code") if isinstance(error, dict) else error}
            status, n = rec["status"], rec["completions"]
            if status is None:
                verdict = "lost"
            elif status == "succeeded":
                verdict = "succeeded once" if n == 1 else "stored twice" if n > 1 else "succeeded, no completion"
            elif status == "failed":
                verdict = f"failed: {rec['error']}" if rec["error"] and n == 0 else (
                    "failed without a reason" if n == 0 else "failed after a stored completion")
            elif status == "cancelled":
                verdict = "cancelled"  # no client of this run cancels a job
            else:
                verdict = f"stuck ({status})"
            rec["verdict"] = verdict
            outcome[verdict] += 1
            if verdict != "succeeded once" and not verdict.startswith("failed: "):
                problems.append(f"job {job_id} ({rec['how']}): {verdict}")
            records.append(rec)
        dead = int(r.get(f"{PREFIX}:dead:total") or 0)
    return {"accepted": len(ids), "told_to_clients": sum(1 for i in ids if i in client_jobs),
            "not_told_to_clients": sum(1 for i in ids if i not in client_jobs),
            "by_how": dict(Counter(rec["how"] for rec in records)), "outcomes": dict(outcome),
            "exactly_once": sum(1 for rec in records if rec["verdict"] == "succeeded once"),
            "attempts": {str(k): v for k, v in sorted(Counter(rec["attempts"] for rec in records).items())},
            "dead_letters": dead, "problems": problems, "records": records}


def status_label(status: int) -> str:
    return "no response" if not status else str(status)


def request_windows(requests: list[dict], faults: list[dict], t0: float) -> list[dict]:
    """Requests per fault window (a request counts for the first window it overlaps) and outside them."""
    rows = [{"window": f["fault"], "start": f["start"], "end": f["end"]} for f in faults if f.get("start") is not None]
    rows.append({"window": "outside fault windows", "start": None, "end": None})
    for row in rows:
        row.update(requests=0, failed=0, failed_by_status=Counter(), failed_by_code=Counter())
    for q in requests:
        s, e = q["start"] - t0, q["end"] - t0
        row = next((w for w in rows[:-1] if s <= (w["end"] if w["end"] is not None else float("inf"))
                    and e >= w["start"]), rows[-1])
        row["requests"] += 1
        if not q["ok"]:
            row["failed"] += 1
            row["failed_by_status"][status_label(q["status"])] += 1
            row["failed_by_code"][q.get("code") or "(none)"] += 1
    for row in rows:
        row["failed_by_status"] = dict(row["failed_by_status"].most_common())
        row["failed_by_code"] = dict(row["failed_by_code"].most_common())
    return rows


def counts(d: dict) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in d.items()) or "–"


def markdown(ledger: dict) -> str:
    faults = {f["fault"]: f for f in ledger["faults"]}
    lines = ["| fault | injected at | back after | exit status | requests in window | failed | failed by HTTP status "
             "| error codes |", "|---|---:|---:|---:|---:|---:|---|---|"]
    for row in ledger["requests"]["windows"]:
        f = faults.get(row["window"])
        if f is not None:
            name = f"{f['what']}"
            at = f"{f['start']:.0f} s" if f.get("start") is not None else "–"
            back = f"{f['window_s']:.1f} s" if f.get("back") else "**not back**"
            code = f"{f['exit_code']}" if f.get("exit_code") is not None else "–"
        else:
            name, at, back, code = f"({row['window']})", "", "", ""
        lines.append(f"| {name} | {at} | {back} | {code} | {row['requests']} | {row['failed']} | "
                     f"{counts(row['failed_by_status'])} | {counts(row['failed_by_code'])} |")
    j = ledger["jobs"]
    failed = {k: v for k, v in j["outcomes"].items() if k.startswith("failed: ")}
    bad = {k: v for k, v in j["outcomes"].items() if k != "succeeded once" and not k.startswith("failed: ")}
    lines += ["", "| jobs accepted | told to their clients | succeeded exactly once | failed with a reason | lost, stuck, "
              "twice or cancelled | attempts (jobs) | dead letters |", "|---:|---:|---:|---|---|---|---:|",
              f"| {j['accepted']} | {j['told_to_clients']} | {j['exactly_once']} | {counts(failed) if failed else 0} | "
              f"{counts(bad) if bad else 0} | {', '.join(f'{k}: {v}' for k, v in j['attempts'].items()) or '–'} | "
              f"{j['dead_letters']} |"]
    return "\n".join(lines)


# ---- the run --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.chaos", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="the shortest run that still does every fault: 60 s of load, 2 users (make test runs it)")
    ap.add_argument("--run-time", type=float, default=None,
                    help="seconds of load the faults are spread over (default 240, --quick 60); the load goes on "
                         "until the last fault's service is back and a little after")
    ap.add_argument("--users", type=int, default=None, help="locust users (default 3, --quick 2)")
    ap.add_argument("--faults", default=",".join(DEFAULT_FAULTS),
                    help=f"comma list, in order, of: {', '.join(FAULTS)} (default: {','.join(DEFAULT_FAULTS)})")
    ap.add_argument("--settle-s", type=float, default=600.0,
                    help="after the load: how long every accepted job may take to reach a final status")
    ap.add_argument("--redis-down-s", type=float, default=5.0,
                    help="the Redis fault: how long redis-server stays down before its restart (default 5)")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--model-dir", type=Path, default=servers.DEMO_MODEL)
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default loadtests/results/runs/chaos-<time>)")
    args = ap.parse_args(argv)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown or not faults:
        ap.error(f"unknown faults {unknown}; choose from {', '.join(FAULTS)}")
    run_time = args.run_time if args.run_time is not None else (60.0 if args.quick else 240.0)
    users = args.users or (2 if args.quick else 3)
    tail = 10.0 if args.quick else 30.0  # load after the last fault's service is back
    if not (args.model_dir / "config.json").is_file():
        print(f"no checkpoint at {args.model_dir}; run `make demo-model`", file=sys.stderr)
        return 2
    out = (args.out or RESULTS / f"chaos-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("requests.jsonl", "stop", "chaos_ledger.json"):
        (out / stale).unlink(missing_ok=True)

    paths = clips.ensure(list(CHAT_CLIPS))
    long_path = clips.DEFAULT_DIR / LONG_CLIP.filename
    if not long_path.exists():
        say(f"encoding {long_path.name} ({LONG_CLIP.seconds:g} s: its chat completions run as jobs)")
        clips.encode(LONG_CLIP, long_path)
    clip_names = [p.name for p in paths.values()] + [long_path.name]
    clip_server = clips.ClipServer(clips.DEFAULT_DIR)
    stack = Stack(out, args.model_dir.resolve(), clip_server.port, args.redis_down_s)
    started = time.time()
    swarm = None
    ledger: dict = {}
    try:
        say(f"starting redis-server, framewise serve and framewise worker (logs: {stack.logs})")
        stack.start()
        log_path, stop_file = out / "requests.jsonl", out / "stop"
        cmd = [sys.executable, "-m", "loadtests.swarm", "--host", stack.base_url, "--users", str(users),
               "--spawn-rate", str(users), "--run-time", str(run_time * 20 + 3600), "--stop-timeout", "900",
               "--stop-file", str(stop_file), "--out", str(out / "locust"), "--tags", "mixed", "--",
               "--model", servers.MODEL, "--clip-base-url", clip_server.base_url, "--clips", ",".join(clip_names),
               "--long-clip", long_path.name, "--frames", str(args.frames), "--max-tokens", str(args.max_tokens),
               "--request-timeout", "900"]
        pin = ["taskset", "-c", ",".join(map(str, servers.other_cpus()))]
        with open(out / "logs" / "locust.log", "w") as locust_log:
            swarm = subprocess.Popen([*pin, *cmd], cwd=ROOT, stdout=locust_log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "FRAMEWISE_LOCUST_LOG": str(log_path)})
        t0 = time.time()
        say(f"load: mixed profile, {users} users; faults {', '.join(faults)} over {run_time:g} s")
        records, last_end = [], 0.0
        gap = run_time / (len(faults) + 1)
        for i, name in enumerate(faults):
            at = max((i + 1) * gap, last_end + 5.0)
            while time.time() - t0 < at:
                if swarm.poll() is not None:
                    raise RuntimeError(f"locust ended early ({swarm.returncode}); log {out / 'logs' / 'locust.log'}")
                time.sleep(0.2)
            rec = inject(stack, FAULTS[name], t0)
            records.append(rec)
            last_end = rec["end"] if rec.get("end") is not None else time.time() - t0
        load_until = max(run_time, last_end + tail)
        while time.time() - t0 < load_until and swarm.poll() is None:
            time.sleep(0.2)
        stop_file.touch()
        say("load stopping (users finish their task)")
        swarm.wait(timeout=1200)
        stop_file.unlink(missing_ok=True)
        load_s = time.time() - t0
        requests, client_jobs = read_log(log_path)
        say(f"{len(requests)} requests, {len(client_jobs)} job ids told to clients; waiting for every job to end")
        still = wait_final(stack, client_jobs, args.settle_s)
        ledger = build_ledger(stack, records, requests, client_jobs, still, t0, args, run_time, load_s, users,
                              out, started)
    finally:
        if swarm is not None and swarm.poll() is None:
            stop_file = out / "stop"
            stop_file.touch()
            with contextlib.suppress(subprocess.TimeoutExpired):
                swarm.wait(30)
            if swarm.poll() is None:
                swarm.kill()
        stack.close()
        clip_server.close()
    ledger["restarts"] = restarts(stack, ledger.get("t0", started))
    ledger["problems"] += [f"{r['service']} exited with {r['exit_code']} outside any fault"
                           for r in ledger["restarts"] if r["fault"] is None and not r["at_shutdown"]]
    ledger["ok"] = not ledger["problems"]
    ledger["duration_s"] = round(time.time() - started, 1)
    (out / "chaos_ledger.json").write_text(json.dumps(ledger, indent=2))
    table = markdown(ledger)
    (out / "chaos_ledger.md").write_text(table + "\n")
    print("\n" + table + "\n")
    for p in ledger["problems"]:
        print(f"PROBLEM: {p}")
    print(f"{'ledger holds' if ledger['ok'] else 'LEDGER FAILED'}: {out / 'chaos_ledger.json'} "
          f"({ledger['duration_s']:.0f} s in all, {ledger['run']['load_s']:.0f} s of load)")
    return 0 if ledger["ok"] else 1


def build_ledger(stack: Stack, faults: list[dict], requests: list[dict], client_jobs: dict[str, str],
                 still_active: list[str], t0: float, args, run_time: float, load_s: float, users: int, out: Path,
                 started: float) -> dict:
    jobs = job_ledger(stack, client_jobs)
    windows = request_windows(requests, faults, t0)
    summary = {}
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((out / "locust_summary.json").read_text())
    problems = [f"{f['fault']}: {p}" for f in faults for p in f["problems"]]
    problems += jobs["problems"]
    if still_active:
        problems.append(f"{len(still_active)} job(s) still queued or running after {args.settle_s:g} s")
    if jobs["accepted"] == 0:
        problems.append("no job was accepted: the run proved nothing about jobs")
    if not requests:
        problems.append("locust made no request")
    for f in faults:
        f["requests"] = next((w for w in windows if w["window"] == f["fault"]), None)
    return {
        "ok": False, "problems": problems, "t0": t0,
        "run": {"quick": args.quick, "users": users, "run_time_s": run_time, "load_s": round(load_s, 1),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                "startup_s": round(t0 - started, 1), "frames": args.frames, "max_tokens": args.max_tokens,
                "queue_above_s": QUEUE_ABOVE_S, "redis_down_s": args.redis_down_s, "faults": [f["fault"] for f in faults],
                "cpus": os.cpu_count(),
                "load_average": [round(x, 1) for x in os.getloadavg()]},
        "faults": faults,
        "jobs": jobs,
        "requests": {"total": len(requests), "failed": sum(1 for q in requests if not q["ok"]), "windows": windows,
                     "locust": {k: summary.get(k) for k in ("requests", "failures", "duration_s")}},
        "times": "seconds since the load began (t0)",
    }


def restarts(stack: Stack, t0: float) -> list[dict]:
    out = []
    for s in stack.services.values():
        for e in s.exits:
            out.append({"service": e["service"], "incarnation": e["incarnation"], "pid": e["pid"],
                        "exit_code": e["exit_code"], "exited_at": round(e["exited_at"] - t0, 2),
                        "ready_at": round(e["ready_at"] - t0, 2) if e["ready_at"] else None,
                        "fault": e.get("fault"), "at_shutdown": e["at_shutdown"]})
    return sorted(out, key=lambda e: e["exited_at"])


if __name__ == "__main__":
    sys.exit(main())
