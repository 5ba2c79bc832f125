"""`Run`: one object that makes any training loop preemptible.

    run = preemptible.Run("runs/exp1", model=model, optimizer=opt, scheduler=sched, data=loader,
                          max_steps=1000, checkpoint=preemptible.Checkpointer(interval=100))
    with run:                              # owns the directory, installs the signals, resumes
        for batch in run.batches():        # where the last run stopped; ends on an agreed stop
            loss = train_step(batch)
            run.step_done(loss=loss)       # the agreed stop check, periodic saves, metrics
    run.exit()                             # every rank exits with the run's status (0, 143, ...)

What a checkpoint holds: the model and optimizer (torch's state-dict helpers: one process, DDP
and FSDP2 alike), the scheduler, every `state=` object (anything with state_dict and
load_state_dict: a GradScaler, an EMA model, a second optimizer), the `values=` dict (plain
data), and per rank the data loader's position and every RNG (Python, NumPy, torch CPU and CUDA).

The data position and the RNGs are captured at `step_done()`, so a save is always of a step
boundary: a stop agreed in the middle of the next step (between micro-batches or eval batches:
`run.should_stop()`) saves the boundary before it, and the resume repeats that step from its
first batch. Pull batches only through `run.batches()`. A loop that pulls the next step's batch
before the step ends (prefetching, as nanoGPT does) declares it: `run.batches(ahead=1)`; each pull
then records the state before it, a checkpoint holds the state before the first batch the next
step uses, and the resume takes that batch again. An undeclared prefetch is refused at the second
step (one line naming the fix), never silent.

`data` may be a plain iterable or iterator (a generator): it is used as is, and its position is
not saved; a resume is exact when its only state is the RNG that Run restores (a batch function
drawing from torch's RNG); otherwise it starts from its beginning again (a warning says so).

Without `with` (a loop at module level): `run.start()` ... `run.exit()`; `exit()` does what leaving
the block does (the last save, the stop's record, the lease released), then ends the process.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from preemptible import faults, heartbeat
from preemptible.checkpoint.writer import Checkpointer
from preemptible.checks import path as check_path
from preemptible.distributed.env import barrier, broadcast_object, is_distributed
from preemptible.errors import ConfigError, described, in_part
from preemptible.names import CHECKPOINTS
from preemptible.observe.lifecycle import LIFECYCLE, attach as show_lifecycle
from preemptible.observe.logfile import open_log
from preemptible.observe.metrics import METRICS, PROGRESS, Metrics, append_event, check_metric_names, process_start_time, read_progress, unclean_end
from preemptible.observe.report import Report
from preemptible.observe.trackers import TrackerFeed
from preemptible.ownership.lease import Holder, Ownership, RunLease, WaitInterrupted
from preemptible.run.ending import Ending
from preemptible.run.resuming import Resuming
from preemptible.run.saving import Saving
from preemptible.run.feed import Feed
from preemptible.run.parts import Progress, RankState, check_training_objects, part, refuse_moved
from preemptible.run.state import ModelOptimState, PlainValues, params_sha256
from preemptible.stopping.decision import Stop, agreed_stop, end_time
from preemptible.stopping.options import Stopping
from preemptible.stopping.vote import NOTICE, Deadline
from preemptible.stopping.watchdog import Ender, Watchdog, Watcher, check_watchdog

log = logging.getLogger("preemptible.run")

# The phases a watchdog's stacks file names (templates: the step is filled in only when one is read).
AFTER_STEP = "after step {step}: the stop check (a collective) and a periodic save"
IN_STEP = "step {step}: the loop's own code (data, forward, backward with DDP's gradient all_reduce, the optimizer)"


class Run(Resuming, Saving, Ending):
    """A training run that survives preemption: see the module docstring and docs/api.md.

    dir:        the run directory (created if missing; one run owns it at a time).
    model, optimizer, scheduler: saved and restored (model alone is fine; optimizer needs model).
    data:       an iterable with state_dict/load_state_dict (torchdata's StatefulDataLoader, as is),
                saved per rank, or a plain iterable (`preemptible.DataSource` says what is used);
                `batches()` iterates it, epoch after epoch (calling `sampler.set_epoch` where it exists).
    state:      {name: object with state_dict/load_state_dict} saved too (GradScaler, EMA model, ...).
    values:     {name: plain value} saved and restored in `run.values` (a best validation loss, ...).
    max_steps:  `batches()` ends after this many steps (None: when the data ends, or on a stop).

    The parts, each checked when it is made and owning its defaults (None: the part's defaults):
    checkpoint: `Checkpointer(interval=, keep=, resume=, dir=, async_save=, verify=, meta=, ...)`.
    stopping:   `Stopping(signals=, notices=, max_time=, grace_period=, requeue=, exit_code_on_stop=, ...)`.
    ownership:  `Ownership(wait=, stale_after=)`: one run per directory.
    tracker:    an experiment tracker (`preemptible.trackers.TensorBoard`, `WandB`, `MLflow`) or a list
                of them, fed by rank 0: one tracker run across stops and resumes, each step once.
    report:     `Report(log_every=, log_file=, param_digests=)`: what the run says while it trains.
    watchdog:   `Watchdog(timeout=)`: a rank that makes no progress (nor sees a peer's) for `timeout`
                seconds writes its stacks and ends with status 86 (None: off; a lost peer ends it so anyway).
    """

    def __init__(self, dir: Any, *, model: Optional[torch.nn.Module] = None, optimizer: Any = None,
                 scheduler: Any = None, data: Any = None, state: Optional[dict[str, Any]] = None,
                 values: Optional[dict[str, Any]] = None, max_steps: Optional[int] = None,
                 checkpoint: Optional[Checkpointer] = None, stopping: Optional[Stopping] = None,
                 ownership: Optional[Ownership] = None, tracker: Any = None, report: Optional[Report] = None,
                 watchdog: Optional[Watchdog] = None, **moved: Any):
        refuse_moved(moved)
        check_path("dir", dir)
        self.dir = Path(dir)
        check_training_objects(model, optimizer, scheduler, state, values, max_steps)
        self.feed = Feed(data)  # checks data=
        self.checkpointer = part("checkpoint", checkpoint, Checkpointer)
        self._stopping = part("stopping", stopping, Stopping)
        self.ownership = part("ownership", ownership, Ownership)
        self.report = part("report", report, Report)
        self.watchdog = check_watchdog(watchdog)
        self.handler, self.notices = self._stopping.handler_and_notices()
        if self._stopping.stop_check == "gradients" and not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise ConfigError("stop_check=gradients needs a DDP model with more than one rank; use reduce")
        trackers = [] if tracker is None else list(tracker) if isinstance(tracker, (list, tuple)) else [tracker]
        self._feed = TrackerFeed(trackers)  # validates on every rank; fed on rank 0 only
        self.deadline = Deadline(end_time(self._stopping.max_time, self._stopping.slurm_time_limit), self._stopping.margin)
        if self.deadline.end is not None and self.handler is None:
            raise ConfigError("max_time and SLURM time limits need signal handling to agree on the stop step; "
                              "pass signals= (not None), or max_time=None and slurm_time_limit=False")

        self.model, self.optimizer, self.scheduler, self.data = model, optimizer, scheduler, data
        self.extra = dict(state or {})
        self.values: dict[str, Any] = PlainValues()
        self.values.update(values or {})
        self.max_steps = max_steps
        self.before_resume: Any = None  # (marker dict, path) -> None: may refuse a resume (raise ConfigError)
        self.after_resume: Any = None   # (marker dict, path) -> None: e.g. apply changed hyperparameters

        self.rank = dist.get_rank() if is_distributed() else 0
        self.world_size = dist.get_world_size() if is_distributed() else 1
        self.step = 0
        self.stop: Optional[Stop] = None    # the agreed stop, once there is one
        self.exit_code: Optional[int] = None
        self.last_checkpoint: Optional[Path] = None
        self.resumed_from: Optional[Path] = None
        self.metrics: Optional[Metrics] = None
        self._leases: list[RunLease] = []
        self._log_handler: Optional[logging.Handler] = None
        self._hooks: list[Any] = []
        self._lr: Optional[float] = None
        self._entered = self._left = False
        self._created: list[Path] = []
        self._check = self._check_between = lambda: False  # the stop checks, set when the run is entered
        self._mid_step = False  # the stop was agreed by should_stop() (inside a step or an eval)
        self._dcp: dict[str, Any] = {}
        self._state_bytes: Optional[int] = None
        self._resumed_step: Optional[int] = None
        self._killed_at: Optional[int] = None
        self._killed_progress: Optional[dict] = None  # the killed run's PROGRESS record: when it was alive
        self._detach_lines: Any = None
        self._bytes_final = False
        self._requeue: Optional[bool] = None  # asked once, at the stop
        self._schedule: Any = None  # checkpoint interval='auto': when saves are due
        self._ender: Optional[Ender] = None      # ends the rank on a hang or a lost peer
        self._watcher: Optional[Watcher] = None
        self._holding = False  # this run began holding its signals (for the lease's wait)
        self._owns: Any = None  # whether the run still owns its directory (a Holder, once entered)

    # -- entering: own, install, resume ---------------------------------------------------------

    def start(self) -> "Run":
        """`with run:` without the block (a loop at module level): own, install, resume. End it with
        `run.exit()` (which leaves as the block would, then ends the process) or `run.finish()`."""
        return self.__enter__()

    def finish(self) -> None:
        """Leave a run begun with `start()` as the end of a `with run:` block does (the last save,
        the stop's record, the lease released); `exit_code` is then set. Once; a no-op after."""
        if self._entered and not self._left:
            self.__exit__(None, None, None)

    def __enter__(self) -> "Run":
        if self._entered:
            raise RuntimeError("a Run is entered once; make a new Run for another run")
        self._entered = True
        self._entered_at = time.time()
        self.rank = dist.get_rank() if is_distributed() else 0  # the process group may be newer than the Run
        self.world_size = dist.get_world_size() if is_distributed() else 1
        self._detach_lines = show_lifecycle(self.rank)
        try:
            self._own()
            try:
                self.checkpointer.setup(str(self.dir), self.rank)
            except ConfigError as e:
                raise in_part("checkpoint", e)
            self.checkpointer.owner_check = self._leases[0].check if self._leases else None
            self._killed_at = unclean_end(self.dir) if self.rank == 0 else None  # before this run writes
            self._killed_progress = read_progress(self.dir) if self._killed_at is not None else None
            self.metrics = Metrics(str(self.dir), enabled=self.rank == 0, max_steps=self.max_steps or 0,
                                   log_every=self.report.log_every)
            self.metrics.since = process_start_time()
            self.metrics.owns = self._owns.recent
            self._dcp = self._state_for_dcp()
            self._watch()
            self._check = self._stop_check()
            if self.handler is not None:
                self.handler.__enter__()  # from here a signal is recorded, during the resume too
                if self.notices is not None and self._polls_notices():
                    self.notices.start(self.dir, lambda notice: self.handler.request_stop(NOTICE))
            else:
                from preemptible.stopping import early

                early.release_held()  # no handling asked for: held signals act as they would have
            self.feed.mark_boundary()
            early_rows: list[dict] = []  # the resumed event, for the trackers that start once the step is known
            self.metrics.sinks.append(early_rows.extend)
            self._resume()
            self._record_kill()  # a kill with nothing to resume from (no checkpoint yet)
            self._schedule_saves()
            self.metrics.sinks.remove(early_rows.extend)
            if self.rank == 0 and self._feed.trackers:
                self._feed.start(self.dir, self.step if self.resumed_from else None, self.checkpointer.meta.get("config"),
                                 early_rows)
                self.metrics.sinks.append(self._feed.add)
            self.feed.mark_boundary()
            if self.optimizer is not None:
                self._hooks.append(self.optimizer.register_step_pre_hook(self._before_optimizer_step))
            self.metrics.start(self.step)
        except BaseException:
            self._abandon_start()
            raise
        return self

    def _watch(self) -> None:
        """The end on a hang or a lost peer (always), and the watchdog's thread (when asked for)."""
        self._ender = Ender(self.dir, self.rank, lambda: self.step, self._release, self._wants_requeue,
                            record=lambda row: append_event(self.dir, row), owns=self._owns)
        heartbeat.beat("the start: the resume, then the first step")
        if self.watchdog is not None:
            self._watcher = Watcher(self.watchdog, self._ender, self.world_size, self._save_seconds).start()

    def _own(self) -> None:
        """Rank 0 takes the leases (run dir, and checkpoint dir if outside); every rank learns the outcome."""
        dirs = [self.dir]
        cp = self.checkpointer
        cdir = cp.local_dir if cp.remote is not None else cp.dir
        if cdir and not Path(cdir).resolve().is_relative_to(self.dir.resolve()):
            dirs.append(Path(cdir))
        error = None
        if self.rank == 0:
            d = self.dir.absolute()
            while not d.exists():  # what this run creates (and removes again if its start fails)
                self._created.append(d)
                d = d.parent
            for i, d in enumerate(dirs):
                try:
                    self._leases.append(self._lease(d))
                except ConfigError as e:
                    error = in_part("checkpoint", ConfigError(f"dir={str(d)!r}: {e}")) if i else e
                    break
            if error is None and cp.remote is not None:
                from preemptible.ownership.remote_lease import RemoteLease

                try:
                    lease = RemoteLease(cp.remote, wait=self.ownership.wait, stale_after=self.ownership.stale_after).acquire()
                    self._leases.append(lease)
                    cp.remote_owner_check = lease.check
                except ConfigError as e:
                    error = in_part("checkpoint", e)
                except Exception as e:  # noqa: BLE001 -- the store cannot be reached: one line, before any work
                    error = in_part("checkpoint", ConfigError(
                        f"dir={cp.remote.url!r} cannot be reached ({described(e)}); check "
                        "AWS_ENDPOINT_URL and the credentials"))
            if error is None and self.notices is not None:
                self.notices.clear_stop_file(self.dir)  # before any node polls for it
        token = self._leases[0].token if self._leases and self.rank == 0 else None
        error, token = broadcast_object((error, token))
        if error is not None:
            raise error
        self._owns = Holder(self.dir, token, self._leases[0] if self._leases and self.rank == 0 else None)
        barrier()  # the directory exists for every rank
        if self.report.log_file:
            root = logging.getLogger()
            self._log_handler = open_log(self.dir / self.report.log_file, root.handlers[0].formatter if root.handlers else None,
                                         owns=self._owns.recent)
            if self._log_handler is not None:
                root.addHandler(self._log_handler)

    def _lease(self, directory: Path) -> RunLease:
        """The lease of `directory`. With signal handling, the run's signals are held while it waits
        for another run to finish: one ends the wait with one line, and then acts as it would have
        (by default, the process ends on it), since nothing has started that a stop could save."""
        from preemptible.stopping import early

        lease = RunLease(directory, wait=self.ownership.wait, stale_after=self.ownership.stale_after)
        if self.handler is not None:
            self._holding |= early.hold_signals()
            lease.interrupted = early.first_held
        try:
            return lease.acquire()
        except WaitInterrupted as e:
            log.error("%s while waiting for the run directory's owner (%s): nothing was started or saved; ending as "
                      "that signal does", signal.Signals(e.signum).name, e.waiting_for, extra=LIFECYCLE)
            early.release_held()
            raise ConfigError(f"{signal.Signals(e.signum).name} while waiting for {e.waiting_for}") from None

    @staticmethod
    def _polls_notices() -> bool:
        """One poller per node: local rank 0 (a notice is about this machine; the vote tells the rest)."""
        try:
            return int(os.environ.get("LOCAL_RANK", "0")) == 0
        except ValueError:
            return True

    def _abandon_start(self) -> None:
        """A start that failed: undo what __enter__ did; a directory it created (still holding only
        its own files) is removed, so a mistyped argument leaves nothing behind."""
        if self.notices is not None:
            self.notices.stop()
        if self._watcher is not None:
            self._watcher.stop()
        if self.handler is not None and getattr(self.handler, "_installed", False):
            self.handler.release()
        elif self._holding:
            from preemptible.stopping import early

            early.release_held()  # held from the lease's wait on: they act as they would have
        self._close_log()
        self._stop_lines()
        for h in self._hooks:
            h.remove()
        self._release()
        if self.rank == 0 and self._created:
            for name in (self.report.log_file, METRICS, PROGRESS):
                if name:
                    (self.dir / name).unlink(missing_ok=True)
            for d in [self.dir / CHECKPOINTS, *self._created]:
                try:
                    d.rmdir()  # only if empty: anything else put there stays
                except OSError:
                    pass

    def _state_for_dcp(self) -> dict[str, Any]:
        state: dict[str, Any] = {"progress": Progress(self), f"rank{self.rank}": RankState(self.feed)}
        if self.model is not None:
            state["model_optim"] = ModelOptimState(self.model, self.optimizer)
        if self.scheduler is not None:
            state["lr_schedule"] = self.scheduler
        state.update(self.extra)
        return state

    def _stop_check(self):
        handler = self.handler
        self._check_between = lambda: False
        if handler is None:
            return lambda: False
        self._check_between = lambda: handler.should_stop(every_call=True) if self._stopping.stop_check == "reduce" \
            else any(handler.signals_received())
        if self._stopping.stop_check == "gradients":  # a DDP model: checked when the Run was built
            handler.ride_on_gradients(self.model)
        if self._stopping.stop_check == "all_gather":
            return lambda: any(handler.signals_received())
        return handler.should_stop

    @property
    def stopping(self) -> bool:
        """True once every rank agreed to stop (a signal, a time limit)."""
        return self.stop is not None

    def batches(self, ahead: int = 0) -> Iterator[Any]:
        """The data's items, resumed where the last run stopped, epoch after epoch; ends on an agreed
        stop, at max_steps, or when an iterator given as `data` is exhausted.

        ahead: how many batches the loop holds beyond the step it is in when it calls step_done()
        (nanoGPT's idiom, pulling the next step's batch before the step ends: ahead=1). Each pull
        then records the state before it, and a checkpoint holds the state before the first batch
        the next step uses: the resume pulls that batch again, exactly. Checked at the second
        step: a loop that holds another number of batches ahead than declared is refused (ConfigError).
        """
        self._require_entered("batches")
        return self.feed.batches(ahead, lambda: not self.stopping and (self.max_steps is None
                                                                        or self.step < self.max_steps))

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # An async save's copy of the weights must be complete before the optimizer changes them.
        self.checkpointer.wait_staged()
        self._lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None

    def step_done(self, loss: Any = None, **metrics: Any) -> bool:
        """After each optimizer step, on every rank: counts the step, records the boundary, agrees
        on a stop, saves every `interval` steps, logs `loss` (a tensor stays on the device until a
        flush) and any other metrics. Returns True once the run is stopping."""
        self._require_entered("step_done")
        if self.stopping:
            raise RuntimeError("step_done() after the run agreed to stop; leave the loop (batches() has ended)")
        check_metric_names(metrics)
        self.step += 1
        heartbeat.beat(AFTER_STEP, self.step)
        if self._watcher is not None:
            self._watcher.arm()
        self.feed.check_ahead()
        self.feed.mark_boundary()
        lr = metrics.pop("lr", self._lr)  # a loop that keeps its LR by hand passes it (else: the optimizer's)
        if loss is not None or metrics or lr is not None:
            self.metrics.step(self.step, loss, lr, **metrics)
        self.deadline.step_done()
        if self.handler is not None and self.deadline.end is not None and self.deadline.expired(self._save_seconds()):
            self.handler.request_stop()  # the time limit is near: voted like a signal
        faults.inject("step", self.step)
        if self._check():
            self.stop = agreed_stop(self.handler, self.step, self.notices)
            return True
        self._periodic_save()
        self.checkpointer.poll()
        self._feed.committed(self.checkpointer.last_committed_step)
        heartbeat.set_phase(IN_STEP, self.step + 1)
        return False

    def should_stop(self) -> bool:
        """The agreed stop check, usable between micro-batches and eval batches (every rank must call
        it equally often). True: leave the loop; the checkpoint holds the last step boundary."""
        self._require_entered("should_stop")
        heartbeat.beat()
        if not self.stopping and self._check_between():
            self.stop = agreed_stop(self.handler, self.step, self.notices)
            self._mid_step = True
        return self.stopping

    def event(self, name: str, **fields: Any) -> None:
        """One line in metrics.jsonl (rank 0): {"event": name, "step": ..., **fields}."""
        self._require_entered("event")
        self.metrics.event(name, step=self.step, **fields)

    def heartbeat(self, phase: Optional[str] = None) -> None:
        """Progress, for the watchdog: call it now and then in a long phase of your own that does not
        call should_stop() (an evaluation on one rank, a download); any rank, no collective."""
        heartbeat.beat(phase)

    def _require_entered(self, what: str) -> None:
        if not self._entered or self.metrics is None:
            raise RuntimeError(f"Run.{what}() is used inside `with run:` (or between run.start() and run.exit())")

    def _digest(self, always: bool = False) -> Optional[str]:
        if self.model is None or not (always or self.report.param_digests is True):
            return None
        sharded = any(hasattr(p, "full_tensor") for p in self.model.parameters())
        return params_sha256(self.model) if self.rank == 0 or sharded else None
