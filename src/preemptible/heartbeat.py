"""A progress clock: when this process last made progress (a step boundary, checkpoint bytes
written). Signal escalation reads it to tell a stuck rank from one that is busy saving.

One float per process, set with a plain assignment: cheap enough for every step and every 8 MiB
written, and safe from any thread.
"""

from __future__ import annotations

import time

_last = time.monotonic()


def beat() -> None:
    """Record progress now."""
    global _last
    _last = time.monotonic()


def idle_seconds() -> float:
    """Seconds since the last recorded progress."""
    return time.monotonic() - _last
