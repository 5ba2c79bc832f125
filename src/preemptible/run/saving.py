"""How a `Run` saves: periodic saves (every `interval` steps, or at the interval `auto` chooses),
`run.save()`, and the estimate of a save's cost that time limits, grace periods and `auto` use. A
part of `Run` (a mixin)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from preemptible import heartbeat
from preemptible.checkpoint.interval import AutoSchedule, Choice
from preemptible.observe.lifecycle import LIFECYCLE
from preemptible.run.state import state_nbytes

log = logging.getLogger("preemptible.run")

SAVE_OVERHEAD = 0.5  # seconds a save costs beyond writing its bytes (collectives, metadata, the commit)
DEFAULT_WRITE_SPEED = 100e6  # bytes/s assumed where the write-speed probe at start could not run


class Saving:
    """When and how a Run saves (see the module docstring); mixed into `Run`."""

    def save_estimate(self) -> tuple[float, str]:
        """(seconds, basis): how long a save takes. The last measured save; else `save_guess` if
        given; else this rank's state bytes at the write speed measured when the run started, plus
        a fixed SAVE_OVERHEAD (the collectives, the commit)."""
        cp = self.checkpointer
        seconds = self._save_seconds()
        if cp.last_save_seconds is not None:
            return seconds, "the last save took that long"
        if self._stopping.save_guess is not None:
            return seconds, "save_guess"
        speed = cp.write_bytes_per_s or DEFAULT_WRITE_SPEED
        return seconds, (f"no save timed yet: {self._state_bytes / 2**20:.1f} MiB at the {speed / 2**20:.0f} MiB/s "
                         "measured at start")

    def _save_seconds(self) -> float:
        """save_estimate()'s seconds alone (read every step while a time limit is set)."""
        cp = self.checkpointer
        if cp.last_save_seconds is not None:
            return cp.last_save_seconds
        if self._stopping.save_guess is not None:
            return float(self._stopping.save_guess)
        if self._state_bytes is None or not self._bytes_final:  # final once the optimizer holds its state
            self._state_bytes = state_nbytes(self.model, self.optimizer)
            self._bytes_final = self.optimizer is None or bool(self.optimizer.state)
        return SAVE_OVERHEAD + self._state_bytes / (cp.write_bytes_per_s or DEFAULT_WRITE_SPEED)

    def save(self) -> Path:
        """Save now and wait for the commit (collective: every rank calls it)."""
        self._require_entered("save")
        self.last_checkpoint = self._save()
        return self.last_checkpoint

    def _save(self, wait: bool = True) -> Path:
        heartbeat.beat(f"saving step {self.step} (writes, the collectives of the save, the commit)")
        return self.checkpointer.save(self.step, self._dcp, wait=wait)

    def _schedule_saves(self) -> None:
        """interval='auto': from the step the run starts at (after its resume)."""
        cp = self.checkpointer
        if cp.interval == "auto":
            self._schedule = AutoSchedule(cp.interrupt_every, self.dir, self.rank, self.step, self._say_interval)

    def _periodic_save(self) -> None:
        schedule = self._schedule
        if schedule is not None:
            schedule.boundary(self.step, self._save_seconds)
        if not (schedule.due(self.step) if schedule is not None else self.checkpointer.due(self.step)):
            return
        started = time.monotonic()
        self.last_checkpoint = self._save(wait=False)
        if schedule is not None:
            schedule.saved(self.step, time.monotonic() - started)

    def _say_interval(self, choice: Choice) -> None:
        """Rank 0: the interval auto chose, in the log and in metrics.jsonl."""
        if self.rank != 0:
            return
        self.metrics.event("interval", step=self.step, **choice.as_dict())
        log.info("checkpoint interval auto: a save every %d steps (%.1fs; a save costs %.2fs, an interruption "
                 "every %.0fs expected: %s); expected time lost %.2f%%", choice.steps, choice.seconds,
                 choice.save_cost, choice.every, choice.basis, 100 * choice.overhead, extra=LIFECYCLE)

