"""The signal sets, in one place.

- `DEFAULT`: what stops a run unless told otherwise: TERM (Kubernetes, torchrun forwarding, scancel),
  INT (Ctrl-C), HUP (the terminal or SSH session went away).
- `JOB_ENDING`: what launchers and schedulers send to end a job: the default set plus USR2 (SLURM's
  `--signal=B:USR2@N`). Held during the imports before a handler exists (`early.hold_signals`), and
  ignored once a run's last checkpoint is committed (`distributed.env.ignore_late_signals`).
- `LEFT_TO_THE_MAIN_PROCESS`: what a data-loader worker ignores (it shares the process group, so a
  signal to the group reaches it too): the job-ending set plus USR1 (NCCL and MPI use it).
"""

import collections.abc
from typing import Any, Union
import signal

DEFAULT = ("SIGTERM", "SIGINT", "SIGHUP")
JOB_ENDING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
LEFT_TO_THE_MAIN_PROCESS = (*JOB_ENDING, signal.SIGUSR1)

SignalLike = Union[int, str, signal.Signals]  # as NeMo Automodel's module names it
SignalSpec = Any  # SignalLike or a sequence of them
_ACCEPTED = "a signal.Signals, an int, a name such as 'SIGUSR2' or 'usr2', or a list of those"
_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}
# Not a request to stop: sent routinely for other reasons (a child exited, the terminal was resized,
# urgent socket data, a stopped process continued), or a fault the process itself raised.
_NOT_A_STOP = {getattr(signal, n): why for n, why in (
    ("SIGCHLD", "every child process's exit sends it (DataLoader workers, subprocesses)"),
    ("SIGWINCH", "a terminal resize sends it"), ("SIGURG", "urgent socket data sends it"),
    ("SIGCONT", "it resumes a stopped process"), ("SIGSEGV", "it is a memory fault of this process"),
    ("SIGBUS", "it is a memory fault of this process"), ("SIGFPE", "it is an arithmetic fault of this process"),
    ("SIGILL", "it is an illegal instruction in this process")) if hasattr(signal, n)}

# ----------------------------------------------------------------------------- parsing signals


def _one_signal(value: Any) -> signal.Signals:
    try:
        sig = resolve_signal(value)
    except TypeError:
        kind = "a bool" if isinstance(value, bool) else f"type {type(value).__name__}"
        raise ValueError(f"signal {value!r} has {kind}; expected {_ACCEPTED}") from None
    if sig in _UNCATCHABLE:
        raise ValueError(f"{sig.name} cannot be caught by any process; choose a catchable signal such as SIGTERM or SIGUSR2")
    if sig in _NOT_A_STOP:
        raise ValueError(f"{sig.name} is not a stop request ({_NOT_A_STOP[sig]}); choose SIGTERM, SIGINT, SIGHUP, "
                         "SIGUSR1 or SIGUSR2")
    return sig


def resolve_signal(sig: SignalLike) -> signal.Signals:
    """One signal spec -> its `signal.Signals` member, as NeMo Automodel's `resolve_signal`: an int
    (15), a member (signal.SIGTERM) or a case-insensitive name with or without SIG ('SIGTERM',
    'usr2'). ValueError for an unknown name or number, TypeError for another type (bool too:
    True would silently mean SIGHUP). Uncatchable signals resolve; a handler refuses them."""
    if isinstance(sig, bool) or not isinstance(sig, (int, str, signal.Signals)):
        raise TypeError(f"signal must be an int, str or signal.Signals, got {type(sig).__name__} ({sig!r})")
    if isinstance(sig, signal.Signals):
        return sig
    if isinstance(sig, int):
        try:
            return signal.Signals(sig)
        except ValueError:
            raise ValueError(f"Invalid signal number: {sig} (not a signal on this system); expected {_ACCEPTED}") from None
    name = sig.strip().upper()
    if name.lstrip("-").isdigit():
        return resolve_signal(int(name))
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"Unknown signal name: {sig!r}; expected {_ACCEPTED}") from None


def parse_signals(sig: SignalSpec) -> tuple[signal.Signals, ...]:
    """Normalise every accepted form to a tuple of distinct `signal.Signals` (or raise ValueError)."""
    if isinstance(sig, (str, bytes, int, signal.Signals)):
        items = [sig]
    elif isinstance(sig, collections.abc.Iterable):
        items = list(sig)
        if not items:
            raise ValueError(f"At least one signal must be provided (the list is empty); expected {_ACCEPTED}")
    else:
        items = [sig]
    parsed = tuple(_one_signal(v) for v in items)
    seen: set[int] = set()
    for value, s in zip(items, parsed):
        if s in seen:
            raise ValueError(f"Duplicate signals provided: {[p.name for p in parsed]} ({value!r} is {s.name} again); "
                             "list each signal once")
        seen.add(s)
    return parsed


# ----------------------------------------------------------------------------- collectives
