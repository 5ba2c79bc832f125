"""What a step's state is beyond model and optimizer: RNG of every kind and this rank's data position.

Per-rank state differs between ranks, so it is saved under a per-rank key as one blob (DCP would
otherwise deduplicate equal keys across ranks as if they were replicated). The blob is a
`torch.save` of plain data (ints, floats, strings, lists, dicts, tensors) read back with
`weights_only=True`: loading it never runs code, whoever wrote the file.
"""

from __future__ import annotations

import io
import logging
import random
from typing import Any

import torch

log = logging.getLogger(__name__)

try:
    import numpy as np
except ImportError:  # numpy is optional for the state itself
    np = None


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, as plain data (lists, numbers, tensors)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state and np is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def to_blob(obj: Any) -> bytes:
    """Plain data -> bytes that `from_blob` reads back without running code."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_blob(blob: Any, what: str) -> Any:
    from preemptible.errors import UnsafeCheckpointError

    try:
        return torch.load(io.BytesIO(blob), weights_only=True)
    except Exception as e:  # noqa: BLE001 -- an old pickled blob, a crafted one, or garbage
        raise UnsafeCheckpointError(f"{what} is not plain data ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:200] if str(e) else ''}); it was not loaded") from None


class RankState:
    """DCP `Stateful`: this rank's RNG and data position, captured when DCP asks for it."""

    def __init__(self, data: Any):
        self.data = data

    def state_dict(self) -> dict[str, Any]:
        return {"blob": to_blob({"rng": rng_state(), "data": self.data.state_dict()})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loaded = from_blob(state["blob"], "this rank's saved RNG and data position")
        set_rng_state(loaded["rng"])
        self.data.load_state_dict(loaded["data"])


class ModelOptimState:
    """DCP `Stateful` for model + optimizer via torch's state-dict helpers (DDP and FSDP2 alike)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


class Progress:
    """DCP `Stateful`: the step and where the data stream is (identical on every rank), and the
    world size that wrote it, so a resume on another number of ranks can continue the data."""

    def __init__(self, batches: Any = None, world_size: int = 1):
        self.step, self.batches, self.world_size = 0, batches, world_size
        self.loaded: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        data = {"epoch": self.batches.epoch, "seen": self.batches.seen} if self.batches is not None else {}
        return {"step": self.step, "world_size": self.world_size, **data}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.loaded = dict(state)


class TrainState:
    """Everything a checkpoint holds, keyed for DCP; per-rank parts under `rank{r}`."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: Any, batches: Any,
                 rank: int, world_size: int):
        self.rank, self.world_size, self.batches = rank, world_size, batches
        self.progress = Progress(batches, world_size)
        self.dcp = {"model_optim": ModelOptimState(model, optimizer), "lr_schedule": schedule,
                    "progress": self.progress, f"rank{rank}": RankState(batches)}

    def restore(self, checkpointer: Any, path: Any, seed: int) -> int:
        """Load a committed checkpoint, on this world size or another; returns the one that wrote it."""
        saved_world = checkpointer.world_size_of(path)
        checkpointer.load(path, self.to_load(saved_world))
        self.after_load(saved_world, seed)
        checkpointer.last_committed_step = self.progress.step
        if saved_world != self.world_size:
            log.warning("world size changed (%d -> %d): model, optimizer, schedule and step are exact; "
                        "data order and RNG streams differ from an uninterrupted run", saved_world, self.world_size)
        return saved_world

    def to_load(self, saved_world_size: int) -> dict[str, Any]:
        """Same world size: everything. Another: the per-rank parts do not exist for every rank."""
        if saved_world_size == self.world_size:
            return self.dcp
        return {k: v for k, v in self.dcp.items() if not k.startswith("rank")}

    def after_load(self, saved_world_size: int, seed: int) -> None:
        """On a world-size change: continue the data stream, and reseed RNGs (seed, step, rank)."""
        if saved_world_size == self.world_size:
            return
        info = self.progress.loaded
        self.batches.reposition(info["epoch"], info["seen"] * saved_world_size)
        stream = seed * 1_000_003 + self.progress.step * 1009 + self.rank
        random.seed(stream)
        torch.manual_seed(stream)
        if np is not None:
            np.random.seed(stream % 2**32)


def params_sha256(model: torch.nn.Module) -> str:
    """Digest of parameter names and bytes in name order: equal digests mean equal models."""
    import hashlib

    model = getattr(model, "module", model)
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        t = p.detach()
        if hasattr(t, "full_tensor"):  # a DTensor shard (FSDP2): digest the whole parameter
            t = t.full_tensor()
        h.update(name.encode())
        h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
