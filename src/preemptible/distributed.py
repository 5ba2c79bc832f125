"""torchrun's environment -> process group, and the few collectives the recipe needs."""

from __future__ import annotations

import atexit
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun/SLURM)") from None


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); single process otherwise."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"trainer.device={device!r}; expected auto, cpu or cuda")
    world, rank, local = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is available; use trainer.device=auto or cpu")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    # torchrun (and the SLURM example) set RANK even for one process: FSDP needs a group there too.
    if (world > 1 or "RANK" in os.environ) and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistEnv(rank, world, local, dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank (the identity in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


_GLOO_WORKER = "pt_gloo_runloop"  # the name ProcessGroupGloo gives its worker threads


def _gloo_workers_alive() -> bool:
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:  # no /proc: assume they may be there while torch.distributed is
        return is_distributed()
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith(_GLOO_WORKER):
                    return True
        except OSError:  # that thread has just exited
            pass
    return False


def let_gloo_workers_finish(seconds: float = 0.1) -> None:
    """Hand the GIL to gloo's worker threads once more before the interpreter finalizes.

    A worker releases a finished collective's tensors on its own thread, after the caller has
    moved on; if Python created them it needs the GIL for that. If the interpreter starts
    finalizing first, the thread is killed inside C++ and a run that ended cleanly aborts
    ("terminate called without an active exception", SIGABRT). DDP keeps its process group
    (and its threads) alive past destroy_process_group, so joining them is not an option:
    sleeping releases the GIL and the CPU so that a pending release completes. Runs at exit
    (registered below, before finalization starts); costs `seconds` only while gloo workers exist.
    """
    if _gloo_workers_alive():
        time.sleep(seconds)


atexit.register(let_gloo_workers_finish)
