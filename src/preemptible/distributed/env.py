"""torchrun's environment -> process group, and the few collectives the recipe needs."""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from preemptible.checks import seconds
from preemptible.errors import ConfigError
from preemptible.stopping.signals import JOB_ENDING


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        number = default if value is None else int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise ConfigError(f"environment variable {name}={value!r} is not a non-negative integer; it is set by "
                          "torchrun or the SLURM script: unset it to run one process, or launch with torchrun")
    return number


def read_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) from torchrun's/SLURM's variables; ConfigError if they do not fit."""
    present = [n for n in ("RANK", "WORLD_SIZE") if n in os.environ]
    if len(present) == 1:
        missing = "WORLD_SIZE" if present == ["RANK"] else "RANK"
        raise ConfigError(f"environment variable {present[0]} is set but {missing} is not; launch with torchrun "
                          "(which sets both), or unset it to run one process")
    world, rank, local = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or rank >= world:
        raise ConfigError(f"environment variables RANK={rank} and WORLD_SIZE={world} do not fit (need 0 <= RANK < "
                          "WORLD_SIZE); launch with torchrun")
    return world, rank, local


def init_distributed(device: str = "auto", timeout: Optional[float] = None) -> DistEnv:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); single process otherwise.
    timeout: seconds a collective may wait before it fails (None: torch's default, 10 min for NCCL and
    30 for gloo); `Watchdog(...).group_timeout` bounds a hang where no watchdog thread can run."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={device!r}; expected auto, cpu or cuda")
    seconds("timeout", timeout, strict=True, none_ok=True)
    world, rank, local = read_env()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use device=auto or cpu")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    # torchrun (and the SLURM example) set RANK even for one process: FSDP needs a group there too.
    if (world > 1 or "RANK" in os.environ) and not dist.is_initialized():
        extra = {"timeout": datetime.timedelta(seconds=timeout)} if timeout is not None else {}
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None, **extra)
    return DistEnv(rank, world, local, dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank (the identity in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


# What launchers and schedulers send to end a job; torchrun's agent SIGTERMs the remaining workers
# as soon as one exits with a non-zero status (a stop's 143), so a worker that is a moment slower
# would die by it and report -15.
LATE_SIGNALS = JOB_ENDING


def ignore_late_signals(extra: tuple = ()) -> None:
    """Once the run's last checkpoint is committed: TERM/INT/HUP/USR2 (and `extra`) no longer
    change how it ends. SIGKILL still does. Main thread only (a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in dict.fromkeys((*LATE_SIGNALS, *extra)):
        signal.signal(s, signal.SIG_IGN)


def exit_run(code: int, signals: tuple = (), fast: bool = True) -> None:
    """End a run that stopped or finished, with `code` as every rank's exit status.

    Call it on every rank after the last checkpoint is committed (after leaving the
    DistributedSignalHandler block): late signals are ignored (`ignore_late_signals`), every rank
    waits for the others (so none exits while another is still inside a collective, and the
    launcher sees every worker end the same way), the process group is destroyed, the exit is
    logged, and the process exits with `code`.

    fast: run the `atexit` handlers, flush logging and the standard streams, then leave without
    the interpreter's teardown (`os._exit`): with torch imported that teardown takes 0.6-1 s here,
    time a preemption's grace period pays for nothing, and it is where gloo's worker threads can
    abort a finished run. Objects' finalizers do not run then: close your own files before (or
    pass fast=False for a normal `sys.exit`).
    """
    if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 255:
        raise ValueError(f"exit_run(code={code!r}); expected an int from 0 to 255 (an exit status)")
    ignore_late_signals(signals)
    barrier()
    shutdown()
    logging.getLogger("preemptible").info("exiting with status %d", code)
    if fast:
        _kill_daemon_children()
        atexit._run_exitfuncs()  # what sys.exit would run first (trackers' flushes); no teardown follows
    else:
        let_gloo_workers_finish()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if fast:
        os._exit(code)
    sys.exit(code)


def _kill_daemon_children() -> None:
    """Daemonic children (DataLoader workers) die with the process anyway: multiprocessing's exit
    hook terminates, then joins them. A worker that ignores TERM (as the recipe's do, so that a
    TERM to the process group reaches only the main process) would make that join wait forever."""
    import multiprocessing

    children = [c for c in multiprocessing.active_children() if c.daemon]
    if children and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's DataLoader would report their end as an error
    for child in children:
        child.kill()


_GLOO_WORKER = "pt_gloo_runloop"  # the name ProcessGroupGloo gives its worker threads


def _gloo_workers_alive() -> bool:
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:  # no /proc: assume they may be there while torch.distributed is
        return is_distributed()
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith(_GLOO_WORKER):
                    return True
        except OSError:  # that thread has just exited
            pass
    return False


def let_gloo_workers_finish(seconds: float = 0.1) -> None:
    """Hand the GIL to gloo's worker threads once more before the interpreter finalizes.

    A worker releases a finished collective's tensors on its own thread, after the caller has
    moved on; if Python created them it needs the GIL for that. If the interpreter starts
    finalizing first, the thread is killed inside C++ and a run that ended cleanly aborts
    ("terminate called without an active exception", SIGABRT). DDP keeps its process group
    (and its threads) alive past destroy_process_group, so joining them is not an option:
    sleeping releases the GIL and the CPU so that a pending release completes. Runs at exit
    (`Run` calls it when it ends, `exit_run(fast=False)` before exiting; nothing is registered
    at import); costs `seconds` only while gloo workers exist.
    """
    if _gloo_workers_alive():
        time.sleep(seconds)
