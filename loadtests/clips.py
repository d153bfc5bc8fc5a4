"""The load-test clip corpus (generated once, then reused) and a loopback static HTTP server for it.

    python -m loadtests.clips make [--set default] [--dir .cache/clips]
    python -m loadtests.clips serve [--set default] [--dir .cache/clips] [--port 0]

Clips reuse the benchmark's frame makers: flat synthetic frames (``framewise.server.video.synth.frame_pattern``,
each frame's index coded in its pixels, ~50 kbit/s at 720p, cheap to decode) and the textured
panning variant (``framewise.server.video.synth.textured_pattern``, ~5 Mbit/s, the decode cost of real
footage). Keyframe interval (GOP) is a property of a clip: the encoder's default (x264: 250 frames)
or a realistic 2 s / 8 s. 10 min clips are stream-copy concatenations of a 60 s / 40 s one (seconds to
make instead of an hour of encoding on 2 cores; the decoder's work per frame is the same).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_DIR = ROOT / ".cache" / "clips"
IMAGE = "picture.png"


@dataclass(frozen=True)
class ClipSpec:
    name: str
    seconds: float
    width: int = 1280
    height: int = 720
    fps: int = 30
    codec: str = "libx264"  # or "libvpx-vp9"
    textured: bool = False  # 720p only (the benchmark's texture)
    gop_s: float | None = None  # keyframe interval; None = the encoder's default
    base: str | None = None  # made by stream-copy concatenation of this clip ...
    repeat: int = 1  # ... this many times (the other fields describe the result)
    variant: int = 0  # > 0: the same pattern with its colours shifted, so each variant's frames are its own
    preset: str = "veryfast"  # x264's (superfast: 3x quicker to encode, about as costly to decode)

    @property
    def filename(self) -> str:
        return f"{self.name}.{'webm' if 'vp9' in self.codec else 'mp4'}"

    @property
    def frames(self) -> int:
        return int(round(self.seconds * self.fps))


CORPUS: dict[str, ClipSpec] = {s.name: s for s in (
    ClipSpec("short-h264", 4, 320, 240, 24),
    ClipSpec("short-vp9", 4, 320, 240, 24, codec="libvpx-vp9"),
    ClipSpec("60s-h264", 60),
    ClipSpec("60s-vp9", 60, 640, 360, codec="libvpx-vp9"),
    ClipSpec("60s-textured-gop2s", 60, textured=True, gop_s=2),
    ClipSpec("40s-textured-gop8s", 40, textured=True, gop_s=8),
    ClipSpec("10min-h264", 600, base="60s-h264", repeat=10),
    ClipSpec("10min-textured-gop2s", 600, textured=True, gop_s=2, base="60s-textured-gop2s", repeat=10),
    ClipSpec("10min-textured-gop8s", 600, textured=True, gop_s=8, base="40s-textured-gop8s", repeat=15),
    ClipSpec("120min-h264", 7200, base="60s-h264", repeat=120),
)}

SETS: dict[str, list[str]] = {
    "smoke": ["short-h264", "short-vp9"],
    "default": ["short-h264", "short-vp9", "60s-h264", "60s-vp9", "60s-textured-gop2s"],
    "full": [name for name in CORPUS if name != "120min-h264"],
}


def _texture() -> np.ndarray:
    # the same coarse noise as bench/sample_frames.py's textured clip
    return np.random.default_rng(0).integers(0, 256, (196, 336, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)


def encode(spec: ClipSpec, path: Path) -> Path:
    """Encode ``spec`` to ``path`` (written to a temporary name first: an interrupted run leaves no clip)."""
    import av

    from framewise.server.video.synth import frame_pattern, textured_pattern

    if spec.textured and (spec.width, spec.height) != (1280, 720):
        raise ValueError("textured clips are 1280x720")
    tmp = path.with_name(f".{path.name}.part")
    texture = _texture() if spec.textured else None
    total = spec.frames
    with av.open(str(tmp), "w", format="webm" if path.suffix == ".webm" else "mp4") as c:
        s = c.add_stream(spec.codec, rate=spec.fps)
        s.width, s.height, s.pix_fmt = spec.width, spec.height, "yuv420p"
        if "vp9" in spec.codec:
            s.options = {"deadline": "realtime", "cpu-used": "8", "row-mt": "1", "b": "1M"}
        else:
            s.options = {"preset": spec.preset}
        if spec.gop_s:
            s.codec_context.gop_size = int(round(spec.gop_s * spec.fps))
            if "264" in spec.codec:  # a fixed interval: no scene-cut keyframes in between
                s.options = {**s.options, "x264-params": f"keyint={s.codec_context.gop_size}:"
                                                          f"min-keyint={s.codec_context.gop_size}:scenecut=0"}
        for i in range(total):
            rgb = (textured_pattern(i, total, texture) if texture is not None
                   else frame_pattern(i, total, spec.width, spec.height))
            if spec.variant:
                rgb = ((rgb.astype(np.int32) + np.array([0, 37, 11]) * spec.variant) % 256).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    tmp.rename(path)
    return path


def concat(src: Path, times: int, out: Path) -> Path:
    """``src`` repeated ``times`` times by stream copy (ffmpeg's concat demuxer; no re-encoding)."""
    if out.exists():
        return out
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("".join(f"file '{src.resolve()}'\n" for _ in range(times)))
    tmp = out.with_name(f".{out.name}.part{out.suffix}")
    try:
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "concat", "-safe", "0", "-i", f.name, "-c", "copy",
                        str(tmp)], check=True)
    finally:
        os.unlink(f.name)
    tmp.rename(out)
    return out


