"""The cheap, agreed stop decision: every rank gets the same answer at the same step.

A MAX reduction of one int (not a world-size all_gather, not a rank-0 broadcast: any rank may
be the one that saw the signal). Pipelined by default: the reduction started at call k is read
at call k+1, so the loop never blocks on it, at the price of one step of latency.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


class AgreedMax:
    """MAX of a small non-negative int across `group`, sticky once non-zero.

    Every rank must call it the same number of times. With `every=N` a reduction is issued on
    every N-th call only (the others return the last agreed value); with `pipelined=True` the
    value read at a call is the one reduced at the previous reduction call.
    """

    def __init__(self, group: Optional["dist.ProcessGroup"] = None, every: int = 1, pipelined: bool = True,
                 device: Optional[torch.device] = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"check_every={every!r}; expected an int >= 1 (1 = every step)")
        self.group, self.every, self.pipelined = group, every, pipelined
        self.device = device or torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        self.value = 0
        self.calls = 0
        self._work: Any = None
        self._buf: Optional[torch.Tensor] = None

    def _ready(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def _collect(self) -> None:
        if self._work is not None:
            self._work.wait()
            self.value = max(self.value, int(self._buf.item()))
            self._work, self._buf = None, None

    def drain(self) -> None:
        """Finish an in-flight reduction (before other collectives on the group, or release)."""
        self._collect()

    def __call__(self, local: int) -> int:
        self.calls += 1
        if not self._ready():
            self.value = max(self.value, int(local))
            return self.value
        if self.value or self.calls % self.every:
            return self.value  # decided already (same on every rank), or not a reduction call
        buf = torch.tensor([int(local)], dtype=torch.int32, device=self.device)
        if self.pipelined:
            self._collect()
            self._work = dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
            self._buf = buf
        else:
            dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group)
            self.value = max(self.value, int(buf.item()))
        return self.value
