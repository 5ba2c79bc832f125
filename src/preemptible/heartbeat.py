"""A progress clock: when this process last made progress (a step boundary, a stop check, checkpoint
bytes written, `Run.heartbeat()`), how many times, and the phase it is in. Signal escalation and
the watchdog read it to tell a stuck rank from one that is busy.

Plain assignments to module globals: cheap enough for every step and every 8 MiB written, and
safe from any thread (a reader sees the old value or the new one).
"""

from __future__ import annotations

import time
from typing import Optional

_last = time.monotonic()
_count = 0
_longest = 0.0  # the longest pause between two beats since reset_longest()
_discount = 0.0  # seconds of the current pause the process spent stopped (a suspension): not a pause
_phase = "starting"
_phase_step: Optional[int] = None


def beat(phase: Optional[str] = None, step: Optional[int] = None) -> None:
    """Record progress now (and, if given, the phase the process enters: a str.format template
    with `{step}` filled from `step` only when the phase is read, never on the training step)."""
    global _last, _count, _longest, _phase, _phase_step, _discount
    now = time.monotonic()
    if now - _last - _discount > _longest:
        _longest = now - _last - _discount
    _last, _count, _discount = now, _count + 1, 0.0
    if phase is not None:
        _phase, _phase_step = phase, step


def set_phase(phase: str, step: Optional[int] = None) -> None:
    """Name what the process does from now on (no progress recorded); `step` as in beat()."""
    global _phase, _phase_step
    _phase, _phase_step = phase, step


def phase() -> str:
    return _phase.format(step=_phase_step) if _phase_step is not None else _phase


def count() -> int:
    """Beats so far: changes whenever progress is made."""
    return _count


def idle_seconds() -> float:
    """Seconds since the last recorded progress, less the time the process spent stopped since."""
    return max(0.0, time.monotonic() - _last - _discount)


def suspended(seconds: float) -> None:
    """The process was stopped for `seconds` (SIGSTOP, a SLURM suspend, a paused VM): they count
    neither as idle time nor as a pause."""
    global _discount
    _discount += max(0.0, seconds)


def longest_pause() -> float:
    """The longest pause between two beats since `reset_longest()`."""
    return _longest


def reset_longest() -> None:
    global _longest
    _longest = 0.0
