"""The cheap, agreed stop decision: every rank gets the same answer at the same step.

A MAX reduction of one int (not a world-size all_gather, not a rank-0 broadcast: any rank may
be the one that saw the signal). Pipelined by default: the reduction started at call k is read
at call k+1, so the loop never blocks on it, at the price of one step of latency.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
import torch.distributed as dist


# A stop requested by the run itself (time limit), voted like a signal; no signal has this number.
DEADLINE = 200


def reason_name(code: int) -> str:
    import signal

    return "time limit" if code == DEADLINE else signal.Signals(code).name


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


class GradientFlag:
    """The stop flag riding on DDP's gradient all-reduce: no extra collective at all.

    A DDP communication hook appends one element (1.0 if this rank got a signal) to the first
    gradient bucket (DDP caps it at ~1 MB, so the extra copy is tiny) and all-reduces it with the
    gradients it carries; any non-zero sum means some rank got a signal. The value is read after
    the backward that carried it, so a signal is acted on at the same or the next step.
    The same answer on every rank: they all read the same reduced element.
    """

    def __init__(self, local_flag, process_group: Optional["dist.ProcessGroup"] = None):
        self._local_flag = local_flag  # () -> int, read when the bucket is ready
        self.group = process_group
        self.value = 0
        self._last: Optional[torch.Tensor] = None

    def attach(self, ddp_model: torch.nn.Module) -> "GradientFlag":
        ddp_model.register_comm_hook(self, _flag_hook)
        return self

    def reset(self) -> None:
        self.value, self._last = 0, None

    def drain(self) -> None:
        pass  # nothing in flight outside DDP's own backward

    def __call__(self, local: int) -> int:
        if not self.value and self._last is not None:
            self.value = int(self._last.item() > 0)
        return self.value


def _flag_hook(state: GradientFlag, bucket: "dist.GradBucket") -> torch.futures.Future:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    if bucket.index() != 0:
        return allreduce_hook(state.group, bucket)
    world = dist.get_world_size(state.group)
    buf = bucket.buffer()
    flagged = torch.cat([buf.div(world), torch.full((1,), float(state._local_flag() != 0), dtype=buf.dtype,
                                                     device=buf.device)])
    fut = dist.all_reduce(flagged, group=state.group, async_op=True).get_future()

    def split(f: torch.futures.Future) -> torch.Tensor:
        reduced = f.value()[0]
        state._last = reduced[-1:]
        return reduced[:-1]

    return fut.then(split)


# DDP checks the hook's annotations as objects; this module's `from __future__ import annotations` made them strings.
_flag_hook.__annotations__ = {"state": GradientFlag, "bucket": dist.GradBucket,
                              "return": torch.futures.Future[torch.Tensor]}


class Deadline:
    """Stop while there is still time for one more step and one save before the end.

    `end`: Unix time the job is killed (SLURM's end time, or start + trainer.max_time).
    Step durations are measured as the run goes (an EMA); the save's is the last measured one,
    `save_guess` seconds until a save was measured.
    """

    def __init__(self, end: Optional[float], save_guess: float = 30.0, margin: float = 5.0):
        if save_guess < 0 or margin < 0:
            raise ValueError(f"scheduler.save_guess={save_guess} and scheduler.margin={margin} must be >= 0 seconds")
        self.end, self.save_guess, self.margin = end, save_guess, margin
        self.step_seconds = 0.0
        self._last = time.time()

    def step_done(self) -> None:
        now = time.time()
        dt, self._last = now - self._last, now
        self.step_seconds = dt if self.step_seconds == 0.0 else 0.9 * self.step_seconds + 0.1 * dt

    def remaining(self) -> Optional[float]:
        return None if self.end is None else self.end - time.time()

    def expired(self, save_seconds: Optional[float] = None) -> bool:
        """True once the time left no longer covers a step, a save and the margin."""
        left = self.remaining()
        if left is None:
            return False
        save = save_seconds if save_seconds is not None else self.save_guess
        return left < self.step_seconds + save + self.margin
