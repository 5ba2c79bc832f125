"""How the model is spread over ranks: DDP (replicated) or FSDP2 (`fully_shard`, sharded)."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from preemptible.distributed import DistEnv, is_distributed
from preemptible.errors import ConfigError

MODES = ("ddp", "fsdp")


def parallelize(model: torch.nn.Module, mode: str, env: DistEnv) -> torch.nn.Module:
    """DDP: every rank holds the whole model, gradients all-reduced. FSDP2: parameters, gradients
    and optimizer state sharded over ranks (each transformer block its own unit); checkpoints are
    sharded too and reshard on load, so a run can resume on a different number of ranks."""
    if mode not in MODES:
        raise ConfigError(f"trainer.parallelism={mode!r}; expected one of {', '.join(MODES)}")
    if mode == "ddp":
        if env.world_size == 1:
            return model
        return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if not is_distributed():
        raise ConfigError("trainer.parallelism=fsdp needs a process group: launch with torchrun "
                          "(torchrun --nproc_per_node=N, N may be 1)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
