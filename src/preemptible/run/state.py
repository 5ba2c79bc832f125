"""The pieces of a checkpoint's state: model+optimizer as a DCP Stateful, RNG of every kind as plain
data, and the blob format for per-rank state (`preemptible.run` assembles them).

Per-rank state differs between ranks, so a Run saves it under a per-rank key as one blob (DCP would
otherwise deduplicate equal keys across ranks as if they were replicated). The blob is a
`torch.save` of plain data (ints, floats, strings, lists, dicts, tensors) read back with
`weights_only=True`: loading it never runs code, whoever wrote the file.
"""

from __future__ import annotations

import io
import logging
import random
from typing import Any, Optional

import torch

log = logging.getLogger("preemptible.state")  # the name users filter on (stable across moves)

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


PLAIN = "None, bool, int, float, str, bytes, tensors, and lists, tuples and dicts of these"


_SCALARS = (type(None), bool, int, float, str, bytes)


def _plain_by_type(value: Any, depth: int = 0) -> bool:
    """True for what a blob holds by its exact type alone (scalars, plain tensors, and lists,
    tuples and str-keyed dicts of them): no round trip needed. False means: try one."""
    kind = type(value)
    if kind in _SCALARS or kind is torch.Tensor:
        return True
    if depth > 8:
        return False
    if kind in (list, tuple):
        return all(_plain_by_type(v, depth + 1) for v in value)
    if kind is dict:
        return all(type(k) is str and _plain_by_type(v, depth + 1) for k, v in value.items())
    return False


def check_plain(value: Any, where: str) -> None:
    """ConfigError unless `value` reads back from a blob (what a resume does): the test of
    whether a checkpoint holding it can be resumed at all. Values plain by their type are
    accepted without the round trip (an assignment every step costs next to nothing)."""
    from preemptible.errors import ConfigError

    if _plain_by_type(value):
        return
    try:
        from_blob(to_blob(value), where)
    except Exception:  # noqa: BLE001 -- unpicklable, or not loadable safely (UnsafeCheckpointError)
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ConfigError(f"{where}={shown} ({type(value).__name__}) is not plain data a resume can load; store "
                          f"{PLAIN} (float(x) for a NumPy scalar, x.isoformat() for a datetime)") from None


class PlainValues(dict):
    """`Run.values`: a dict that refuses, at the assignment, a value no resume could load."""

    def __setitem__(self, key: Any, value: Any) -> None:
        if not isinstance(key, str):
            from preemptible.errors import ConfigError

            raise ConfigError(f"run.values key {key!r}: expected a str")
        check_plain(value, f"run.values[{key!r}]")
        super().__setitem__(key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]


class ModelOptimState:
    """DCP `Stateful` for a model and its optimizer (or the model alone) via torch's state-dict
    helpers: one process, DDP and FSDP2 alike."""

    def __init__(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"])
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])


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


def state_nbytes(model: Optional[torch.nn.Module], optimizer: Any = None) -> int:
    """Bytes this rank writes for the model (parameters, buffers) and the optimizer's state: what
    a save's duration is estimated from before one was timed. A DTensor counts its local shard."""
    def size(t: Any) -> int:
        if not torch.is_tensor(t):
            return 0
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    total = 0
    if model is not None:
        total += sum(size(p) for p in model.parameters()) + sum(size(b) for b in model.buffers())
    if optimizer is not None:
        for per_param in optimizer.state.values():
            total += sum(size(v) for v in per_param.values()) if isinstance(per_param, dict) else 0
    return total
