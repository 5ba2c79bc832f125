"""What a step's state is beyond model and optimizer: RNG of every kind and this rank's data position.

Per-rank state differs between ranks, so it is saved under a per-rank key as one opaque blob
(DCP would otherwise deduplicate equal keys across ranks as if they were replicated).
"""

from __future__ import annotations

import pickle
import random
from typing import Any

import torch

try:
    import numpy as np
except ImportError:  # numpy is optional for the state itself
    np = None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if np is not None:
        state["numpy"] = np.random.get_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state and np is not None:
        np.random.set_state(state["numpy"])


class RankState:
    """DCP `Stateful`: this rank's RNG and data position, captured when DCP asks for it."""

    def __init__(self, data: Any):
        self.data = data

    def state_dict(self) -> dict[str, Any]:
        return {"blob": pickle.dumps({"rng": rng_state(), "data": self.data.state_dict()})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loaded = pickle.loads(state["blob"])
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
    """DCP `Stateful` for the step counter (identical on every rank)."""

    def __init__(self, step: int = 0):
        self.step = step

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


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
