"""The documented signal-handling API (same names, signatures and meaning), made safe.

Differences from the implementations it is modelled on, each for a reported failure:
- the installed handler only records state; all work happens at a step boundary;
- `all_gather_item(..., async_op=True)` never reads results before the collective finished;
- the device follows the backend of the group actually used, so a gloo side group on an NCCL
  job agrees on the CPU without a GPU sync;
- a repeat of the same signal while the first is pending arms an escalation that fires once the
  rank makes no progress (no step boundary, no checkpoint bytes written) for a while: it dumps
  every thread's stack and falls back to the original disposition, so a rank stuck in a
  collective dies without SIGKILL, and a save that is making progress is never cut short;
- a cheap agreed stop decision (`should_stop`) replaces the per-step all_gather.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
import time
import types
from typing import Any, Optional

import torch
import torch.distributed as dist

from preemptible import heartbeat
from preemptible.stopping.vote import DEADLINE, AgreedMax, GradientFlag, StepClock

log = logging.getLogger("preemptible.signal_handler")  # the name users filter on (stable across moves)

from preemptible.stopping.signals import (SignalLike, SignalSpec, _ACCEPTED, parse_signals,  # noqa: F401
                                          resolve_signal)
from preemptible.distributed.collectives import (GatherFuture, _collective_device, _dist_ready,  # noqa: F401
                                                 all_gather_item, get_device)


def _resolve_group(spec: Any) -> Optional["dist.ProcessGroup"]:
    """Build the group the handler agrees on; called on every rank once dist is initialized."""
    if spec is None or spec in ("world", "default"):
        return None
    if spec == "cpu":  # the world if it reduces CPU tensors, else a gloo side group: never a GPU sync
        return None if _collective_device() == torch.device("cpu") else dist.new_group(backend="gloo")
    if isinstance(spec, str):
        return dist.new_group(backend=spec)
    if isinstance(spec, dist.ProcessGroup):
        return spec
    if callable(spec):  # a Hydra `_partial_` factory such as torch.distributed.new_group
        return spec()
    raise ValueError(_bad_group(spec))


def _bad_group(spec: Any) -> str:
    return (f"group {spec!r} is not usable; expected None/'world', 'cpu', a backend name such as 'gloo', "
            "a ProcessGroup, or a factory (Hydra `_partial_: true` node)")


def _check_group_spec(spec: Any) -> None:
    """Reject what can never become a group now, before anything is installed or built."""
    if isinstance(spec, str) and spec not in ("world", "default", "cpu") and spec not in dist.Backend.backend_list:
        raise ValueError(f"group {spec!r} is neither 'world', 'cpu' nor a backend name "
                         f"({', '.join(dist.Backend.backend_list)}); a side group for a stop flag is usually 'gloo'")
    if not (spec is None or isinstance(spec, (str, dist.ProcessGroup)) or callable(spec)):
        raise ValueError(_bad_group(spec))


def _reset_to_default_and_raise(signum: int) -> None:
    """From any thread: make `signum` fatal again at the C level and deliver it to ourselves."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.signal(signum, 0)  # SIG_DFL
        os.kill(os.getpid(), signum)
        time.sleep(5)
    finally:
        os._exit(128 + signum)


