"""`Stopping`: what stops a run and how it ends, one part of `Run` (`Run(stopping=Stopping(...))`).

Each field is checked once, here, when the part is made; its defaults are written only here (the
recipe's `conf/stopping/default.yaml` is checked against them by a test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from preemptible.checks import boolean, exit_status, one_of, seconds
from preemptible.errors import ConfigError
from preemptible.stopping.signals import DEFAULT


def is_handler(obj: Any) -> bool:
    """What Run uses of a handler (DistributedSignalHandler's interface)."""
    return all(callable(getattr(obj, name, None)) for name in
               ("__enter__", "release", "should_stop", "request_stop", "signals_received", "signals_by_rank"))


@dataclass
class Stopping:
    """signals:      what stops the run: signal names (default TERM, INT, HUP), a ready
                      `DistributedSignalHandler`, or None (no signal handling; then no notices and
                      no time limits either: nothing could agree on the stop step).
    notices:          preemption notices that are not signals (`preemptible.Notices`: a cloud's spot
                      notice, a stop file), voted like a signal. "default": `Notices()` (`touch
                      <run dir>/STOP` stops the run); None: off.
    check_every, max_latency: how often ranks agree on the stop (with `signals` as names; a ready
                      handler brings its own): 'auto' reduces as rarely as a stop within
                      `max_latency` seconds allows.
    stop_check:       'reduce' (default), 'gradients' (rides on DDP's all-reduce), 'all_gather'.
    max_time:         seconds from the start after which the run stops with a checkpoint.
    slurm_time_limit: the SLURM job's end time counts too (stop while a step and a save still fit).
    grace_period:     seconds from the first signal to SIGKILL (Kubernetes, torchrun's timeout); a
                      save that may not fit is tried anyway and said so, skipped only when a SLURM
                      requeue must follow it.
    save_guess:       seconds a save is assumed to take until one was timed (None: estimated from
                      the state's bytes and the write speed measured at start).
    margin:           seconds kept in hand beyond a step and a save before a time limit.
    requeue:          'auto' (under SLURM, when the job allows it), True or False: rank 0 requeues
                      the job after a stop's checkpoint is committed.
    exit_code_on_stop: the exit status after a stop (None: 128 + the signal number, 124 for a time
                      limit, 75 for a notice).
    """

    signals: Any = DEFAULT
    notices: Any = "default"
    check_every: Union[int, Literal["auto"]] = "auto"
    max_latency: float = 1.0
    stop_check: Literal["reduce", "gradients", "all_gather"] = "reduce"
    max_time: Optional[float] = None
    slurm_time_limit: bool = True
    grace_period: Optional[float] = None
    save_guess: Optional[float] = None
    margin: float = 5.0
    requeue: Union[bool, Literal["auto"]] = "auto"
    exit_code_on_stop: Optional[int] = None

    def __post_init__(self) -> None:
        one_of("stop_check", self.stop_check, ("reduce", "gradients", "all_gather"))
        seconds("max_time", self.max_time, strict=True, none_ok=True)
        boolean("slurm_time_limit", self.slurm_time_limit)
        seconds("grace_period", self.grace_period, strict=True, none_ok=True)
        seconds("save_guess", self.save_guess, none_ok=True)
        seconds("margin", self.margin)
        one_of("requeue", self.requeue, ("auto", True, False))
        exit_status("exit_code_on_stop", self.exit_code_on_stop, none_means="128 + the signal number")
        self.handler_and_notices()  # checked now; a Run builds its own when it is made

    def handler_and_notices(self) -> tuple[Any, Any]:
        """A signal handler and the notices for one Run: new ones from names and "default" (so one
        Stopping serves several runs in turn), the ones given otherwise."""
        handler = self._handler()
        return handler, self._notices(handler)

    def _handler(self) -> Any:
        from preemptible.stopping.signal_handler import DistributedSignalHandler

        if self.signals is None or is_handler(self.signals):
            return self.signals
        try:
            return DistributedSignalHandler(self.signals, group="cpu", check_every=self.check_every,
                                            max_latency=self.max_latency)
        except ValueError as e:
            raise ConfigError(f"signals={self.signals!r}: {e}") from None

    def _notices(self, handler: Any) -> Any:
        from preemptible.stopping.notices import Notices

        notices = self.notices
        if isinstance(notices, str) and notices == "default":
            return Notices() if handler is not None else None
        if notices is not None and not isinstance(notices, Notices):
            raise ConfigError(f"notices={notices!r}; expected a preemptible.Notices, 'default' or None")
        if notices is not None and handler is None:
            if notices.cloud or notices.extra:
                raise ConfigError(f"notices={notices!r} need signal handling to agree on the stop step; pass "
                                  "signals= (not None), or notices=None")
            return None  # only the stop file: off with the rest of the stop handling
        return notices
