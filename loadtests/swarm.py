"""Run the locust scenarios headless through locust's library API; write CSV, HTML and a JSON summary.

    python -m loadtests.swarm --host http://127.0.0.1:8000 --tags stream job --users 4 --run-time 60 \\
        --out loadtests/results/run [-- <locustfile options: --clips ... --frames 8 ...>]

Exit status: 0 when every request succeeded, 1 on any failed request or user exception, 3 when no request
was made. Runs in its own process: locust monkey-patches the standard library with gevent on import.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _classes_for(tags: list[str] | None):
    """The user classes with at least one task carrying one of ``tags`` (all classes when no tags)."""
    from locust import User

    from loadtests import locustfile

    classes = [c for c in vars(locustfile).values()
               if isinstance(c, type) and issubclass(c, User) and not c.abstract and c.__module__ == locustfile.__name__]
    if not tags:
        return classes
    return [c for c in classes if any(set(tags) & getattr(t, "locust_tag_set", set()) for t in c.tasks)]


def _write_final_csv(writer) -> None:
    """The CSV writer's loop body once more, after the run (its greenlet writes once a second)."""
    now = time.time()
    writer.requests_csv_filehandle.seek(0)
    writer.requests_csv_filehandle.truncate()
    writer.requests_csv_writer.writerow(writer.requests_csv_columns)
    writer._requests_data_rows(writer.requests_csv_writer)
    writer._stats_history_data_rows(writer.stats_history_csv_writer, now)
    writer.failures_csv_filehandle.seek(0)
    writer.failures_csv_filehandle.truncate()
    writer.failures_csv_writer.writerow(writer.failures_columns)
    writer._failures_data_rows(writer.failures_csv_writer)
    writer.exceptions_csv_filehandle.seek(0)
    writer.exceptions_csv_filehandle.truncate()
    writer.exceptions_csv_writer.writerow(writer.exceptions_columns)
    writer._exceptions_data_rows(writer.exceptions_csv_writer)
    writer.close_files()


def summary(runner) -> dict:
    entries = []
    for (name, method), s in sorted(runner.stats.entries.items()):
        entries.append({
            "type": method, "name": name, "requests": s.num_requests, "failures": s.num_failures,
            "successes": s.num_requests - s.num_failures, "median_ms": s.median_response_time,
            "p95_ms": s.get_response_time_percentile(0.95), "avg_ms": round(s.avg_response_time, 1),
            "max_ms": s.max_response_time, "rps": round(s.total_rps, 3),
        })
    requests = [e for e in entries if e["type"] != "METRIC"]
    return {
        "entries": entries,
        "requests": sum(e["requests"] for e in requests),
        "failures": sum(e["failures"] for e in requests),
        "errors": [{"name": e.name, "method": e.method, "error": str(e.error), "occurrences": e.occurrences}
                   for e in runner.stats.errors.values()],
        "exceptions": [{"msg": x["msg"], "count": x["count"], "traceback": x["traceback"][-800:]}
                       for x in runner.exceptions.values()],
        "duration_s": round(runner.stats.last_request_timestamp - runner.stats.start_time, 1)
        if runner.stats.last_request_timestamp else 0.0,
    }


def run(host: str, tags: list[str] | None, users: int, spawn_rate: float, run_time: float, out: Path,
        locust_args: list[str], stop_timeout: float = 300, stop_file: Path | None = None) -> dict:
    """``stop_file``: the run also ends as soon as this file exists (loadtests/chaos.py ends its load so)."""
    import gevent
    from locust import events
    from locust.argument_parser import parse_options
    from locust.env import Environment
    from locust.html import get_html_report
    from locust.stats import PERCENTILES_TO_REPORT, StatsCSVFileWriter, stats_history

    from loadtests import locustfile

    argv = ["-f", locustfile.__file__, "--host", host, *locust_args]
    if tags:
        argv += ["--tags", *tags]
    options = parse_options(argv)
    classes = _classes_for(tags)
    if not classes:
        raise SystemExit(f"no user class has a task tagged {tags}")
    env = Environment(user_classes=classes, events=events, host=host, parsed_options=options, tags=tags,
                      stop_timeout=stop_timeout, locustfile=locustfile.__file__)
    runner = env.create_local_runner()
    events.init.fire(environment=env, runner=runner, web_ui=None)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = StatsCSVFileWriter(env, PERCENTILES_TO_REPORT, str(out), full_history=True)
    writer_greenlet = gevent.spawn(writer.stats_writer)
    history = gevent.spawn(stats_history, runner)
    runner.start(users, spawn_rate)
    gevent.spawn_later(run_time, runner.quit)  # users finish their current task (stop_timeout)
    if stop_file is not None:
        def watch() -> None:
            while not stop_file.exists():
                gevent.sleep(0.5)
            runner.quit()

        gevent.spawn(watch)
    runner.greenlet.join()
    writer_greenlet.kill()
    history.kill()
    _write_final_csv(writer)
    Path(f"{out}.html").write_text(get_html_report(env, show_download_link=False), encoding="utf-8")
    result = {"host": host, "tags": tags, "users": users, "spawn_rate": spawn_rate, "run_time_s": run_time,
              "user_classes": [c.__name__ for c in classes], **summary(runner)}
    Path(f"{out}_summary.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, locust_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(prog="python -m loadtests.swarm", description=__doc__.split("\n")[0])
    ap.add_argument("--host", required=True)
    ap.add_argument("--tags", nargs="*", default=None, help="scenario tags (default: every user class)")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--spawn-rate", type=float, default=1.0)
    ap.add_argument("--run-time", type=float, default=60.0, help="seconds")
    ap.add_argument("--stop-timeout", type=float, default=300.0, help="seconds users get to finish their task")
    ap.add_argument("--out", type=Path, required=True, help="file prefix: PREFIX_stats.csv, PREFIX.html, ...")
    ap.add_argument("--stop-file", type=Path, default=None,
                    help="end the run early once this file exists (users still finish their task)")
    args = ap.parse_args(own)
    res = run(args.host, args.tags or None, args.users, args.spawn_rate, args.run_time, args.out, locust_args,
              args.stop_timeout, args.stop_file)
    print(f"{res['requests']} requests, {res['failures']} failed, {len(res['exceptions'])} user exceptions "
          f"({args.out}_summary.json)")
    if res["requests"] == 0:
        return 3
    return 1 if res["failures"] or res["exceptions"] else 0


if __name__ == "__main__":
    sys.exit(main())
