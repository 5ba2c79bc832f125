"""A rank that freezes or a peer that vanishes: the others end in seconds, with stacks, and nothing
is lost (`Run(watchdog=Watchdog(timeout=...))`; the recipe's `watchdog` group).

A thread per rank reads the progress clock (`preemptible.heartbeat`: step boundaries, stop checks,
checkpoint bytes written, `should_stop()` inside evals and accumulation, `Run.heartbeat()`). Each
rank also leaves its beat count in `<run dir>/watchdog/rank<N>`, so a rank waiting in a collective
for a peer that is busy (rank 0 writing a DDP checkpoint alone, an evaluation on one rank that calls
`run.heartbeat()`) sees that peer's progress. When no rank it can see has made progress for
`timeout` seconds, it writes every thread's Python stack, the step and the phase to
`<run dir>/watchdog/stacks-step<S>-rank<N>.txt`, appends a `hung` event to metrics.jsonl, logs one
line naming the file, releases the run directory, requeues the SLURM job when the run's requeue
setting says so, and ends the process with HANG_EXIT (86). A save in flight is not committed: the
head stays the last committed checkpoint.

A collective that fails because a peer died (gloo's "Connection closed by peer", an NCCL error, the
process group's timeout) ends the rank the same way (`peer_lost` tells it; `Ender.end` from `Run.__exit__`).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from preemptible import heartbeat
from preemptible.checks import number
from preemptible.errors import ConfigError, first_line
from preemptible.names import WATCHDOG

MAX_TIMEOUT = 1e6  # seconds (11.6 days): timeout and floor above it are refused (the process group's timeout is twice it)
SUSPENDED_AFTER = 1.0  # seconds the watchdog's own thread may oversleep its poll before the gap counts as a suspension
BEAT_WIDTH = 64  # a beat file's record, padded: rewritten in place
HANG_EXIT = 86  # a rank ended because the job stopped making progress (a hang) or lost a peer
AUTO_GROUP_TIMEOUT = 600.0  # the process group's timeout with timeout='auto' (NCCL's default)

log = logging.getLogger("preemptible.watchdog")


@dataclass
class Watchdog:
    """timeout: seconds without progress on any rank this one can see before it ends with status 86,
                or 'auto': max(floor, factor x the longest pause measured so far, factor x the
                expected save time). Watching starts when the first step after the start (or the
                resume) ends: the load and the first step's compilation are not timed (the process
                group's timeout bounds them).
    floor:      auto's lower bound, in seconds.
    factor:     auto's multiple of the longest measured pause (a step, a save, an evaluation's gaps).
    """

    timeout: Union[float, Literal["auto"]] = "auto"
    floor: float = 60.0
    factor: float = 5.0

    def __post_init__(self) -> None:
        number("timeout", self.timeout, strict=True, unit="seconds", hint="or 'auto'", auto_ok=True, high=MAX_TIMEOUT)
        number("floor", self.floor, strict=True, unit="seconds", high=MAX_TIMEOUT)
        number("factor", self.factor, low=1.0)

    @property
    def group_timeout(self) -> float:
        """Seconds for the process group's timeout (`init_distributed(timeout=)`), so a collective
        stuck where no watchdog thread can run is bounded too: twice the timeout (at least 30 s
        more), or 600 s with 'auto'."""
        if self.timeout == "auto":
            return max(AUTO_GROUP_TIMEOUT, 2 * self.floor)
        return max(2.0 * self.timeout, self.timeout + 30.0)


def peer_lost(exc: BaseException) -> bool:
    """Whether `exc` says a collective failed because a peer is gone or stopped answering: torch's
    distributed error types, or a RuntimeError from gloo or NCCL saying so (a user's own
    "connection reset by peer", from a download say, is not one)."""
    for e in _chain(exc):
        if type(e).__name__ in ("DistBackendError", "DistNetworkError", "DistStoreError"):
            return True
        text = str(e).lower()
        if not isinstance(e, RuntimeError) or not any(k in text for k in ("gloo", "nccl", "c10d")):
            continue
        if any(s in text for s in ("connection closed by peer", "connection reset by peer", "pair closure",
                                   "timed out", "timeout", "broken pipe", "read error", "write error",
                                   "remote", "aborted", "ncclsystemerror")):
            return True
    return False


def _chain(exc: Optional[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 8:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


class Ender:
    """How a rank ends on a hang or a lost peer: the record, one line, the release, the requeue, the exit.

    record: appends one row to the run's metrics (the `hung` event). owns: whether the run still owns
    its directory (a rank woken after its job was replaced writes nothing there, requeues nothing)."""

    def __init__(self, run_dir: Path, rank: int, step: Callable[[], int], release: Callable[[], None],
                 requeue: Callable[[], bool], record: Callable[[dict], None],
                 owns: Callable[[], bool] = lambda: True):
        self.dir, self.rank = Path(run_dir), rank
        self._step, self._release, self._requeue, self._record, self.owns = step, release, requeue, record, owns
        self._once = threading.Lock()

    def end(self, kind: str, cause: str, exc: Optional[BaseException] = None) -> None:
        """Never returns. kind: 'hung' (no progress) or 'peer lost'."""
        if not self._once.acquire(blocking=False):
            time.sleep(3600)  # the other path is ending the process
        step, phase = self._step(), heartbeat.phase()
        ours = _safely(self.owns, True)
        path = self._write_stacks(kind, cause, step, phase, exc, ours)
        if ours:
            self._record({"event": "hung", "step": step, "reached": step, "signal": kind, "rank": self.rank,
                          "cause": cause, "phase": phase,
                          "stacks": os.path.relpath(path, self.dir) if path else None})
        where = path or ("stderr (the run directory could not be written)" if ours else
                         "stderr (the run directory is no longer this run's: nothing was written there)")
        log.error("rank %d: %s: %s, at step %d in %s; stacks in %s; ending with status %d (the last committed "
                  "checkpoint stays the one to resume from)", self.rank, kind, cause, step, phase, where, HANG_EXIT)
        for action in ((self._release, self._maybe_requeue) if ours else ()):
            try:
                action()
            except Exception as e:  # noqa: BLE001 -- ending anyway; say why the step was skipped
                log.warning("while ending: %s", first_line(e))
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        for h in logging.getLogger().handlers:
            try:
                h.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(HANG_EXIT)  # no interpreter teardown: it would wait on the broken process group

    def _maybe_requeue(self) -> None:
        if self._requeue():
            from preemptible.stopping import slurm

            if slurm.requeue():
                log.info("rank %d requeued the SLURM job %s", self.rank, slurm.job_id())

    def _write_stacks(self, kind: str, cause: str, step: int, phase: str, exc: Optional[BaseException],
                      ours: bool) -> Optional[Path]:
        lines = [f"preemptible watchdog: {kind}: {cause}",
                 f"rank {self.rank}, step {step}, phase: {phase}",
                 f"host {socket.gethostname()}, pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S %z')}", ""]
        if exc is not None:
            lines += ["the collective's error:", *traceback.format_exception(type(exc), exc, exc.__traceback__), ""]
        names = {t.ident: t.name for t in threading.enumerate()}
        main = threading.main_thread().ident
        for ident, frame in sorted(sys._current_frames().items(), key=lambda item: item[0] != main):
            lines.append(f"thread {names.get(ident, ident)} ({ident}):")
            lines += [s.rstrip("\n") for s in traceback.format_stack(frame)]
            lines.append("")
        text = "\n".join(lines) + "\n"
        path = self.dir / WATCHDOG / f"stacks-step{step:08d}-rank{self.rank}.txt"
        if not ours:
            sys.stderr.write(text)
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return path
        except OSError:
            sys.stderr.write(text)
            return None


class Watcher:
    """The watchdog's thread for one rank of one run (made by Run from a `Watchdog`)."""

    def __init__(self, options: Watchdog, ender: Ender, world_size: int, save_seconds: Callable[[], float]):
        self.options, self.ender, self.world_size = options, ender, world_size
        self._save_seconds = save_seconds
        self._dir = ender.dir / WATCHDOG
        self._mine = self._dir / f"rank{ender.rank}"
        self._token = f"{os.getpid()}:{socket.gethostname()}"
        self._armed = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._written = -1
        self._fd: Optional[int] = None  # this rank's beat file, rewritten in place (no new blocks: a full disk)
        self._peers: dict[str, tuple[str, float]] = {}  # file name -> (content, when it last changed)
        self._woke = time.monotonic()  # when the thread last woke from its poll

    def start(self) -> "Watcher":
        if self.world_size > 1:
            try:
                self._dir.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise ConfigError(f"{self._dir} is a file; the watchdog keeps each rank's beat file in a folder of "
                                  "that name: move the file away, or turn the watchdog off (watchdog=None)") from None
        self._thread = threading.Thread(target=self._loop, name="preemptible-watchdog", daemon=True)
        self._thread.start()
        return self

    def arm(self) -> None:
        """At the first step boundary: the pauses measured from here on set 'auto'."""
        if not self._armed:
            heartbeat.reset_longest()
            self._armed = True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def timeout(self) -> float:
        o = self.options
        if o.timeout != "auto":
            return float(o.timeout)
        return max(o.floor, o.factor * heartbeat.longest_pause(), o.factor * self._save_seconds())

    def _loop(self) -> None:
        while not self._stop.wait(self._poll()):
            try:
                self._woken()
                self._tick()
            except Exception as e:  # noqa: BLE001 -- a watchdog that fails must not end the run
                log.warning("the watchdog stopped watching: %s", first_line(e))
                return

    def _poll(self) -> float:
        t = self.options.timeout
        return min(1.0, max(0.05, (t if t != "auto" else self.options.floor) / 10))

    def _woken(self) -> None:
        """A suspension: this thread slept far past its poll, so the whole process was stopped
        (SIGSTOP, `scontrol suspend`, a paused VM or container). The span counts neither as this
        rank's idle time nor as any peer's: the watch goes on from where it stood before it."""
        now = time.monotonic()
        gap, self._woke = now - self._woke - self._poll(), now
        if gap <= SUSPENDED_AFTER:
            return
        heartbeat.suspended(gap)
        self._peers = {name: (content, seen + gap) for name, (content, seen) in self._peers.items()}
        log.warning("rank %d: this process was stopped for %.1fs (a suspension: SIGSTOP, a SLURM suspend, a paused "
                    "machine); the watchdog does not count it as a hang", self.ender.rank, gap)

    def _beat(self, count: int) -> None:
        """This rank's beat count in its file, for its peers: written in place, never while another
        run owns the directory (a rank woken after its job was replaced)."""
        if not _safely(self.ender.owns, True):
            return
        try:
            if self._fd is None:
                self._fd = os.open(self._mine, os.O_WRONLY | os.O_CREAT, 0o644)
            os.pwrite(self._fd, f"{self._token}:{count}".ljust(BEAT_WIDTH).encode(), 0)
            self._written = count
        except OSError:
            pass  # no room for the file's first block (a full disk): peers go without this rank's beats

    def _tick(self) -> None:
        count = heartbeat.count()
        if self.world_size > 1 and count != self._written:
            self._beat(count)
        if not self._armed:
            return
        limit, idle = self.timeout(), heartbeat.idle_seconds()
        if idle > limit / 2 and self.world_size > 1:
            idle = min(idle, self._peer_idle())
        if idle > limit and not self._stop.is_set():
            where = "on any rank" if self.world_size > 1 else "here"
            self.ender.end("hung", f"no progress {where} for {idle:.0f}s (timeout {limit:.0f}s)")

    def _peer_idle(self) -> float:
        """Seconds since any peer's beat file last changed, as seen from here (no clocks compared)."""
        now, newest = time.monotonic(), float("inf")
        try:
            names = [n for n in os.listdir(self._dir) if n.startswith("rank") and n != self._mine.name]
        except OSError:
            return newest
        for name in names:
            try:
                content = (self._dir / name).read_text()
            except OSError:
                continue
            seen = self._peers.get(name)
            if seen is None:
                self._peers[name] = (content, now - heartbeat.idle_seconds())  # first look: no newer than us
            elif seen[0] != content:
                self._peers[name] = (content, now)
            newest = min(newest, now - self._peers[name][1])
        return newest


def _safely(check: Callable[[], bool], default: bool) -> bool:
    try:
        return bool(check())
    except Exception:  # noqa: BLE001 -- cannot tell: as if it could
        return default


def check_watchdog(value: Any) -> Optional[Watchdog]:
    if value is None or isinstance(value, Watchdog):
        return value
    raise ConfigError(f"watchdog={type(value).__name__}; expected a preemptible.Watchdog or None (off)")
