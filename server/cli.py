"""``framewise`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_DEMO_DIR = Path(".cache/models/tc-llava-demo")


def _exit_without_engine_teardown(code: int = 0) -> None:
    """Stop vLLM's engine processes, then leave without the interpreter's teardown (which can
    abort on CPU). Terminating the engine core lets it stop its own workers."""
    import multiprocessing

    sys.stdout.flush()
    sys.stderr.flush()
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(10)
        if child.is_alive():
            child.kill()
    os._exit(code)


def cmd_demo_model(args: argparse.Namespace) -> int:
    from framewise.model_plugins.reference.demo_checkpoint import write_demo_checkpoint

    if args.shape == "real":
        from framewise.model_plugins.reference.published import write_real_shape

        out, source = write_real_shape(args.arch, args.out, seed=args.seed)
        origin = f", converted from {source} (the published repository's layout)" if source else ""
        print(f"wrote a random {args.arch} checkpoint at the published token geometry to {out}{origin}")
        return 0
    out = write_demo_checkpoint(args.arch, args.out, seed=args.seed)
    print(f"wrote a tiny random {args.arch} checkpoint to {out}")
    return 0


def cmd_selfcheck(args: argparse.Namespace) -> int:
    from framewise.model_plugins.selfcheck import PluginSelfCheckError, check_plugin

    try:
        archs = check_plugin()
    except PluginSelfCheckError as e:
        print(f"framewise selfcheck FAILED: {e}", file=sys.stderr)
        return 1
    print("framewise vLLM plugin OK; architectures: " + ", ".join(archs))
    return 0


def cmd_convert_llava(args: argparse.Namespace) -> int:
    from framewise.model_plugins.convert import llava_to_tc_llava

    out = llava_to_tc_llava(args.src, args.out, gamma=args.gamma, frame_block_mask=not args.no_frame_mask,
                            frame_pooling=args.frame_pooling, num_frames=args.num_frames,
                            max_frames=args.max_frames)
    print(f"wrote TC-LLaVA checkpoint {out} (weights linked from {args.src})")
    return 0


def cmd_convert_qwen2vl(args: argparse.Namespace) -> int:
    from framewise.model_plugins.convert import qwen2vl_to_stave

    out = qwen2vl_to_stave(args.src, args.out, layout=args.layout, seed=args.seed)
    print(f"wrote STAVE checkpoint {out} (Qwen2-VL weights linked from {args.src}; temporal layers zero-initialised)")
    return 0


def cmd_convert_qwen_vl(args: argparse.Namespace) -> int:
    from framewise.model_plugins.convert import RED_VILLM_OPTIONS, qwen_vl_to_red_villm

    try:
        given = {k: getattr(args, k) for k in RED_VILLM_OPTIONS if hasattr(args, k)}
        out = qwen_vl_to_red_villm(args.src, args.out, seed=args.seed,
                                   **{k: v for k, v in given.items() if v is not None or k == "pad_temporal_to"})
    except (ValueError, FileNotFoundError) as e:
        print(f"framewise convert-qwen-vl: {e}", file=sys.stderr)
        return 2
    print(f"wrote RED-VILLM checkpoint {out} (Qwen-VL weights from {args.src}; temporal module freshly "
          f"initialised with seed {args.seed} unless the source held one)")
    return 0


def _frames_or_none(value: str) -> int | None:
    return None if value.lower() in ("none", "null") else int(value)


def cmd_convert_checkpoint(args: argparse.Namespace) -> int:
    from framewise.model_plugins.convert import video_ccam_v10_to_v12

    out = video_ccam_v10_to_v12(args.v10, args.base_llm, args.vision, args.out, num_frames=args.num_frames,
                                max_frames=args.max_frames)
    print(f"wrote Video-CCAM v1.2-layout checkpoint {out} (LoRA adapters merged)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Offline engine demo: sample a real video file, ask the model about it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer
    from vllm import SamplingParams

    from framewise.model_plugins.offline import create_llm
    from framewise.server.video.decode import sample_video
    from framewise.server.video.sampling import FrameSampling
    from framewise.server.video.synth import write_clip

    model = str(args.model)
    if not Path(model, "config.json").is_file():
        print(f"no checkpoint at {model}; run `framewise demo-model --arch tc-llava --out {model}`", file=sys.stderr)
        return 2
    video = args.video
    if video is None:
        video = str(Path(model).parent / "demo-clip.mp4")
        if not Path(video).is_file():
            write_clip(video, frames=96, fps=24, width=320, height=240)
    llm = create_llm(model, max_model_len=4096)
    config = AutoConfig.from_pretrained(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    num_frames = args.frames or config.num_frames
    fps = getattr(config, "fps", None) if not args.frames else None  # STAVE: a rate (2 fps), capped at max_frames
    t0 = time.perf_counter()
    edge = getattr(getattr(config, "vision_config", None), "image_size", None)
    if getattr(config, "model_type", None) == "red_villm":
        edge = config.visual["image_size"]  # as the gateway: frames no smaller than Qwen-VL's square input
    rule = getattr(config, "frame_sampling", None) or "midpoints"
    frames = sample_video(video, FrameSampling(num_frames=None if fps else num_frames, fps=fps, fps_rule=rule),
                          default_frames=num_frames, max_frames=config.max_frames, shortest_edge=edge).frames
    decode_ms = (time.perf_counter() - t0) * 1000
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": args.question}]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    t0 = time.perf_counter()
    [out] = llm.generate([{"prompt": prompt, "multi_modal_data": {"video": frames}}], params, use_tqdm=False)
    gen_ms = (time.perf_counter() - t0) * 1000
    print(json.dumps({
        "model": model, "video": video, "frames": int(frames.shape[0]), "frame_size": list(frames.shape[1:3]),
        "prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(out.outputs[0].token_ids),
        "decode_ms": round(decode_ms, 1), "generate_ms": round(gen_ms, 1), "answer": out.outputs[0].text,
    }, indent=2))
    llm.llm_engine.engine_core.shutdown()
    _exit_without_engine_teardown()


def cmd_serve(args: argparse.Namespace) -> int:
    """The OpenAI-compatible gateway with the engine in-process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from framewise.server.app import create_app
    from framewise.server.http_edges import uvicorn_options
    from framewise.server.lifecycle import run_server
    from framewise.server.logs import configure_logging

    settings = settings_from(args)
    if not Path(settings.model, "config.json").is_file():
        print(f"no checkpoint at {settings.model}; run `framewise demo-model --arch tc-llava --out {settings.model}`",
              file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    from framewise.server.tenants import KeyFileError, KeyRing

    try:
        keys = KeyRing(settings)
    except KeyFileError as e:
        print(f"framewise serve: the API keys file does not parse: {e}", file=sys.stderr)
        return 2
    warn_if_open(settings.host, keys.enabled)
    if not preflight("serve", settings, args):
        return 2
    from framewise.server.engine import Engine

    # SIGTERM: uvicorn closes the listening socket at once (no new connections), lets in-flight requests and
    # streams finish for up to --drain-timeout-s, then cancels what is left and runs the app's shutdown.
    # Clients waiting on queued completions get their job ids at once; jobs run on (server/lifecycle.py).
    # A dead engine: /health 503, then the same shutdown (drain <= 10 s) and exit status 1.
    # uvicorn_options: the request head's size and arrival time, the keep-alive timeout (server/http_edges.py)
    app = create_app(settings, Engine(settings, engine_overrides(args)))
    code = run_server(app, app.state.services.lifecycle, host=settings.host, port=settings.port, log_config=None,
                      access_log=False, log_level=settings.log_level.lower(),
                      timeout_graceful_shutdown=args.drain_timeout_s, **uvicorn_options(settings))
    if code:
        _exit_without_engine_teardown(code)
    return 0


def preflight(command: str, settings, args: argparse.Namespace) -> bool:
    """Before the engine starts (tens of seconds to minutes): the plugin registers on this vLLM and a default
    video of the checkpoint fits the context. Otherwise the reason and the fix on stderr (exit status 2)."""
    from framewise.model_plugins import ALLOW_UNTESTED_VLLM
    from framewise.model_plugins.geometry import VideoDoesNotFit
    from framewise.model_plugins.selfcheck import PluginSelfCheckError, check_plugin
    from framewise.server.engine import check_geometry

    if settings.allow_untested_vllm:
        os.environ[ALLOW_UNTESTED_VLLM] = "1"
    try:
        check_plugin(import_models=False)
        check_geometry(settings, engine_overrides(args))
    except (PluginSelfCheckError, VideoDoesNotFit) as e:
        print(f"framewise {command}: {e}", file=sys.stderr)
        return False
    return True


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def warn_if_open(host: str, keys: bool) -> bool:
    """``serve`` bound to a non-loopback address without API keys: anyone who reaches it may use it (and every
    upload and job is one tenant's). Said loudly: a WARNING log line and on stderr. True when warned."""
    if keys or is_loopback(host):
        return False
    import logging

    message = (f"framewise serve is listening on {host} WITHOUT API KEYS: anyone who can reach it may use the "
               "model and read, use and delete every upload and job. Set --api-key NAME:KEY or --api-keys-file "
               "(development mode is meant for a loopback address).")
    logging.getLogger("framewise.security").warning(message)
    print(f"WARNING: {message}", file=sys.stderr, flush=True)
    return True


def cmd_worker(args: argparse.Namespace) -> int:
    """Engine + job consumer (``--redis-url`` or ``REDIS_URL``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import asyncio
    import signal

    from framewise.server.app import build_services
    from framewise.server.logs import configure_logging

    settings = settings_from(args)
    configure_logging(settings.log_level, settings.log_format)
    if not settings.redis_url:
        print("framewise worker needs --redis-url or REDIS_URL", file=sys.stderr)
        return 2

    if not preflight("worker", settings, args):
        return 2
    from framewise.server.engine import Engine
    from framewise.server.worker_http import WorkerHTTP

    async def run() -> int:
        services = build_services(settings, Engine(settings, engine_overrides(args)))
        http = None
        if args.metrics_port is not None:  # up before the engine loads: /health answers 503 until it is ready
            http = WorkerHTTP(services, args.metrics_host or settings.host, args.metrics_port)
            await http.start()
        try:
            await services.start()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            print(f"framewise worker ready (model {settings.model_name}, queue {settings.redis_url})", flush=True)
            try:
                await services.worker().run(stop, grace_s=args.grace_s)  # returns at once when the engine dies
            finally:
                await services.stop()
        finally:
            if http is not None:
                await http.stop()
        return services.lifecycle.exit_code

    # a dead engine: jobs handed back (no attempt spent), exit status 1: Compose / Kubernetes restart the worker
    _exit_without_engine_teardown(asyncio.run(run()))


ENGINE_COMMANDS = ("serve", "worker")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """vLLM's own engine options (``AsyncEngineArgs.add_cli_args``), grouped as vLLM groups them, shown in
    ``--help``. Flags Framewise already has (``--model``, ``--max-model-len``, ...) keep Framewise's meaning.
    Defaults are suppressed: only what the user typed reaches the engine, over Framewise's defaults
    (``framewise.server.engine.engine_args``)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    vp = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(add_help=False))
    ours = set(p._option_string_actions)
    dests = []
    for vgroup in vp._action_groups:
        actions = [a for a in vgroup._group_actions if a.option_strings and not ours & set(a.option_strings)]
        if not actions:
            continue
        group = p.add_argument_group(f"vLLM engine options: {vgroup.title}")
        for action in actions:
            action.default = argparse.SUPPRESS
            action.required = False
            group._add_action(action)
            dests.append(action.dest)
    p.set_defaults(engine_dests=tuple(dict.fromkeys(dests)))


