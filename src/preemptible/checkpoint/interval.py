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

import logging
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

log = logging.getLogger("preemptible.run")

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


FUTURE_SLACK = 60.0  # seconds a history's time may lie ahead of this machine's clock (clocks differ a little)
MAX_INTERVAL = 3600.0  # seconds: auto never saves less often (unless one save costs more than a tenth of it)


def _number(value: Any) -> Optional[float]:
    return float(value) if is_number(value) and math.isfinite(value) else None


def _time(value: Any, now: float) -> Optional[float]:
    """A wall-clock time from the history, if it can be one: finite, not before 1970, not in the
    future (a clock that was wrong when it was written, a row written by hand)."""
    t = _number(value)
    return t if t is not None and 0.0 <= t <= now + FUTURE_SLACK else None


def _duration(value: Any) -> Optional[float]:
    """A duration measured on the boot clock (`alive_seconds`): finite and not negative."""
    d = _number(value)
    return d if d is not None and d >= 0.0 else None


def _later(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a if b is None else b if a is None else max(a, b)


def _earlier(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a if b is None else b if a is None else min(a, b)


def _alive(rows: list[dict], now: Optional[float] = None) -> tuple[float, int]:
    """(seconds the runs in `rows` were alive, the interruptions among their ends). A run's time
    is what its end measured on the boot clock (`alive_seconds`: how long its process lived, which
    no wall-clock change moves); for rows without it (older runs), from its process's start (the
    `resumed` event's `process_started`; a fresh run's first row) to its last row. A `killed`
    event is written by the next run; it carries the killed run's span from its PROGRESS record
    (`alive_seconds`, `alive_from`, `alive_until`), used where that record is newer than the last
    end (else it is an older run's). Start-ups count: a kill can land in one too. Wall-clock times
    that cannot be right (not finite, negative, in the future) are not read, and the total is never
    more than the time since the first time that can be (how long the run directory has existed);
    an end at such a time is not counted as an interruption."""
    now = time.time() if now is None else now
    alive, count, start, last, ended, first = 0.0, 0, None, None, None, None

    def close(measured: Optional[float]) -> float:
        if measured is not None:
            return measured
        return last - start if start is not None and last is not None and last > start else 0.0

    for row in rows:
        event, t = row.get("event"), _time(row.get("time"), now)
        first = _earlier(first, t)
        if event in COUNTED and row.get("signal") != "time limit" and t is not None:
            count += 1  # an end whose time cannot be right is not counted either: it says nothing of when
        measured = _duration(row.get("alive_seconds"))
        if event == "killed":
            until = _time(row.get("alive_until"), now)
            if until is not None and (ended is None or until > ended):  # the killed run's own record
                last, start = _later(last, until), _earlier(start, _time(row.get("alive_from"), now))
            else:
                measured = None
            t = None  # the next run's time
        if event in ENDS:
            last = _later(last, t)
            alive, ended = alive + close(measured), _later(ended, last)
            start = last = None
        elif event == "resumed":
            alive += close(None)  # a run that left no end (the file's first, or a torn one)
            start, last = _time(row.get("process_started"), now) or t, t
        elif t is not None:
            start, last = _earlier(start, t), _later(last, t)
    alive += close(None)
    return min(alive, max(0.0, now - first) if first is not None else 0.0), count


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


def _history(path: str) -> tuple[float, int]:
    """_alive() over the metrics file at `path`; one that cannot be read is a warning and no history."""
    try:
        return _alive(read_metrics(path) if os.path.lexists(path) else [])
    except Exception as e:  # noqa: BLE001 -- a history is advice: never a reason not to train
        log.warning("interval auto: %s cannot be read (%s); choosing as if the run had no history", path,
                    f"{type(e).__name__}: {e}")
        return 0.0, 0


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
        self._alive, self._count, self._read_at = 0.0, 0, time.monotonic()
        if self._told is None:
            self._alive, self._count = _history(os.path.join(os.fspath(run_dir), METRICS))
        self._steps: deque[float] = deque(maxlen=STEP_SAMPLES)
        self._warm = False
        self.save_cost: Optional[float] = None
        self._last: Optional[float] = None

    def every(self) -> tuple[float, str]:
        """(seconds between interruptions, basis) now: as told, or the history read at start plus
        the time this run has been alive since."""
        if self._told is not None:
            return self._told, "interrupt_every"
        return expected_every(self._alive + max(0.0, time.monotonic() - self._read_at), self._count)

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
        tau = min(tau, max(MAX_INTERVAL, cost / UNSEEN_SAVE_SHARE))
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
