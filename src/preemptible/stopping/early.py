"""Signals that arrive while a process is still starting.

Importing torch and building a model take seconds; a TERM, Ctrl-C or SLURM's USR2 arriving then
would take the default action (the process dies, a SLURM job fails instead of being requeued).
`hold_signals()`, called first thing (this module imports nothing heavy, and neither does
`import preemptible`), records them instead. The first DistributedSignalHandler entered takes
them over: the ones it handles count as received at their arrival time (the run stops at its
first step boundary, with a checkpoint); any other is delivered again with its original
disposition. `release_held()` does the latter for all of them (a run without signal handling).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from preemptible.stopping.signals import JOB_ENDING

HELD_SIGNALS = JOB_ENDING

_held: list[tuple[int, float]] = []
_previous: dict[int, Any] = {}


def hold_signals(signals: tuple = HELD_SIGNALS) -> bool:
    """From now on, record `signals` instead of acting on them, until a handler takes them over.
    Main thread only (elsewhere a no-op); signals already ignored stay ignored. True if this call
    began holding any (False: already held, or none to hold)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    began = False
    for s in signals:
        if s in _previous:
            continue
        current = signal.getsignal(s)
        if current is signal.SIG_IGN:
            continue
        _previous[s] = signal.signal(s, _record)
        began = True
    return began


def _record(signum: int, frame: Any) -> None:
    _held.append((signum, time.time()))


def first_held() -> int | None:
    """The first signal held so far, if any (a wait can end on it)."""
    return _held[0][0] if _held else None


def take_held() -> list[tuple[int, float]]:
    """Stop holding: the original dispositions are back; returns what arrived meanwhile (signal, time)."""
    held = list(_held)
    _held.clear()
    for s, previous in _previous.items():
        signal.signal(s, previous if previous is not None else signal.SIG_DFL)
    _previous.clear()
    return held


def redeliver(held: list[tuple[int, float]]) -> None:
    """Send held signals again, now that their original dispositions are back (default: the process ends)."""
    for signum in dict.fromkeys(s for s, _ in held):
        os.kill(os.getpid(), signum)


def release_held() -> None:
    """Stop holding and act on what arrived as if it had never been held."""
    redeliver(take_held())
