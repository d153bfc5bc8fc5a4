"""A checkpoint loaded into a plugin model by vLLM's own loader, without an engine.

vLLM's loader builds the model class the checkpoint's architecture names (under the checkpoint's ``VllmConfig``)
and streams the weights into its ``load_weights``: what an engine start does before it profiles memory, builds
the KV cache and warms up, at a fraction of the cost. Used to show that a checkpoint that does not fit fails the
load with a message naming the keys. Runs in the test process (one single-rank gloo group for the session).
"""

from __future__ import annotations

import torch

_group: list[bool] = []


def _distributed() -> None:
    """vLLM's parallel layers ask the (single-rank) tensor-parallel group for their shard."""
    if _group:
        return
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    from tests.gateway_support import free_port

    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
    initialize_model_parallel(1, 1)
    _group.append(True)


def load_checkpoint(model_dir: str, **engine_args) -> torch.nn.Module:
    """The model vLLM would serve for ``model_dir``, its weights loaded; raises what ``load_weights`` raises."""
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.utils.torch_utils import set_default_torch_dtype

    from framewise import model_plugins

    model_plugins.register()
    config = EngineArgs(model=str(model_dir), **{"max_model_len": 2048, "enforce_eager": True, "dtype": "float32",
                                                 **engine_args}).create_engine_config()
    with set_current_vllm_config(config):
        _distributed()
        loader = get_model_loader(config.load_config)
        with set_default_torch_dtype(config.model_config.dtype), torch.device("cpu"):
            model = loader.create_model(vllm_config=config, model_config=config.model_config)
        loader.load_weights(model, config.model_config)
    return model
