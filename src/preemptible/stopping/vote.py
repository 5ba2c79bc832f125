"""The cheap, agreed stop decision: every rank gets the same answer at the same step.

A MAX reduction of two ints, the flag and an interval proposal (not a world-size all_gather,
not a rank-0 broadcast: any rank may be the one that saw the signal). Pipelined: the reduction
started at one check is read at the next, so the loop never blocks on it; issued only as often
as the latency budget needs, so its cost vanishes next to the steps between.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
import torch.distributed as dist


# Stops requested by the run itself, voted like a signal; no signal has these numbers. Several at
# once: the MAX wins (a notice over a time limit over a signal).
DEADLINE = 200  # a time limit (trainer.max_time, SLURM's end time) is near
NOTICE = 201    # a preemption notice: a cloud's spot notice, a stop file (preemptible.notices)


def reason_name(code: int) -> str:
    import signal

    if code == DEADLINE:
        return "time limit"
    if code == NOTICE:
        return "notice"
    return signal.Signals(code).name


class StepClock:
    """The typical time between calls (an EMA); one long gap (a save, an eval) moves it at most 2x."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._last: Optional[float] = None

    def tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            dt = now - self._last
            if self.seconds:
                dt = min(dt, 2 * self.seconds)
            self.seconds = dt if self.seconds == 0.0 else 0.8 * self.seconds + 0.2 * dt
        self._last = now


class AgreedMax:
    """MAX of a small non-negative int across `group`, sticky once non-zero.

    Every rank must call it the same number of times (once per step). A reduction is issued on
    every `every`-th call only; the calls between return the last agreed value. Pipelined, the
    value read at a reduction call is the one reduced at the previous reduction call.

    `every="auto"`: the interval adapts so that a stop comes within `max_latency` seconds of a
    signal (<= 2 intervals) while reducing as rarely as that allows. Each rank measures its own
    step time and proposes an interval; the proposals ride in the same reduction (MAX of the
    negated value = the smallest proposal), so every rank switches to the same interval at the
    same call and the ranks stay in lockstep.
    """

    def __init__(self, group: Optional["dist.ProcessGroup"] = None, every: Any = 1, pipelined: bool = True,
                 device: Optional[torch.device] = None, max_latency: float = 1.0):
        if every != "auto" and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"check_every={every!r}; expected an int >= 1 (1 = every step) or 'auto'")
        from preemptible.checks import seconds

        seconds("max_latency", max_latency, strict=True)
        self.group, self.auto, self.pipelined, self.max_latency = group, every == "auto", pipelined, max_latency
        self.fixed = 1 if self.auto else every
        self.device = device or torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        self.value = 0
        self.calls = 0
        self.every = self.fixed  # the agreed interval now (identical on every rank)
        self._next = self.every  # the call that issues the next reduction
        self._clock = StepClock()
        self._work: Any = None
        self._buf: Optional[torch.Tensor] = None

    def _ready(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def _proposal(self) -> int:
        if not self.auto or self._clock.seconds <= 0:
            return self.fixed
        # A signal waits for the next reduction (<= 1 interval) and its result (1 more), plus the
        # step it landed in: a third of the budget per interval leaves room for slower steps.
        return max(1, min(10_000, int(self.max_latency / (3 * self._clock.seconds))))

    def _apply(self, reduced: torch.Tensor) -> None:
        flag, neg_every = (int(v) for v in reduced.tolist())
        self.value = max(self.value, flag)
        self.every = -neg_every

    def _collect(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._apply(self._buf)
            self._work, self._buf = None, None

    def drain(self) -> None:
        """Finish an in-flight reduction (before other collectives on the group, or release)."""
        self._collect()

    def __call__(self, local: int, force: bool = False) -> int:
        """force: reduce at this call regardless of the interval (every rank must pass the same)."""
        self.calls += 1
        if not self._ready():
            self.value = max(self.value, int(local))
            return self.value
        if self.auto and not force:
            self._clock.tick()  # the interval is measured on the regular (step) calls only
        if self.value or (self.calls < self._next and not force):
            return self.value  # decided already (same on every rank), or not a reduction call
        buf = torch.tensor([int(local), -self._proposal()], dtype=torch.int64, device=self.device)
        if self.pipelined:
            self._collect()
            self._work = dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
            self._buf = buf
        else:
            dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group)
            self._apply(buf)
        self._next = self.calls + self.every
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
    Step durations are measured as the run goes (an EMA); `expired(save_seconds)` is given the
    save's estimate (the last measured save, else one from the state's bytes and the measured
    write speed: `Run.save_estimate()`).
    """

    def __init__(self, end: Optional[float], margin: float = 5.0):
        from preemptible.checks import seconds

        seconds("margin", margin)
        self.end, self.margin = end, margin
        self.step_seconds = 0.0
        self._last = time.time()

    def step_done(self) -> None:
        now = time.time()
        dt, self._last = now - self._last, now
        self.step_seconds = dt if self.step_seconds == 0.0 else 0.9 * self.step_seconds + 0.1 * dt

    def remaining(self) -> Optional[float]:
        return None if self.end is None else self.end - time.time()

    def expired(self, save_seconds: float = 0.0) -> bool:
        """True once the time left no longer covers a step, a save and the margin."""
        left = self.remaining()
        if left is None:
            return False
        return left < self.step_seconds + save_seconds + self.margin
