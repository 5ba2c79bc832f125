"""`Checkpointer(interval="auto")`: the save interval that minimises the expected lost time.

A periodic save costs the loop `C` seconds (what the save blocks it for, measured at each save; before
the first, the state's bytes at the write speed measured at start). An interruption without warning
(SIGKILL, a lost node, a hang) loses on average half an interval of work. With interruptions every
`M` seconds on average, Daly's first-order rule (Young's, refined) gives the interval

    tau = sqrt(2 C M) - C   (for C < 2 M; else M)

and the expected share of time lost is about C / tau + (tau + C) / (2 M). `M` is
`Checkpointer(interrupt_every=)` seconds, or learned from this run directory's history: the time
its runs were alive (each from its process's start to its last record, so a kill during a start-up
adds its time too) over the interruptions they had (stops on a signal or a notice, kills, hangs;
not time limits, which are saved before), this run's time so far included. With none yet, one is
assumed as far ahead as the run directory has been alive (M = that time, which grows as the run
survives), and the interval is kept to at least C / UNSEEN_SAVE_SHARE: before the first
interruption, saves take at most that share of the loop. The interval in steps is tau over the
measured step time.
Rank 0 chooses; every rank takes its choice (saves are collective).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

from preemptible.distributed.env import broadcast_object
from preemptible.names import METRICS
from preemptible.observe.metrics import ENDS, is_number, read_metrics

STEP_SAMPLES = 32  # recent step times whose median is the step time
UNSEEN_SAVE_SHARE = 0.1  # before the first interruption, saves take at most this share of the loop's time
COUNTED = ("preempted", "killed", "hung")  # ends that interrupt (a time limit's stop is planned: not counted)


def daly(cost: float, every: float) -> float:
    """Seconds between saves that minimise expected lost time, to first order."""
    cost, every = max(cost, 1e-6), max(every, 1e-6)
    return every if cost >= 2 * every else math.sqrt(2 * cost * every) - cost


def overhead(tau: float, cost: float, every: float) -> float:
    """Expected share of time lost to saves and to recomputing after interruptions."""
    return cost / tau + (tau + cost) / (2 * every)


def _number(value: Any) -> Optional[float]:
    return float(value) if is_number(value) else None


def _later(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a if b is None else b if a is None else max(a, b)


def _earlier(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a if b is None else b if a is None else min(a, b)


def _alive(rows: list[dict]) -> tuple[float, int]:
    """(seconds the runs in `rows` were alive, the interruptions among their ends). A run's time
    runs from its process's start (the `resumed` event's `process_started`; a fresh run's first
    row) to its last row. A `killed` event is written by the next run, so its own time is not the
    killed run's; it carries the killed run's span from its PROGRESS record (`alive_from`, its
    process start; `alive_until`, its last step), used where that record is newer than the last end
    (else it is an older run's). Start-ups count: a kill can land in one too."""
    alive, count, start, last, ended = 0.0, 0, None, None, None

    def close() -> float:
        return last - start if start is not None and last is not None and last > start else 0.0

    for row in rows:
        event, t = row.get("event"), _number(row.get("time"))
        if event in COUNTED and row.get("signal") != "time limit":
            count += 1
        if event == "killed":
            until = _number(row.get("alive_until"))
            if until is not None and (ended is None or until > ended):  # the killed run's own record
                last, start = _later(last, until), _earlier(start, _number(row.get("alive_from")))
            t = None  # the next run's time
        if event in ENDS:
            last = _later(last, t)
            alive, ended = alive + close(), _later(ended, last)
            start = last = None
        elif event == "resumed":
            alive += close()  # a run that left no end (the file's first, or a torn one)
            start, last = _number(row.get("process_started")) or t, t
        elif t is not None:
            start, last = _earlier(start, t), _later(last, t)
    return alive + close(), count


def expected_every(alive: float, count: int) -> tuple[float, str]:
    """(seconds between interruptions, how it was found) from `alive` seconds with `count` interruptions."""
    if count:
        return alive / count, f"{count} interruption(s) in {alive:.0f}s alive in this run directory"
    return max(alive, 1e-3), (f"no interruption yet in {alive:.0f}s alive in this run directory: one assumed as "
                              f"far ahead, saves kept to {UNSEEN_SAVE_SHARE:.0%} of the time at most")


def learned_every(rows: list[dict]) -> tuple[float, str]:
    """(seconds between interruptions, how it was found) from a run directory's metrics rows: the
    time its runs were alive, start-ups included, over the interruptions they had."""
    return expected_every(*_alive(rows))


@dataclass
class Choice:
    steps: int
    seconds: float
    save_cost: float
    every: float
    overhead: float
    basis: str

    def as_dict(self) -> dict[str, Any]:
        return {"interval_steps": self.steps, "interval_seconds": round(self.seconds, 3),
                "save_cost": round(self.save_cost, 4), "interrupt_every": round(self.every, 1),
                "expected_overhead": round(self.overhead, 5), "basis": self.basis}


class AutoInterval:
    """Rank 0's bookkeeping for interval='auto': the step time, the save cost, the choice."""

    def __init__(self, interrupt_every: Optional[float], run_dir: Any):
        self._told = None if interrupt_every is None else float(interrupt_every)
        self._alive, self._count, self._read_at = 0.0, 0, time.time()
        if self._told is None:
            path = os.path.join(os.fspath(run_dir), METRICS)
            self._alive, self._count = _alive(read_metrics(path) if os.path.exists(path) else [])
        self._steps: deque[float] = deque(maxlen=STEP_SAMPLES)
        self._warm = False
        self.save_cost: Optional[float] = None
        self._last: Optional[float] = None

    def every(self) -> tuple[float, str]:
        """(seconds between interruptions, basis) now: as told, or the history read at start plus
        the time this run has been alive since."""
        if self._told is not None:
            return self._told, "interrupt_every"
        return expected_every(self._alive + max(0.0, time.time() - self._read_at), self._count)

    def unseen(self) -> bool:
        """No interruption told or seen yet: the interval is kept to UNSEEN_SAVE_SHARE of saving."""
        return self._told is None and not self._count

    @property
    def step_seconds(self) -> Optional[float]:
        """The median of the recent steps' times (robust to a slow step: an evaluation, a warm-up)."""
        return statistics.median(self._steps) if self._steps else None

    def step(self, now: float, saved_seconds: float = 0.0) -> None:
        """At a step boundary; `saved_seconds`: what a save at the last boundary blocked the loop
        for (not the step's time). Every step gives a sample, so a run that saves every step still
        learns its step time; the first step after the start (warm-up) gives none."""
        if self._last is not None:
            if self._warm:
                self._steps.append(max(now - self._last - saved_seconds, 1e-6))
            self._warm = True
        self._last = now

    def saved(self, seconds: float) -> None:
        self.save_cost = seconds if self.save_cost is None else max(seconds, 0.5 * self.save_cost + 0.5 * seconds)

    def choose(self, estimate: float) -> Choice:
        """The interval now; `estimate`: the save's cost until one was timed."""
        cost = self.save_cost if self.save_cost is not None else estimate
        every, basis = self.every()
        tau = daly(cost, every)
        if self.unseen():
            tau = max(tau, cost / UNSEEN_SAVE_SHARE)
        steps = max(1, round(tau / self.step_seconds)) if self.step_seconds else 1
        return Choice(steps, tau, cost, every, overhead(tau, cost, every), basis)


FIRST_CHOICE_AFTER = 3  # steps before the first choice (no periodic save before it; the first is warm-up, not timed)


class AutoSchedule:
    """Every rank's side of interval='auto': when saves are due. Rank 0 measures and chooses at
    fixed steps (the first after FIRST_CHOICE_AFTER steps, then the step after each save); one
    broadcast per choice carries it to every rank, so all save at the same steps."""

    def __init__(self, interrupt_every: Optional[float], run_dir: Any, rank: int, start_step: int,
                 say: Any):
        self.rank, self._say = rank, say
        self.auto = AutoInterval(interrupt_every, run_dir) if rank == 0 else None
        self.every: Optional[int] = None
        self.last_save = start_step
        self._choose_at = start_step + FIRST_CHOICE_AFTER
        self._saved_step: Optional[int] = None
        self._save_seconds = 0.0

    def boundary(self, step: int, estimate: Any) -> None:
        """At each step boundary, before `due`; `estimate()`: a save's cost until one is timed."""
        if self.auto is not None:
            self.auto.step(time.monotonic(), self._save_seconds if self._saved_step == step - 1 else 0.0)
        if step != self._choose_at:
            return
        choice = self.auto.choose(estimate()) if self.auto is not None else None
        choice = broadcast_object(choice)
        if choice.steps != self.every:
            self._say(choice)
        self.every = choice.steps

    def due(self, step: int) -> bool:
        return self.every is not None and step - self.last_save >= self.every

    def saved(self, step: int, seconds: float) -> None:
        self.last_save, self._saved_step, self._choose_at = step, step, step + 1
        self._save_seconds = seconds
        if self.auto is not None:
            self.auto.saved(seconds)