def engine_overrides(args: argparse.Namespace) -> dict:
    """The vLLM engine options given on the command line (``dest -> value``)."""
    return {d: getattr(args, d) for d in getattr(args, "engine_dests", ()) if hasattr(args, d)}


# Settings fields whose flags have other names too (the command lines deploy/ and users already have)
FLAG_ALIASES = {"api_keys": ("--api-key",), "admin_tenants": ("--admin-tenant",), "worker_concurrency": ("--concurrency",),
                "job_visibility_timeout_s": ("--visibility-timeout-s",), "job_heartbeat_s": ("--heartbeat-s",),
                "job_max_attempts": ("--max-attempts",)}
NOT_FLAGS = ("enable_prefix_caching",)  # vLLM's own engine option (--[no-]enable-prefix-caching) sets it


def add_settings_flags(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`server.settings.Settings` field, named after it (``--max-video-mb``), typed by its
    annotation, described by its description; defaults are the environment's and the field's, so a flag not
    given leaves the setting alone."""
    import types
    import typing

    from framewise.server.settings import Settings

    group = p.add_argument_group("Framewise settings (each also FRAMEWISE_<NAME> in the environment)")
    for name, field in Settings.model_fields.items():
        if name in NOT_FLAGS:
            continue
        default = field.default_factory() if field.default_factory is not None else field.default
        kw: dict = {"dest": name, "default": None,
                    "help": f"{field.description} (default {default!r})" if default not in (None, []) else
                    field.description}
        kind = field.annotation
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None: X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if typing.get_origin(kind) is typing.Annotated:
            kind = typing.get_args(kind)[0]
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            kw["action"] = "append"
        elif typing.get_origin(kind) is typing.Literal:
            kw["choices"] = typing.get_args(kind)
        else:
            kw["type"] = kind
        group.add_argument(*FLAG_ALIASES.get(name, ()), "--" + name.replace("_", "-"), **kw)


def settings_from(args: argparse.Namespace):
    """The settings: the flags given, over ``FRAMEWISE_*`` environment variables, over the defaults."""
    from framewise.server.settings import Settings

    return Settings(**{k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None})


def build_parser(engine_options: bool = False) -> argparse.ArgumentParser:
    """``engine_options``: also accept vLLM's engine options on ``serve``/``worker`` (imports vLLM)."""
    ap = argparse.ArgumentParser(prog="framewise", description="Serve video LLMs on vLLM.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-model", help="write a tiny random checkpoint in the real layout")
    p.add_argument("--arch", required=True, choices=["tc-llava", "video-ccam", "stave", "red-villm"])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", choices=["tiny", "real"], default="tiny",
                   help="real: the published repository's layout, vocabulary, special tokens, chat template and "
                        "token geometry (tiny widths), converted as a user would")
    p.set_defaults(func=cmd_demo_model)

    p = sub.add_parser("selfcheck", help="verify the vLLM plugin registers and its models import")
    p.set_defaults(func=cmd_selfcheck)

    p = sub.add_parser("convert-llava", help="make a llava-hf checkpoint servable as TC-LLaVA")
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--gamma", type=float, default=1.0, help="temporal_rope_gamma (0 = plain RoPE)")
    p.add_argument("--no-frame-mask", action="store_true", help="plain causal attention")
    p.add_argument("--frame-pooling", type=int, default=1, help="per-frame average pooling stride (2 = 2x2)")
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--max-frames", type=int, default=32)
    p.set_defaults(func=cmd_convert_llava)

    p = sub.add_parser("convert-qwen2vl", help="make a Qwen2-VL checkpoint servable as STAVE (zero-init temporal layers)")
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layout", choices=["released", "paper"], default="released",
                   help="temporal_output_layout: released = the authors' write-back (default), paper = frame-major")
    p.add_argument("--seed", type=int, default=0, help="seed of the temporal qkv init")
    p.set_defaults(func=cmd_convert_qwen2vl)

    p = sub.add_parser("convert-qwen-vl", help="make a Qwen-VL(-Chat) checkpoint servable as RED-VILLM "
                                              "(fresh temporal module, tiktoken -> tokenizer.json)")
    p.add_argument("--src", required=True, help="Qwen-VL(-Chat) directory (config.json, weights, qwen.tiktoken)")
    p.add_argument("--out", required=True)
    p.add_argument("--temporal-module", dest="temporal_module", choices=["linear", "mlp2"],
                   help="the new temporal module: linear (default) or mlp2 (Linear, GELU, Linear); "
                        "a source holding one keeps its own")
    p.add_argument("--spatial-path", dest="spatial_path", choices=["adapter", "tokenwise"],
                   help="adapter: Qwen-VL's 256-query adapter on the frame-mean grid (default); tokenwise: a new "
                        "spatial_module on every pooled patch")
    p.add_argument("--pad-temporal-to", dest="pad_temporal_to", type=_frames_or_none, default=argparse.SUPPRESS,
                   help="temporal tokens zero-padded to this many frames (default 100; none = one per frame)")
    p.add_argument("--token-order", dest="token_order", choices=["temporal_first", "spatial_first"],
                   help="temporal_first (default) or spatial_first")
    p.add_argument("--vision-layer", dest="vision_layer", choices=["last", "penultimate"],
                   help="ViT output the video path pools: last (default) or penultimate; images always use the last")
    p.add_argument("--num-frames", dest="num_frames", type=int, help="frames per video by default (default 100)")
    p.add_argument("--max-frames", dest="max_frames", type=int, help="frames per video at most "
                   "(default: --pad-temporal-to)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new modules' init")
    p.set_defaults(func=cmd_convert_qwen_vl)

    p = sub.add_parser("convert-checkpoint", help="Video-CCAM v1.0 (base + LoRA + projector) -> v1.2 layout")
    p.add_argument("--v10", required=True, help="the v1.0 release (projector/, llm_adapter/, visual_encoder_adapter/)")
    p.add_argument("--base-llm", required=True, dest="base_llm", help="its base LLM (exact revision)")
    p.add_argument("--vision", required=True, help="google/siglip-so400m-patch14-384")
    p.add_argument("--out", required=True)
    p.add_argument("--num-frames", type=int, default=16, dest="num_frames")
    p.add_argument("--max-frames", type=int, default=96, dest="max_frames")
    p.set_defaults(func=cmd_convert_checkpoint)

    p = sub.add_parser("serve", help="OpenAI-compatible gateway (flags override FRAMEWISE_* env vars)")
    add_settings_flags(p)
    p.add_argument("--drain-timeout-s", type=float, dest="drain_timeout_s",
                   default=float(os.environ.get("FRAMEWISE_DRAIN_TIMEOUT_S", "30")),
                   help="on SIGTERM: stop accepting, let in-flight requests and streams finish for up to this "
                        "many seconds, then exit (default 30, env FRAMEWISE_DRAIN_TIMEOUT_S)")
    if engine_options:
        add_engine_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="engine + job consumer on Redis (flags override FRAMEWISE_* / REDIS_URL)")
    add_settings_flags(p)
    p.add_argument("--grace-s", type=float, default=30.0, dest="grace_s", help="time to finish jobs on SIGTERM")
    p.add_argument("--metrics-port", type=int, dest="metrics_port",
                   default=int(os.environ["FRAMEWISE_METRICS_PORT"]) if os.environ.get("FRAMEWISE_METRICS_PORT")
                   else None,
                   help="serve /metrics (Prometheus) and /health on this port (env FRAMEWISE_METRICS_PORT)")
    p.add_argument("--metrics-host", dest="metrics_host", help="address for --metrics-port (default: --host setting)")
    if engine_options:
        add_engine_args(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("demo", help="offline engine demo: answer a question about a video file")
    p.add_argument("--model", default=str(DEFAULT_DEMO_DIR))
    p.add_argument("--video", help="video file (default: a generated clip)")
    p.add_argument("--frames", type=int, help="frames to sample (default: the model's num_frames)")
    p.add_argument("--question", default="What happens in this video?")
    p.add_argument("--max-tokens", type=int, default=32)
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    args = build_parser(engine_options=bool(words) and words[0] in ENGINE_COMMANDS).parse_args(argv)
    if args.command.startswith("convert"):  # a source the converter refuses: its reason, not a traceback
        try:
            return args.func(args)
        except (ValueError, FileNotFoundError) as e:
            print(f"framewise {args.command}: {e}", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
