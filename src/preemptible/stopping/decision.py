"""What a loop does once every rank agreed to stop: who saw what, whether a save still fits
the grace period, the exit status, and a SLURM requeue. Every decision here is the same on
every rank (rank 0 decides, one broadcast), so no rank is left in a collective alone."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from preemptible.stopping import slurm
from preemptible.distributed.env import broadcast_object
from preemptible.stopping.signal_handler import all_gather_item
from preemptible.stopping.vote import DEADLINE, NOTICE, reason_name

EXIT_NOTICE = 75  # sysexits' EX_TEMPFAIL, "try again later": the machine is going away, the run is not done

log = logging.getLogger("preemptible.preemption")  # the name users filter on (stable across moves)


@dataclass
class Stop:
    code: int                      # a signal number, or DEADLINE
    step: int
    ranks: dict[str, str] = field(default_factory=dict)  # rank -> what it saw
    first_seen: float = math.inf   # earliest signal arrival on any rank (wall time)
    notices: dict[str, dict] = field(default_factory=dict)  # rank -> the notice it saw (Notice.as_dict())
    deadline: Optional[float] = None  # the earliest deadline a notice named (Unix time)

    @property
    def reason(self) -> str:
        """'SIGTERM', 'time limit', 'notice (aws)', ..."""
        if self.code == NOTICE and self.notices:
            return f"notice ({', '.join(sorted({n['source'] for n in self.notices.values()}))})"
        return reason_name(self.code)


def agreed_stop(handler, step: int, notices: Any = None) -> Stop:
    """Two small all_gathers, once: which rank got which signal, and when the first arrived; with
    `notices` (a `preemptible.notices.Notices`, on every rank alike) a third: who saw which notice."""
    by_rank = handler.signals_by_rank()
    first = handler.received[0][1] if handler.received else math.inf
    earliest = min(all_gather_item(first, torch.float64, group=handler.group, local_rank=handler.local_rank))
    stop = Stop(max(by_rank), step, {str(r): reason_name(s) for r, s in enumerate(by_rank) if s}, earliest)
    if notices is not None:
        mine = notices.notice.as_dict() if notices.notice is not None else None
        seen = gather_objects(mine, handler.group)
        stop.notices = {str(r): n for r, n in enumerate(seen) if n}
        for r, n in stop.notices.items():
            stop.ranks[r] = f"notice ({n['source']})"
        deadlines = [n["deadline"] for n in stop.notices.values() if n.get("deadline") is not None]
        stop.deadline = min(deadlines) if deadlines else None
    every = handler.check_interval
    log.info("stop agreed at step %d: %s%s", step, ", ".join(f"rank {r}: {s}" for r, s in stop.ranks.items()),
             f" (agreeing every {every} steps)" if every else "")
    return stop


def save_decision(stop: Stop, grace_period: Optional[float], estimate: float,
                  must_follow: Optional[str] = None) -> tuple[Optional[str], Optional[str]]:
    """(skip, risk) for a stop's save, the same on every rank (rank 0 decides, one broadcast).

    risk: why the save may not finish before the kill (the grace period's end or a notice's
    deadline, against `estimate` seconds), or None. A save cut off by the kill commits nothing,
    so trying loses nothing that skipping would keep: the save is tried anyway. It is skipped
    (skip == risk) only where trying can do harm: `must_follow` names what has to happen after
    the save and before the kill (a SLURM requeue: a job killed mid-save is not requeued).
    """
    risk = None
    if grace_period is not None and math.isfinite(stop.first_seen):
        left = grace_period - (time.time() - stop.first_seen)
        if estimate > left:
            risk = (f"a save takes ~{estimate:.1f}s but only {max(left, 0):.1f}s of the "
                    f"{grace_period:g}s grace period are left")
    if risk is None and stop.deadline is not None:
        left = stop.deadline - time.time()
        if estimate > left:
            source = min(stop.notices.values(), key=lambda n: n.get("deadline") or math.inf)["source"]
            risk = (f"a save takes ~{estimate:.1f}s but the {source} notice's deadline is "
                    f"{'in ' + format(left, '.1f') + 's' if left > 0 else 'past'}")
    skip = f"{risk}, and {must_follow} must follow the save" if risk and must_follow else None
    return broadcast_object((skip, risk))


def gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's `obj` (plain data), in rank order; [obj] without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def end_time(max_time: Any, slurm_time_limit: bool) -> Optional[float]:
    """When this run must be done: start + `max_time` seconds (checked by `Stopping`) and/or SLURM's
    end time."""
    ends = []
    if max_time is not None:
        ends.append(time.time() + max_time)
    if slurm_time_limit and slurm.job_id():
        end = slurm.job_end_time()
        if end:
            ends.append(end)
    return min(ends) if ends else None


def want_requeue(mode: Any) -> bool:
    """`mode`: Stopping's requeue (checked there): 'auto' asks SLURM whether the job allows it."""
    if mode == "auto":
        return slurm.job_id() is not None and slurm.requeue_allowed()
    return bool(mode)


def exit_status(stop: Stop, override: Optional[int]) -> int:
    """128 + signal number like a shell reports a signal death; 124 (as timeout(1)) for a time limit;
    75 (EX_TEMPFAIL) for a notice."""
    if override is not None:
        return int(override)
    if stop.code == NOTICE:
        return EXIT_NOTICE
    return 124 if stop.code == DEADLINE else 128 + stop.code
