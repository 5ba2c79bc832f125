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
    if kind in _SCALARS or kind is torch.Tensor or kind in (PlainList, PlainDict, PlainValues):
        return True  # a checked container: every item in it was checked as it was put there
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


def _refuse(where: str, what: str) -> None:
    from preemptible.errors import ConfigError

    raise ConfigError(f"{where}: {what}")


def adopt(value: Any, where: str) -> Any:
    """`value` as `run.values` keeps it: checked (ConfigError naming `where` unless a resume can load
    it), with every list and dict in it copied into a checked one (PlainList, PlainDict), so a change
    made later through `run.values` is checked where it is made. Tuples are rebuilt around their
    checked items; anything else plain is kept as it is."""
    kind = type(value)
    if kind in (list, PlainList):
        return PlainList(where, value)
    if kind in (dict, PlainDict):
        return PlainDict(where, value)
    if kind is tuple:
        return tuple(adopt(v, f"{where}[{i}]") for i, v in enumerate(value))
    check_plain(value, where)
    return value


def unwrap(value: Any) -> Any:
    """A copy of `value` with every PlainList/PlainDict made a plain list/dict again (what a blob
    holds: a checkpoint names no class of ours)."""
    kind = type(value)
    if kind in (list, PlainList):
        return [unwrap(v) for v in value]
    if kind in (dict, PlainDict, PlainValues):
        return {k: unwrap(v) for k, v in value.items()}
    if kind is tuple:
        return tuple(unwrap(v) for v in value)
    return value


class PlainList(list):
    """A list inside `run.values`: every item put in it, however (append, extend, insert, +=, an
    index or a slice), is checked and adopted, and refused (ConfigError) where it is put."""

    __slots__ = ("_where",)

    def __init__(self, where: str, items: Any = ()):
        self._where = where
        super().__init__(adopt(v, f"{where}[{i}]") for i, v in enumerate(items))

    def _item(self, value: Any, index: Any = None) -> Any:
        return adopt(value, f"{self._where}[{len(self) if index is None else index}]")

    def __setitem__(self, index: Any, value: Any) -> None:
        if isinstance(index, slice):
            label = f"{'' if index.start is None else index.start}:{'' if index.stop is None else index.stop}"
            value = [self._item(v, label) for v in value]
        else:
            value = self._item(value, index)
        super().__setitem__(index, value)

    def append(self, value: Any) -> None:
        super().append(self._item(value))

    def insert(self, index: Any, value: Any) -> None:
        super().insert(index, self._item(value, index))

    def extend(self, values: Any) -> None:
        super().extend([self._item(v, len(self) + i) for i, v in enumerate(list(values))])

    def __iadd__(self, values: Any) -> "PlainList":
        self.extend(values)
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:  # copy and pickle as the plain list it stands for
        return (list, (unwrap(self),))


class PlainDict(dict):
    """A dict inside `run.values` (and `run.values` itself): every value put in it, however
    (`d[k] = v`, update, setdefault, |=), is checked and adopted, and refused where it is put."""

    _keys_are_names = False

    def __init__(self, where: str, items: Any = ()):
        super().__init__()
        self._where = where
        self.update(items)

    def _key(self, key: Any) -> str:
        if self._keys_are_names and not isinstance(key, str):
            _refuse(f"{self._where} key {key!r}", "expected a str")
        if type(key) is not str:
            check_plain(key, f"{self._where} key")
        return f"{self._where}[{key!r}]"

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, adopt(value, self._key(key)))

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def __ior__(self, other: Any) -> "PlainDict":
        self.update(other)
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (dict, (unwrap(self),))


class PlainValues(PlainDict):
    """`Run.values`: a dict of plain data that refuses, where the change is made, anything a resume
    could not load: an assignment, update, setdefault, |=, and changes inside its lists and dicts
    (it keeps its own checked copy of each list and dict it is given)."""

    _keys_are_names = True

    def __init__(self, items: Any = ()):
        super().__init__("run.values", items)


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
