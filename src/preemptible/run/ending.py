"""How a `Run` ends: the last save (a stop's, within the grace period or a notice's deadline, or
the end's), the record of the end, the release of what it held, the SLURM requeue, a late signal
after the end, and the exit with the run's status. A part of `Run` (a mixin), kept apart from
how it begins and trains."""

from __future__ import annotations

import logging
import time
from typing import Any

from preemptible import faults, heartbeat
from preemptible.stopping import slurm
from preemptible.checkpoint.writer import Checkpointer
from preemptible.distributed.env import barrier, exit_run, is_distributed, let_gloo_workers_finish
from preemptible.errors import CheckpointError, first_line
from preemptible.observe.lifecycle import LIFECYCLE
from preemptible.stopping.decision import Stop, exit_status, save_decision, want_requeue
from preemptible.stopping.vote import reason_name
from preemptible.stopping.watchdog import peer_lost

log = logging.getLogger("preemptible.run")


class Ending:
    """The end of a run (see the module docstring); mixed into `Run`."""

    # -- leaving: the last save, the exit status ----------------------------------------------

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._entered or self.metrics is None or self._left:
            return None
        self._left = True
        if exc is not None:
            self._end_if_peer_lost(exc)
        try:
            if exc_type is None:
                try:
                    self._finish()
                except Exception as e:
                    self._end_if_peer_lost(e)
                    raise
            else:
                log.error("the loop raised %s: no final save; the last committed checkpoint (%s) stays the "
                          "one to resume from", exc_type.__name__, self.checkpointer.head or "none")
                self.exit_code = 1
                self.metrics.event("failed", step=self.step, error=exc_type.__name__,
                                   checkpoint=self.checkpointer.head)
        finally:
            self._leave(clean=exc_type is None)
        return None

    def _end_if_peer_lost(self, exc: BaseException) -> None:
        """A collective failed because a peer died or stopped answering: end this rank as the watchdog
        does (the record, one line, status 86), before anything else touches the broken group."""
        if self._ender is not None and is_distributed() and peer_lost(exc):
            if self._watcher is not None:
                self._watcher.stop()
            self._ender.end("peer lost", f"a collective failed: {first_line(exc).split('. ')[0]}", exc)

    def _finish(self) -> None:
        cp = self.checkpointer
        heartbeat.beat(f"the last save, at step {self.step}")
        faults.inject("final_save", self.step)
        if self.stop is None:
            self.last_checkpoint = self._save()
            self.metrics.event("done", step=self.step, params_sha256=self._digest(always=self.report.param_digests != False),
                               checkpoint=str(self.last_checkpoint))
            if self._resumed_step == self.step and self.max_steps is not None and self.step >= self.max_steps:
                log.info("already finished at step %d (checkpoint %s): nothing to train", self.step,
                         self.last_checkpoint, extra=LIFECYCLE)
            else:
                log.info("done at step %d; checkpoint %s", self.step, self.last_checkpoint, extra=LIFECYCLE)
            if self.handler is not None and self.handler.received:
                log.info("%s arrived after the last step: the run is complete and committed, nothing to stop",
                         reason_name(self.handler.received[0][0]))
            self.exit_code = 0
            return
        stop = self.stop
        estimate, basis = self.save_estimate()
        requeue = self.rank == 0 and self._wants_requeue()
        skipped, risk = save_decision(stop, self._stopping.grace_period, estimate, "a SLURM requeue" if requeue else None)
        if risk and not skipped:
            log.warning("%s (%s); saving anyway: a save cut off by the kill commits nothing, and the last "
                        "committed checkpoint stays the one to resume from", risk, basis)
        self.last_checkpoint = None if skipped else self._save()
        extra: dict[str, Any] = ({"save_skipped": skipped} if skipped else
                                 {"save_seconds": round(cp.last_save_seconds or 0.0, 4)})
        if cp.uploader is not None and self.last_checkpoint is not None:
            extra["uploaded"] = self._wait_upload(stop, cp)
        if stop.notices:
            extra["notices"] = stop.notices
            extra["seconds_since_notice"] = round(time.time() - min(n["seen"] for n in stop.notices.values()), 3)
        self.metrics.event("preempted", step=self.step, signal=stop.reason, ranks=stop.ranks, mid_step=self._mid_step,
                           params_sha256=self._digest(), checkpoint=str(self.last_checkpoint) if self.last_checkpoint
                           else None, **extra)
        again = ("run the same command to resume" if cp.resume != "never"
                 else "run it again with resume='auto' to resume")
        if skipped:
            log.warning("stopped at step %d on %s without saving: %s; the resume starts from %s (%s)",
                        self.step, stop.reason, skipped, cp.head or "scratch", again, extra=LIFECYCLE)
        else:
            log.info("stopped at step %d on %s; checkpoint %s; %s", self.step, stop.reason, self.last_checkpoint,
                     again, extra=LIFECYCLE)
        self.exit_code = exit_status(stop, self._stopping.exit_code_on_stop)

    def _wants_requeue(self) -> bool:
        """Whether rank 0 requeues the job after the stop; asked of SLURM once (an scontrol call)."""
        if self._requeue is None:
            self._requeue = want_requeue(self._stopping.requeue)
        return self._requeue

    def _wait_upload(self, stop: Stop, cp: Checkpointer) -> bool:
        """Rank 0, remote dir: the stop's checkpoint must reach the store; wait as long as the grace
        period (or a notice's deadline) allows, and say so when it cannot cover the upload."""
        left = None
        if self._stopping.grace_period is not None and stop.first_seen != float("inf"):
            left = self._stopping.grace_period - (time.time() - stop.first_seen)
        if stop.deadline is not None:
            left = min(left if left is not None else float("inf"), stop.deadline - time.time())
        guess = cp.remote.last_upload_seconds
        name = self.last_checkpoint.name
        if left is not None and guess is not None and guess > left:
            log.warning("the upload of %s took ~%.1fs last time but only %.1fs are left before the kill: it may not "
                        "finish; until it does %s's head stays %s", name, guess, max(left, 0), cp.remote.url,
                        cp.uploader.uploaded or "none")
        done = cp.wait_upload(None if left is None else max(left, 0.0))
        if not done:
            log.warning("the upload of %s did not finish in the %.1fs left; it is committed locally (%s), the remote "
                        "head stays %s", name, max(left or 0, 0), cp.root, cp.uploader.uploaded or "none")
        return done and cp.uploader.error is None and cp.uploader.uploaded == name

    def _leave(self, clean: bool) -> None:
        self.feed.close()
        if self._watcher is not None:
            self._watcher.stop()
        if self.notices is not None:
            self.notices.stop()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        held = clean and self.exit_code is not None and self.handler is not None
        if self.handler is not None:
            # The original handlers are back. A late TERM from torchrun (ending the other workers
            # once one has exited) cannot come before every rank is inside exit(): its barrier
            # follows ignoring late signals, so no worker exits before all of them ignore them.
            self.handler.release()
            if held:
                self._hold_late_signals()  # at once: a signal from here on cannot kill a finished run
        try:
            self._close_out(clean)
        except BaseException:
            if held:
                self._let_held_signals_go()  # the run did not end whole: signals act as before it
            raise
        if held:
            self._end_on_late_signals()

    def _close_out(self, clean: bool) -> None:
        """The end after the handler's release: the save in flight, the records, the lease, the requeue."""
        try:
            self.checkpointer.close()  # an async save in flight is committed (a valid checkpoint)
        except CheckpointError:
            if clean:
                raise
            log.exception("the save in flight failed too")
        finally:
            status = "failed" if not clean or self.exit_code is None else "preempted" if self.stop else "done"
            reason = self.stop.reason if self.stop is not None else None
            outcome = {"done": f"done at step {self.step}", "failed": f"failed at step {self.step}",
                       "preempted": f"stopped at step {self.step} ({reason})"}[status]
            self.metrics.close(outcome)
            self._feed.finish(status, reason, self.step, self.checkpointer.last_committed_step)
            if clean:
                barrier()
            let_gloo_workers_finish()  # gloo's threads finish their releases before any interpreter teardown
            self._close_log()
            self._release()
            self._stop_lines()
        if clean and self.stop is not None and self.rank == 0 and self._wants_requeue():
            slurm.requeue()  # only now: the checkpoint is durable and every rank is past its last collective

    def _late_signals(self) -> list:
        """(signal, the disposition it had before the run) for each of the run's signals whose
        disposition would kill the process (default) or raise KeyboardInterrupt; main thread only."""
        import signal as _signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return []
        found = []
        for s in getattr(self.handler, "signals", ()):
            current = _signal.getsignal(s)
            original = getattr(current, "preemptible_original", current)
            if original in (_signal.SIG_DFL, _signal.default_int_handler):
                found.append((s, original))
        return found

    def _hold_late_signals(self) -> None:
        """While the run ends (the handler released, the lease and logs not yet): the run's signals
        are only recorded, and `_end_on_late_signals` ends the run with its own status once it has
        ended. Nothing in between (the metrics' close, the lease's release) is cut short."""
        import signal as _signal

        self._late = None

        def hold(signum: int, frame: Any) -> None:
            self._late = signum
        for s, original in self._late_signals():
            _signal.signal(s, _keeping(hold, original))

    def _let_held_signals_go(self) -> None:
        """The end failed after the signals were held: their dispositions from before the run are
        back, and one that arrived meanwhile is delivered to them now."""
        import signal as _signal

        for s, original in self._late_signals():
            _signal.signal(s, original)
        late, self._late = self._late, None
        if late is not None:
            _signal.raise_signal(late)

    def _end_on_late_signals(self) -> None:
        """After the run ended (committed): the run's signals, where they would kill the process
        (default disposition) or raise KeyboardInterrupt, end it with the run's own status instead
        (SystemExit, raised in the main thread like Python's own KeyboardInterrupt), so a late TERM
        before `exit()` does not turn a finished run into a signal death. `exit()` ignores them. A
        signal held while the run ended does so now."""
        import signal as _signal

        code = self.exit_code

        def late(signum: int, frame: Any) -> None:
            raise SystemExit(code)
        for s, original in self._late_signals():
            _signal.signal(s, _keeping(late, original))
        if self._late is not None:
            log.info("signal %d arrived after the run ended; exiting with the run's status %d", self._late, code,
                     extra=LIFECYCLE)
            self._late = None
            raise SystemExit(code)

    def _stop_lines(self) -> None:
        if self._detach_lines is not None:
            self._detach_lines()
            self._detach_lines = None

    def _close_log(self) -> None:
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def _release(self) -> None:
        for lease in reversed(self._leases):
            lease.release()
        self._leases = []

    def exit(self, fast: bool = True) -> None:
        """End the process with the run's exit status, on every rank (see `preemptible.exit_run`)."""
        self.finish()  # begun with start(): leave as the block would
        if self.exit_code is None:
            raise RuntimeError("Run.exit() before the run began: call run.start() (or use `with run:`) first")
        exit_run(self.exit_code, signals=tuple(getattr(self.handler, "signals", ())), fast=fast)


def _keeping(handler: Any, original: Any) -> Any:
    """`handler` as a signal handler of its own that names the disposition a later run restores."""
    def handle(signum: int, frame: Any) -> None:
        handler(signum, frame)
    handle.preemptible_original = original  # type: ignore[attr-defined]
    return handle
