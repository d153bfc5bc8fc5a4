"""A real vLLM engine in its own process, driven by the tests over a local socket.

vLLM must be created under ``__main__`` (it spawns workers), and one engine start
costs ~30 s, so each test session starts one of these per checkpoint variant and
sends every request batch to it.

Protocol (multiprocessing.connection, pickled): the server sends ``("ready",)``;
then for each ``("generate", prompts, sampling_params_dicts)`` it replies
``("ok", results)`` or ``("error", type_name, message)``; ``("stop",)`` ends it.
"""

from __future__ import annotations

import argparse
import json
import os
from multiprocessing.connection import Client


def _plain(output) -> dict:
    """RequestOutput -> plain data (picklable without vLLM on the other side)."""

    def lp(entries):
        if entries is None:
            return None
        return [None if d is None else {int(t): float(v.logprob) for t, v in d.items()} for d in entries]

    comp = output.outputs[0]
    return {
        "prompt_token_ids": list(output.prompt_token_ids),
        "prompt_logprobs": lp(output.prompt_logprobs),
        "token_ids": list(comp.token_ids),
        "logprobs": lp(comp.logprobs),
        "num_cached_tokens": output.num_cached_tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--authkey", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--engine-args", default="{}")
    args = ap.parse_args()

    conn = Client(args.address, authkey=bytes.fromhex(args.authkey))
    try:
        from vllm import SamplingParams

        from framewise.model_plugins.offline import create_llm

        llm = create_llm(args.model, **json.loads(args.engine_args))
    except BaseException as e:
        conn.send(("error", type(e).__name__, str(e)))
        raise
    conn.send(("ready",))
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        _, prompts, params = msg
        try:
            outs = llm.generate(prompts, [SamplingParams(**p) for p in params], use_tqdm=False)
            conn.send(("ok", [_plain(o) for o in outs]))
        except Exception as e:
            conn.send(("error", type(e).__name__, str(e)))
    conn.close()
    # vLLM's engine-core teardown at interpreter exit can abort on CPU; the engine
    # core is a child of this process and exits with it.
    os._exit(0)


if __name__ == "__main__":
    main()