def distinct_copy(src: Path, out: Path, tag: str) -> Path:
    """The same frames with different bytes (a metadata tag, stream copy): defeats content-hash caches."""
    if out.exists():
        return out
    tmp = out.with_name(f".{out.name}.part{out.suffix}")
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(src), "-c", "copy", "-metadata",
                    f"comment=framewise-copy-{tag}", str(tmp)], check=True)
    tmp.rename(out)
    return out


def ensure(names: list[str], directory: Path = DEFAULT_DIR, log=print) -> dict[str, Path]:
    """Encode the clips that are missing (plus a PNG for image chat); name -> path."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        spec = CORPUS[name]
        path = directory / spec.filename
        if spec.base and not path.exists():
            base = ensure([spec.base], directory, log)[spec.base]
            log(f"clips: {path.name} = {base.name} x {spec.repeat} (stream copy)")
            concat(base, spec.repeat, path)
        elif not path.exists():
            log(f"clips: encoding {path.name} ({spec.seconds:g} s, {spec.width}x{spec.height}, {spec.codec}"
                f"{', textured' if spec.textured else ''}{f', GOP {spec.gop_s:g} s' if spec.gop_s else ''}) ...")
            encode(spec, path)
        out[name] = path
    image = directory / IMAGE
    if not image.exists():
        from PIL import Image

        from framewise.server.video.synth import frame_pattern

        Image.fromarray(frame_pattern(7, 16, 320, 240)).save(image)
    return out


class ClipServer:
    """A static HTTP server for ``directory`` on 127.0.0.1 (a thread of this process)."""

    def __init__(self, directory: Path, port: int = 0):
        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), partial(Quiet, directory=str(directory)))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, filename: str) -> str:
        return f"{self.base_url}/{filename}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.clips", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["make", "serve", "list"])
    ap.add_argument("--set", default="default", help=f"clip set: {', '.join(SETS)}, or a comma list of clip names")
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    names = SETS.get(args.set) or args.set.split(",")
    if args.command == "list":
        for s in CORPUS.values():
            print(f"{s.name:24s} {s.seconds:6g} s  {s.width}x{s.height}  {s.codec:11s} "
                  f"{'textured' if s.textured else 'flat':8s} GOP {f'{s.gop_s:g} s' if s.gop_s else 'default'}")
        return 0
    paths = ensure(names, args.dir)
    if args.command == "make":
        return 0
    server = ClipServer(args.dir, args.port)
    print(f"serving {', '.join(p.name for p in paths.values())} and {IMAGE} at {server.base_url}/", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.thread.join()
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