class DistributedSignalHandler:
    """Context manager to handle signals gracefully in a distributed setting.

    Installs a handler on enter that only records which signal arrived and when;
    `signals_received()` all-gathers the per-rank flags (the documented, per-call collective);
    `should_stop()` is the cheap agreed decision a training loop calls every step.

    Keyword extensions (all optional, every documented call works unchanged):
      group:      None (world), a ProcessGroup, a backend name ('gloo' builds a side group), or a
                  factory called once dist is initialized (Hydra `_partial_`); built in
                  `__enter__` (or first use), the same way on every rank.
      local_rank: passed to `get_device` for NCCL groups.
      chain:      also call the previous Python-level handler after recording.
      escalate:   a repeat of the same signal more than `escalate_after` seconds after the first,
                  while still pending, arms an escalation; it fires (all stacks dumped, then the
                  original disposition) once the rank has made no progress -- no `should_stop()` /
                  `signals_received()` call, no checkpoint bytes written -- for `stall_seconds()`:
                  the larger of `escalate_after` and 3 typical steps. A stuck rank dies; a save that
                  is writing, or a step that is computing, finishes.
      check_every, pipelined, max_latency: how `should_stop()` reduces: every N-th call, or
                  'auto' (as rarely as a stop within `max_latency` seconds allows); see
                  `preemptible.stop.AgreedMax`.
    """

    def __init__(
        self,
        sig: SignalSpec = signal.SIGTERM,
        *,
        group: Any = None,
        local_rank: Optional[int] = None,
        chain: bool = False,
        escalate: bool = True,
        escalate_after: float = 1.0,
        check_every: Any = 1,
        pipelined: bool = True,
        max_latency: float = 1.0,
    ):
        self.signals = parse_signals(sig)
        self.sigs = list(self.signals)  # NeMo Automodel's name: the handled signals, in the order given
        _check_group_spec(group)
        if local_rank is not None and (isinstance(local_rank, bool) or not isinstance(local_rank, int) or local_rank < 0):
            raise ValueError(f"local_rank={local_rank!r}; expected a non-negative int or None")
        from preemptible.checks import boolean, seconds

        seconds("escalate_after", escalate_after)
        for name, value in (("chain", chain), ("escalate", escalate), ("pipelined", pipelined)):
            boolean(name, value)
        self._group_spec = group
        self._group: Optional[dist.ProcessGroup] = None
        self._group_built = False
        self.local_rank = local_rank
        self.chain = chain
        self.escalate = escalate
        self.escalate_after = float(escalate_after)
        self._vote = AgreedMax(every=check_every, pipelined=pipelined, max_latency=max_latency)
        self._installed = False
        self.released = True
        self._original: dict[int, Any] = {}
        self._reset_state()

    def _reset_state(self) -> None:
        self.received: list[tuple[int, float]] = []  # (signum, wall time) in arrival order
        self._armed = 0  # a repeated signal: escalate once the rank stops making progress
        self._steps = StepClock()  # typical seconds between step boundaries
        self._requested = 0  # a stop this rank asked for itself (request_stop)
        self._first_seen: dict[int, float] = {}
        self._old_wakeup_fd = -1
        self._watcher: Optional[threading.Thread] = None
        self._socks: Optional[tuple[socket.socket, socket.socket]] = None

    @property
    def sig(self) -> signal.Signals:
        """The first configured signal (NeMo Automodel's backward-compatible accessor)."""
        return self.sigs[0]

    # -- group -----------------------------------------------------------------------------

    @property
    def group(self) -> Optional["dist.ProcessGroup"]:
        if not self._group_built and _dist_ready():
            self._group = _resolve_group(self._group_spec)
            self._group_built = True
            if isinstance(self._vote, AgreedMax):
                self._vote.group = self._group
                self._vote.device = _collective_device(self.local_rank, self._group)
        return self._group

    # -- install / release -----------------------------------------------------------------

    def __enter__(self) -> "DistributedSignalHandler":
        if self._installed:
            raise RuntimeError("DistributedSignalHandler entered twice; release() it before entering again")
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "DistributedSignalHandler must be entered from the main thread "
                "(Python only runs signal handlers there)"
            )
        from preemptible.stopping import early

        held = early.take_held()  # signals that came while the process was starting (hold_signals)
        self._reset_state()
        self._vote.reset()
        installed: list[int] = []
        try:
            for s in self.signals:
                current = signal.getsignal(s)
                # A finished run's "end with my status" handler stands in for what was there before it.
                self._original[s] = getattr(current, "preemptible_original", current)
                signal.signal(s, self._handle)
                installed.append(s)
        except BaseException:
            for s in installed:  # roll back: leave the process as we found it
                signal.signal(s, self._original[s])
            self._original.clear()
            raise
        self._installed = True
        self.released = False
        for signum, arrived in held:
            if signum in self.signals:  # received then, as far as the stop is concerned
                self.received.append((signum, arrived))
                self._first_seen.setdefault(signum, arrived)
                log.info("%s arrived while the process was starting; stopping at the first step boundary",
                         signal.Signals(signum).name)
        early.redeliver([(s, t) for s, t in held if s not in self.signals])  # not ours: as if never held
        if self.escalate:
            self._start_watcher()
        _ = self.group  # build a side group now, while every rank is at the same point
        return self

    def __exit__(self, exc_type: Optional[type], exc_val: BaseException | None, exc_tb: types.TracebackType | None) -> None:
        self.release()

    def release(self) -> bool:
        """Restore the original signal handlers; True if released now, False if already released."""
        if self.released:
            return False
        self._vote.drain()
        for s, original in self._original.items():
            signal.signal(s, original if original is not None else signal.SIG_DFL)
        self._original.clear()
        self._stop_watcher()
        self._installed = False
        self.released = True
        return True

    # -- what the handler records ----------------------------------------------------------

    def _handle(self, signum: int, frame: Optional[types.FrameType]) -> None:
        now = time.time()
        self.received.append((signum, now))
        first = self._first_seen.setdefault(signum, now)
        if self.escalate and now - first > self.escalate_after:
            self._armed = signum
            if self._watcher is None and self._stalled():
                self._armed = 0
                self._escalate(signum)
        original = self._original.get(signum)
        if self.chain and callable(original):
            original(signum, frame)

    def _start_watcher(self) -> None:
        # The C-level handler writes each delivery to the wakeup fd even while the main thread
        # is stuck in a collective, where no Python handler can run: a thread sees it there.
        rsock, wsock = socket.socketpair()
        wsock.setblocking(False)
        try:
            old = signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
        except (ValueError, OSError):
            rsock.close(), wsock.close()
            return
        if old != -1:  # someone (asyncio) owns it: keep theirs, escalate from the handler instead
            signal.set_wakeup_fd(old)
            rsock.close(), wsock.close()
            return
        self._socks = (rsock, wsock)
        self._watcher = threading.Thread(target=self._watch, args=(rsock,), name="preemptible-signal-watch", daemon=True)
        self._watcher.start()

    def _stop_watcher(self) -> None:
        if self._socks is None:
            return
        signal.set_wakeup_fd(-1)
        rsock, wsock = self._socks
        wsock.close()
        try:
            rsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        rsock.close()
        self._socks, self._watcher = None, None

    def _watch(self, rsock: socket.socket) -> None:
        first: dict[int, float] = {}
        rsock.settimeout(0.2)  # wake up to check an armed escalation against the progress clock
        while True:
            try:
                data = rsock.recv(64)
            except socket.timeout:
                data = None
            except OSError:
                return
            if data == b"":
                return  # closed: released
            now = time.time()
            for signum in data or ():
                if signum not in self.signals:
                    continue
                seen = first.setdefault(signum, now)
                if now - seen > self.escalate_after:
                    self._armed = signum
            if self._armed and self._stalled():
                signum, self._armed = self._armed, 0  # once: an ignored signal stays ignored
                self._escalate(signum)

    def stall_seconds(self) -> float:
        """How long without progress makes an armed escalation fire: max(escalate_after, 3 steps)."""
        return max(self.escalate_after, 3.0 * self._steps.seconds)

    def _stalled(self) -> bool:
        return heartbeat.idle_seconds() > self.stall_seconds()

    def _boundary(self) -> None:
        """A step boundary: progress, and a sample of the typical step time."""
        heartbeat.beat()
        self._steps.tick()

    def _escalate(self, signum: int) -> None:
        name = signal.Signals(signum).name
        original = self._original.get(signum)
        sys.stderr.write(
            f"preemptible: {name} received again while the first is still pending, and no progress for "
            f"{heartbeat.idle_seconds():.1f}s (pid {os.getpid()}); stacks of every thread follow, then the "
            "original disposition\n"
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        if original is signal.SIG_IGN:
            return
        _reset_to_default_and_raise(signum)

    # -- queries ---------------------------------------------------------------------------

    def local_signal(self) -> int:
        """The first signal this rank received since enter (else a requested stop's code), 0 if none."""
        return self.received[0][0] if self.received else self._requested

    @property
    def check_interval(self) -> Optional[int]:
        """Steps between reductions agreed now (None when the flag rides on gradients)."""
        return self._vote.every if isinstance(self._vote, AgreedMax) else None

    def request_stop(self, code: int = DEADLINE) -> None:
        """Vote to stop as if a signal had arrived (the job's time limit is near): agreed the same way."""
        self._requested = self._requested or code

    @property
    def _signal_received(self) -> bool:
        """NeMo Automodel's name for this rank's flag: True once one of the signals arrived."""
        return bool(self.received)

    @_signal_received.setter
    def _signal_received(self, value: bool) -> None:
        if value and not self.received:
            self.received.append((self.signals[0], time.time()))
        elif not value:
            self.received.clear()

    def signals_received(self) -> list[bool]:
        """Check if any rank in the group received the signal (one all_gather; documented API)."""
        self._boundary()
        self._vote.drain()
        return all_gather_item(bool(self.received), torch.int32, group=self.group, local_rank=self.local_rank)

    def signals_by_rank(self) -> list[int]:
        """Per rank, the first signal number it received (0 if none). One all_gather: for logs."""
        self._vote.drain()
        return all_gather_item(self.local_signal(), torch.int32, group=self.group, local_rank=self.local_rank)

    def should_stop(self, *, every_call: bool = False) -> bool:
        """The agreed stop decision: same answer on every rank at the same call, sticky once True.

        Call it at the same point of every step on every rank. It costs one small MAX
        reduction every `check_every` calls; pipelined, the reduction started at one call is
        read at the next, so the loop never waits on it (latency: `check_every` steps).
        every_call: reduce at this call whatever `check_every` says (every rank passes the same):
        for checks between eval batches or micro-batches, whose spacing differs from the steps'
        that `check_every='auto'` measured, so a slow phase cannot stretch the latency.
        """
        self._boundary()
        _ = self.group
        if every_call and isinstance(self._vote, AgreedMax):
            return self._vote(self.local_signal(), force=True) != 0
        return self._vote(self.local_signal()) != 0

    def ride_on_gradients(self, ddp_model: torch.nn.Module) -> "DistributedSignalHandler":
        """Carry the stop flag on this DDP model's gradient all-reduce instead of a reduction.

        `should_stop()` then costs no collective at all; call it after the backward. Every
        step must run a synchronised backward (no `no_sync` steps between checks).
        """
        self._vote = GradientFlag(lambda: self.local_signal(), getattr(ddp_model, "process_group", None)).attach(ddp_model)
        return self
