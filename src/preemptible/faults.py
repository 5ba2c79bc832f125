"""Fault-injection points for the fault suite (tests/faults): inert unless PREEMPTIBLE_FAULTS is set.

PREEMPTIBLE_FAULTS is a JSON list of {"at": POINT, "sleep": SECONDS, "rank": R, "step": N,
"progress": BOOL} ("rank"/"step"/"progress" optional). Points: "step" (after a step, before the
stop check), "load" (before a checkpoint is read), "save" (inside a save: files written, not yet
committed), "final_save" (before the save at a stop or the end), "write" (as each checkpoint file
is opened: a slow disk), "chunk" (after each 8 MiB a checkpoint file writes, before the writer's
own progress beat: a slow disk that the writer's real progress shows). Sleeping is enough to make a rank hang, or to hold a window open for a
signal or a SIGKILL to land in; with "progress" the sleep records progress every 0.1 s, as a
save that is writing does (signal escalation then waits for it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import lru_cache
from typing import Optional


@lru_cache(maxsize=1)
def _faults() -> tuple:
    raw = os.environ.get("PREEMPTIBLE_FAULTS")
    return tuple(json.loads(raw)) if raw else ()


def inject(point: str, step: Optional[int] = None) -> None:
    if not _faults():
        return
    rank = int(os.environ.get("RANK", 0))
    for fault in _faults():
        if fault.get("at") != point or fault.get("rank", rank) != rank:
            continue
        if "step" in fault and fault["step"] != step:
            continue
        print(f"preemptible fault: {point} (step {step}) on rank {rank}: sleeping {fault['sleep']}s",
              file=sys.stderr, flush=True)
        if not fault.get("progress"):
            time.sleep(fault["sleep"])
            continue
        from preemptible import heartbeat

        end = time.monotonic() + fault["sleep"]
        while time.monotonic() < end:
            heartbeat.beat()
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))
