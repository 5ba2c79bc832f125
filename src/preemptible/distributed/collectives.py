"""Collectives the stop decision and the run use: the device a group reduces on (the documented
`get_device`), `all_gather_item` and its future (the documented API's names; re-exported by
`preemptible.signal_handler`)."""

from __future__ import annotations

import collections.abc
from typing import Any, Optional

import torch
import torch.distributed as dist

_WORKING_BACKENDS = "'nccl' (CUDA tensors) and 'gloo' (CPU tensors)"


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _backend_device(backend: str, local_rank: Optional[int]) -> torch.device:
    # A multi-device backend string ("cpu:gloo,cuda:nccl") can reduce CPU tensors: prefer them.
    parts = dict(p.split(":", 1) for p in backend.split(",") if ":" in p)
    if parts.get("cpu") == "gloo" or backend == "gloo":
        return torch.device("cpu")
    if parts.get("cuda") == "nccl" or backend == "nccl":
        return torch.device("cuda") if local_rank is None else torch.device(f"cuda:{local_rank}")
    raise RuntimeError(
        f"unsupported torch.distributed backend {backend!r}: preemptible works with {_WORKING_BACKENDS}"
    )


def get_device(local_rank: Optional[int] = None, *, group: Optional["dist.ProcessGroup"] = None) -> torch.device:
    """Get the appropriate torch device based on the distributed backend.

    `cuda:{local_rank}` (or `cuda`) for 'nccl', `cpu` for 'gloo', as `torch.distributed.get_backend()`
    names the backend of `group` (extension; the default group when None). RuntimeError for any
    other backend (a multi-device string such as 'cpu:gloo,cuda:nccl' included), naming it. `cpu`
    when torch.distributed is not initialized (extension: nothing is communicated then).
    """
    if not dist.is_available():
        return torch.device("cpu")
    try:  # as Automodel does: the backend says, even where only get_backend() says so
        backend = str(dist.get_backend() if group is None else dist.get_backend(group))
    except (ValueError, RuntimeError):
        if _dist_ready():
            raise
        return torch.device("cpu")  # not initialized: nothing is communicated
    if backend == "nccl":
        return torch.device("cuda") if local_rank is None else torch.device(f"cuda:{local_rank}")
    if backend == "gloo":
        return torch.device("cpu")
    raise RuntimeError(f"unsupported torch.distributed backend {backend!r}: get_device() knows 'nccl' and 'gloo'")


def _collective_device(local_rank: Optional[int] = None, group: Any = None) -> torch.device:
    """Where this module's own collectives run: CPU tensors whenever the group's backend can
    reduce them (gloo, or a multi-device backend with a gloo part), else the NCCL device."""
    if not _dist_ready():
        return torch.device("cpu")
    return _backend_device(str(dist.get_backend() if group is None else dist.get_backend(group)), local_rank)


def _to_python(value: Any, like: Any) -> Any:
    for kind in (bool, int, float):
        if type(like) is kind:
            return kind(value)
    return value


class GatherFuture(collections.abc.Sequence):
    """What `all_gather_item(..., async_op=True)` returns: a sequence that waits before it is read.

    `wait()` blocks until the collective finished and returns the list; indexing, iterating,
    `len()` and `==` wait first, so the result can never be read early.
    """

    def __init__(self, work: Any, tensors: list[torch.Tensor], like: Any):
        self._work, self._tensors, self._like = work, tensors, like
        self._values: Optional[list] = None

    def is_completed(self) -> bool:
        return self._values is not None or self._work is None or self._work.is_completed()

    def wait(self) -> list:
        if self._values is None:
            if self._work is not None:
                self._work.wait()
            self._values = [_to_python(t.item(), self._like) for t in self._tensors]
        return self._values

    def __getitem__(self, index):
        return self.wait()[index]

    def __len__(self) -> int:
        return len(self._tensors)

    def __eq__(self, other) -> bool:
        return self.wait() == (list(other) if isinstance(other, collections.abc.Sequence) else other)

    def __repr__(self) -> str:
        return f"GatherFuture({self._values!r})" if self._values is not None else "GatherFuture(<pending>)"


def all_gather_item(
    item: Any,
    dtype: torch.dtype,
    group: Optional["dist.ProcessGroup"] = None,
    async_op: bool = False,
    local_rank: Optional[int] = None,
) -> list[Any]:
    """Perform an all_gather operation on a single Python object.

    One element per rank of `group` (the global group by default), converted back to the
    item's Python type (bools stay bools). `[item]` when torch.distributed is not initialized.
    With `async_op=True` returns a `GatherFuture`: it waits for the collective before any
    value is read.
    """
    if not _dist_ready():
        return GatherFuture(None, [torch.tensor([item], dtype=dtype)], item) if async_op else [item]
    device = _collective_device(local_rank, group)
    mine = torch.tensor([item], dtype=dtype, device=device)
    size = dist.get_world_size() if group is None else dist.get_world_size(group)  # no positional None
    out = [torch.empty_like(mine) for _ in range(size)]
    work = dist.all_gather(out, mine, group=group, async_op=async_op)
    future = GatherFuture(work if async_op else None, out, item)
    return future if async_op else future.wait()


# ----------------------------------------------------------------------------- the handler
