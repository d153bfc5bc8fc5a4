"""Long videos through the gateway (issue 25): TTFT with ``seek`` exact vs keyframe, the file downloaded first vs
read in byte ranges, and the bytes the origin sent.

    .venv/bin/python -m bench.long_video_ttft [--clips 10min-textured-gop2s,10min-textured-gop8s,120min-h264]
                                              [--frames 8,16,32] [--runs 3] [--rate-mbit 1000] [--latency-ms 0]

One ``framewise serve`` (the demo TC-LLaVA checkpoint, ``max_frames`` raised to the largest count asked) pinned to one CPU, with no frame cache and no prefix cache
(every request fetches, decodes and prefills). A loopback origin (aiohttp, in this process, on the other CPU)
serves every clip twice: ``/ranged/NAME`` with byte ranges and a strong ``ETag`` (the gateway reads it in ranges:
``--range-reads-above-mb`` 32, the default) and ``/plain/NAME`` with neither (downloaded whole, as any origin
without ranges is), each at ``--rate-mbit`` (default 1000: a fast network; 0: as fast as loopback goes), counting
the body bytes it sends (``--latency-ms``: a round trip added before every answer). Per clip, frame count, seek mode and origin: the median TTFT of ``--runs`` streamed
requests (``max_tokens`` 1), the bytes served per request, and ``framewise.media``'s fetch and decode ms and
``bytes_read``. Results: ``bench/results/long_video_ttft.json`` and a table in bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests import clips, servers  # noqa: E402

DEFAULT_CLIPS = "10min-textured-gop2s,10min-textured-gop8s,120min-h264"
ARGS = ("--max-video-mb", "4096", "--max-duration-s", "10000", "--queue-above-s", "1000000", "--queue-above-mb",
        "1000000", "--decode-timeout-s", "600", "--fetch-timeout-s", "600", "--frame-cache-mb", "0",
        "--decode-workers", "1")


class Origin:
    """``/ranged/NAME`` (206 to ``Range``, strong ``ETag``, ``If-Match``) and ``/plain/NAME`` (200 only), at
    ``rate`` bytes/s (0: unlimited); ``sent[path]`` counts body bytes written."""

    def __init__(self, root: Path, rate: float, latency_s: float = 0.0):
        self.root, self.rate, self.latency_s, self.sent = root, rate, latency_s, {}
        self.port = servers.free_port()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def url(self, route: str, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{route}/{name}"

    def _run(self, ready: threading.Event) -> None:
        from aiohttp import web

        async def handle(request: web.Request) -> web.StreamResponse:
            route, name = request.match_info["route"], request.match_info["name"]
            if self.latency_s:  # a network round trip before every answer
                await asyncio.sleep(self.latency_s)
            path = self.root / name
            size = path.stat().st_size
            etag = f'"{size:x}-{path.stat().st_mtime_ns:x}"'
            start, end, status, headers = 0, size - 1, 200, {"Content-Type": "video/mp4"}
            if route == "ranged":
                headers |= {"Accept-Ranges": "bytes", "ETag": etag}
                if request.headers.get("If-Match", etag) != etag:
                    return web.Response(status=412)
                asked = request.headers.get("Range")
                if asked and request.headers.get("If-Range", etag) == etag:
                    first, _, last = asked.removeprefix("bytes=").partition("-")
                    start, end, status = int(first), min(size - 1, int(last)) if last else size - 1, 206
                    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            headers["Content-Length"] = str(end - start + 1)
            resp = web.StreamResponse(status=status, headers=headers)
            await resp.prepare(request)
            key = f"/{route}/{name}"
            with open(path, "rb") as f:
                f.seek(start)
                left, t0, done = end - start + 1, time.perf_counter(), 0
                while left > 0:
                    piece = f.read(min(left, 256 << 10))
                    try:
                        await resp.write(piece)
                    except ConnectionResetError:
                        break
                    left -= len(piece)
                    done += len(piece)
                    self.sent[key] = self.sent.get(key, 0) + len(piece)
                    if self.rate:  # paced: never ahead of rate bytes per second
                        ahead = done / self.rate - (time.perf_counter() - t0)
                        if ahead > 0:
                            await asyncio.sleep(ahead)
            return resp

        app = web.Application()
        app.router.add_get("/{route}/{name}", handle)
        runner = web.AppRunner(app)
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        ready.set()
        self.loop.run_forever()


def allow_frames(model: Path, work: Path, frames: int) -> Path:
    """The checkpoint, or a copy of it (weights linked) whose ``max_frames`` admits ``frames``."""
    config = json.loads((model / "config.json").read_text())
    if config.get("max_frames", frames) >= frames:
        return model
    copy = work / model.name
    copy.mkdir()
    for f in model.iterdir():
        (copy / f.name).symlink_to(f.resolve())
    (copy / "config.json").unlink()
    (copy / "config.json").write_text(json.dumps({**config, "max_frames": frames}, indent=2))
    return copy


def ask(base: str, url: str, frames: int, seek: str) -> tuple[float, dict]:
    """TTFT (first content chunk, ms) of one streamed request, and its ``framewise.media[0]``."""
    body = servers.chat_body("framewise", url, frames, max_tokens=1)
    body["messages"][0]["content"][0]["video_url"]["seek"] = seek
    media, ttft, t0 = None, None, time.perf_counter()
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=900) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.read()[:500]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            media = media or (chunk.get("framewise") or {}).get("media")
            choices = chunk.get("choices") or []
            # the first token: content (the demo model's token may decode to nothing: then its finish chunk)
            if ttft is None and any((c.get("delta") or {}).get("content") or c.get("finish_reason") for c in choices):
                ttft = (time.perf_counter() - t0) * 1000
    return ttft, media[0]


LABELS = {"10min-textured-gop2s": "10 min textured, 2 s GOP", "10min-textured-gop8s": "10 min textured, 8 s GOP",
          "120min-h264": "120 min flat, 8.3 s GOP"}


def table(doc: dict) -> str:
    """The README table of a results document: per clip and frame count, median TTFT of each mode and origin, the
    speed-ups, and the share of the file the origin sent when read in ranges."""
    rows = {(r["clip"], r["frames"], r["seek"], r["origin"]): r for r in doc["rows"]}
    out = ["| clip (size) | frames | exact: download / ranges, ms | keyframe: download / ranges, ms "
           "| keyframe + ranges vs exact + download | sent by the origin, ranges: exact / keyframe |",
           "|---|---|---|---|---|---|"]
    for clip, n in dict.fromkeys((r["clip"], r["frames"]) for r in doc["rows"]):
        ed, er, kd, kr = (rows[clip, n, seek, origin] for seek in ("exact", "keyframe")
                          for origin in ("no ranges", "ranges"))
        out.append(f"| {LABELS.get(clip, clip)} ({ed['size_bytes'] / 1e6:.0f} MB) | {n} "
                   f"| {ed['ttft_ms']:.0f} / {er['ttft_ms']:.0f} | {kd['ttft_ms']:.0f} / {kr['ttft_ms']:.0f} "
                   f"| **{ed['ttft_ms'] / kr['ttft_ms']:.1f}×** | {er['served_pct']:.1f} % / {kr['served_pct']:.1f} % |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.long_video_ttft", description=__doc__.split("\n")[0])
    ap.add_argument("--clips", default=DEFAULT_CLIPS)
    ap.add_argument("--frames", default="8,16,32")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate-mbit", type=float, default=1000.0)
    ap.add_argument("--latency-ms", type=float, default=0.0, help="added before every origin answer (a round trip)")
    ap.add_argument("--model", type=Path, default=servers.DEMO_MODEL)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "long_video_ttft.json")
    ap.add_argument("--table", action="store_true", help="print the README table of --out, run nothing")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return 0
    names = args.clips.split(",")
    paths = clips.ensure(names, log=lambda m: print(m, flush=True))
    if not args.model.exists():
        raise SystemExit(f"no checkpoint at {args.model}: make demo-model")
    frames = list(map(int, args.frames.split(",")))
    root = Path(paths[names[0]]).parent
    origin = Origin(root, args.rate_mbit * 1e6 / 8, args.latency_ms / 1000)
    os.sched_setaffinity(0, servers.other_cpus())
    rows = []
    with tempfile.TemporaryDirectory(prefix="fw-ttft-") as work, \
            servers.framewise(allow_frames(args.model, Path(work), max(frames)), Path(work), allowed_hosts=f"127.0.0.1:{origin.port}", args=ARGS,
                              env={"FRAMEWISE_ENABLE_PREFIX_CACHING": "false"}, cpus=[servers.server_cpu()]) as gw:
        ask(gw.base_url, origin.url("plain", paths[names[0]].name), 8, "exact")  # warm-up (compile, first decode)
        for name in names:
            file = paths[name].name
            size = paths[name].stat().st_size
            for n in frames:
                for seek in ("exact", "keyframe"):
                    for route in ("plain", "ranged"):
                        key = f"/{route}/{file}"
                        ttfts, sent, reports = [], [], []
                        for _ in range(args.runs):
                            before = origin.sent.get(key, 0)
                            ttft, media = ask(gw.base_url, origin.url(route, file), n, seek)
                            ttfts.append(ttft)
                            sent.append(origin.sent.get(key, 0) - before)
                            reports.append(media)
                        m = reports[-1]
                        row = {"clip": name, "size_bytes": size, "frames": n, "seek": seek,
                               "origin": "ranges" if route == "ranged" else "no ranges", "read": m["read"],
                               "ttft_ms": round(statistics.median(ttfts), 1), "ttft_runs_ms": [round(t, 1) for t in ttfts],
                               "fetch_ms": statistics.median(r["fetch_ms"] for r in reports),
                               "decode_ms": statistics.median(r["decode_ms"] for r in reports),
                               "bytes_served": int(statistics.median(sent)),
                               "served_pct": round(100 * statistics.median(sent) / size, 2),
                               "bytes_read": m["bytes_read"], "seek_used": m["seek_used"].count("keyframe")}
                        print(json.dumps({k: v for k, v in row.items() if k != "ttft_runs_ms"}), flush=True)
                        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M"), "rate_mbit": args.rate_mbit,
                                    "latency_ms": args.latency_ms,
                                    "server_cpus": 1, "load": os.getloadavg(), "rows": rows}, indent=1))
    print(f"results: {args.out}")
    print(table(json.loads(args.out.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
