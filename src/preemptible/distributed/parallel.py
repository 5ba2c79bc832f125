"""How the model is spread over ranks: DDP (replicated) or FSDP2 (`fully_shard`, sharded)."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from typing import Any, Callable, Optional

from preemptible.distributed.env import DistEnv, is_distributed
from preemptible.errors import ConfigError

MODES = ("ddp", "fsdp")


def parallelize(model: torch.nn.Module, parallelism: str, env: DistEnv, example: Optional[Callable[[], Any]] = None
                ) -> torch.nn.Module:
    """DDP: every rank holds the whole model, gradients all-reduced. FSDP2: parameters, gradients
    and optimizer state sharded over ranks (each transformer block its own unit); checkpoints are
    sharded too and reshard on load, so a run can resume on a different number of ranks.

    example: () -> the model's arguments for one forward (DDP): see `settle_buckets`.
    """
    mode = parallelism
    if mode not in MODES:
        raise ConfigError(f"parallelism={mode!r}; expected one of {', '.join(MODES)}")
    if mode == "ddp":
        if env.world_size == 1:
            return model
        ddp = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        if example is not None:
            settle_buckets(ddp, *example())
        return ddp
    if not is_distributed():
        raise ConfigError("parallelism=fsdp needs a process group: launch with torchrun "
                          "(torchrun --nproc_per_node=N, N may be 1)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def settle_buckets(ddp: DistributedDataParallel, *inputs: Any) -> None:
    """One discarded forward/backward so that DDP's gradient buckets are in their final layout
    before the first real step, in a fresh run and in a resumed one alike.

    DDP all-reduces the first backward in one bucket holding every gradient, then rebuilds its
    buckets (in the order gradients became ready) for every later step. With 3 or more ranks the
    reduction's summation order depends on where an element sits in its bucket, so the first step
    after a resume -- one bucket -- summed differently from the uninterrupted run's same step
    (rebuilt buckets), and the runs drifted apart by an ulp. After this, every step of every run
    uses the rebuilt layout. The RNG states are put back and the gradients dropped: nothing of it
    reaches the model, the optimizer or the random streams.
    """
    from preemptible.run.state import rng_state, set_rng_state

    saved = rng_state()
    out = ddp(*inputs)
    loss = out if isinstance(out, torch.Tensor) else sum(t.float().sum() for t in out if isinstance(t, torch.Tensor))
    loss.float().sum().backward()
    for p in ddp.parameters():
        p.grad = None
    set_rng_state(saved)
