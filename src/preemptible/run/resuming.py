"""How a Run resumes: the checkpoint the lineage chose, loaded into the run's state; a kill found
in the last run's record; a resume on another world size; what a resume cannot know, said once.
A part of `Run` (a mixin), kept apart from the loop."""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch

from preemptible.checkpoint.lineage import Resume
from preemptible.errors import ConfigError, CorruptCheckpointError, in_part
from preemptible.observe.lifecycle import LIFECYCLE
from preemptible.observe.metrics import process_start_time

log = logging.getLogger("preemptible.run")


class Resuming:
    """Mixed into `Run`: everything between finding the checkpoint and the first resumed step."""

    def _resume(self) -> None:
        cp = self.checkpointer
        chosen = self._choose_and_load(sums_while_loading=True)
        if chosen is None:
            return
        resume, marker, load_seconds = chosen
        saved_world = int(marker.get("world_size", 1))
        progress = self._dcp["progress"]
        if saved_world != self.world_size:
            self._continue_on_new_world(progress.loaded, saved_world, marker["lineage"])
        cp.last_committed_step = self.step
        if self.after_resume is not None:
            self.after_resume(marker, resume.path)
        cp.adopt(resume, self.step)
        self.resumed_from = resume.path
        log.info("resumed from %s at step %d (written by %d rank(s), now %d; chosen in %.2fs, loaded in %.2fs%s)",
                 resume.path, self.step, saved_world, self.world_size, resume.verify_seconds, load_seconds,
                 ", every file's checksum checked" if cp.verify else "", extra=LIFECYCLE)
        self._resumed_step = self.step
        self._say_what_a_resume_cannot_know(marker)
        self._record_kill()
        self.metrics.event("resumed", step=self.step, world_size=self.world_size, saved_world_size=saved_world,
                           params_sha256=self._digest(), branched=resume.branched, skipped=resume.skipped,
                           process_started=process_start_time(), entered=self._entered_at,
                           verify_seconds=round(resume.verify_seconds, 4), load_seconds=round(load_seconds, 4),
                           **{"from": str(resume.path)})

    def _choose_and_load(self, sums_while_loading: bool) -> Optional[tuple[Resume, dict[str, Any], float]]:
        """(the decision, its marker, seconds to load it), or None for a fresh start. Chosen by sizes,
        the checksums checked while loading (one read of each file); a file that does not match
        means choosing again with every checksum checked first, so the changed checkpoint is passed
        over as at any other resume."""
        cp = self.checkpointer
        try:
            resume = cp.resume_path(sums_while_loading=sums_while_loading)
        except ConfigError as e:
            raise in_part("checkpoint", e)
        if resume.path is None:
            return None
        marker = cp.marker(resume.path)
        if self.before_resume is not None:
            self.before_resume(marker, resume.path)
        to_load = self._dcp if int(marker.get("world_size", 1)) == self.world_size else {
            k: v for k, v in self._dcp.items() if not k.startswith("rank")}
        started = time.perf_counter()
        try:
            cp.load(resume.path, to_load, checksums=sums_while_loading)
        except CorruptCheckpointError as e:
            if not sums_while_loading:
                raise
            log.warning("%s; choosing the checkpoint to resume from again, every checksum checked first", e)
            return self._choose_and_load(sums_while_loading=False)
        return resume, marker, time.perf_counter() - started

    def _record_kill(self) -> None:
        """The last run ended with no record (killed): say so, at the step it reached, with the steps
        this run does again (from the resume step)."""
        if self._killed_at is None:
            return
        reached, self._killed_at = max(self._killed_at, self.step), None
        # When the killed process was alive, from its last PROGRESS record (`interval='auto'` counts it).
        span = self._killed_progress or {}
        alive = {k: span[v] for k, v in (("alive_from", "since"), ("alive_until", "time"), ("alive_seconds", "up"))
                 if isinstance(span.get(v), (int, float))}
        # At the step the run stands at (trackers take steps in order); `reached`: where the kill was.
        self.metrics.event("killed", step=self.step, reached=reached, signal="killed", redone=reached - self.step,
                           **alive)
        log.warning("the last run ended without a stop (killed, or its machine lost) at step %d; %d step(s) are "
                    "trained again from step %d", reached, reached - self.step, self.step, extra=LIFECYCLE)

    def _say_what_a_resume_cannot_know(self, marker: dict[str, Any]) -> None:
        """One warning each where a resume is legal but may not be what the user meant."""
        if self.rank != 0:
            return
        writer = marker.get("run_dir")
        if isinstance(writer, str) and writer != str(self.dir.absolute()):
            log.warning("resumed a checkpoint written by the run in %s, not this one (%s): another run's "
                        "checkpoint directory, or this one moved; to start fresh, give it a checkpoint directory of its own (checkpoint.dir=)",
                        writer, self.dir.absolute())
        if self.data is not None and not self.feed.saves_position:
            log.warning("data=%s has no state_dict(): it starts again from its beginning; exact only if its only "
                        "state is the RNG that Run restores (a batch function drawing from torch's RNG)",
                        type(self.data).__name__)
        if self.data is None:
            log.warning("data= was not given: data the loop reads on its own starts from its beginning again (its "
                        "position is not saved); pass the loader as data= (and iterate run.batches()) to resume it")

    def _continue_on_new_world(self, loaded: dict[str, Any], saved_world: int, lineage: str) -> None:
        """Per-rank RNG streams and data positions cannot carry over: reseed from (the checkpoint's
        lineage, step, rank), and continue the data where `data.resume_position` can, else restart its epoch."""
        import hashlib
        import random

        self.feed.epoch = int(loaded.get("epoch") or 0)
        position = loaded.get("position")
        if self.data is not None and callable(getattr(self.data, "resume_position", None)) and position is not None:
            self.data.resume_position(position, saved_world)
            how = "the data continues at the same global position"
        else:
            how = f"the data starts epoch {self.feed.epoch} again (data has no resume_position())"
        stream = int.from_bytes(hashlib.sha256(f"{lineage}:{self.step}:{self.rank}".encode()).digest()[:8], "little")
        random.seed(stream)
        torch.manual_seed(stream)
        try:
            import numpy as np

            np.random.seed(stream % 2**32)
        except ImportError:
            pass
        log.warning("world size changed (%d -> %d): model, optimizer, schedule and step are exact; %s; "
                    "RNG streams are reseeded", saved_world, self.world_size, how)

    # -- the loop ---------------------------------------------------------------------------------
