"""preemptible: distributed PyTorch training that survives preemption.

Importing it changes nothing process-wide (no signal handlers, atexit hooks, warning filters or
serialization settings) and imports nothing heavy: each public name is loaded on first use, so
that `preemptible.hold_signals()` can run before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    # the loop and its parts
    "Run": "preemptible.run.facade",
    "Checkpointer": "preemptible.checkpoint.writer",
    "Stopping": "preemptible.stopping.options",
    "Ownership": "preemptible.ownership.lease",
    "Report": "preemptible.observe.report",
    "Watchdog": "preemptible.stopping.watchdog",
    "HANG_EXIT": "preemptible.stopping.watchdog",
    "Notices": "preemptible.stopping.notices",
    "Notice": "preemptible.stopping.notices",
    "TensorBoard": "preemptible.observe.trackers",
    "WandB": "preemptible.observe.trackers",
    "MLflow": "preemptible.observe.trackers",
    # what a run gives back, and the contracts it takes
    "Stop": "preemptible.stopping.decision",
    "History": "preemptible.observe.metrics",
    "DataSource": "preemptible.contracts",
    "PositionedData": "preemptible.contracts",
    "Tracker": "preemptible.contracts",
    "NoticeSource": "preemptible.contracts",
    # errors
    "CheckpointError": "preemptible.errors",
    "ConfigError": "preemptible.errors",
    "UnsafeCheckpointError": "preemptible.errors",
    "CorruptCheckpointError": "preemptible.errors",
    # tools
    "export_weights": "preemptible.observe.export",
    "load_model_weights": "preemptible.checkpoint.reader",
    "params_sha256": "preemptible.run.state",
    "read_history": "preemptible.observe.metrics",
    "read_metrics": "preemptible.observe.metrics",
    # processes and signals (the documented signal-handling API and its plumbing)
    "DistributedSignalHandler": "preemptible.stopping.signal_handler",
    "GatherFuture": "preemptible.stopping.signal_handler",
    "SignalLike": "preemptible.stopping.signal_handler",
    "all_gather_item": "preemptible.stopping.signal_handler",
    "get_device": "preemptible.stopping.signal_handler",
    "parse_signals": "preemptible.stopping.signal_handler",
    "resolve_signal": "preemptible.stopping.signal_handler",
    "AgreedMax": "preemptible.stopping.vote",
    "hold_signals": "preemptible.stopping.early",
    "DistEnv": "preemptible.distributed.env",
    "exit_run": "preemptible.distributed.env",
    "init_distributed": "preemptible.distributed.env",
}

__all__ = sorted(_WHERE)

if TYPE_CHECKING:  # what type checkers and IDEs see behind the lazy names
    from preemptible.checkpoint.reader import load_model_weights
    from preemptible.checkpoint.writer import Checkpointer
    from preemptible.contracts import DataSource, NoticeSource, PositionedData, Tracker
    from preemptible.distributed.env import DistEnv, exit_run, init_distributed
    from preemptible.errors import CheckpointError, ConfigError, CorruptCheckpointError, UnsafeCheckpointError
    from preemptible.observe.export import export_weights
    from preemptible.observe.metrics import History, read_history, read_metrics
    from preemptible.observe.report import Report
    from preemptible.observe.trackers import MLflow, TensorBoard, WandB
    from preemptible.ownership.lease import Ownership
    from preemptible.run.facade import Run
    from preemptible.run.state import params_sha256
    from preemptible.stopping.decision import Stop
    from preemptible.stopping.early import hold_signals
    from preemptible.stopping.notices import Notice, Notices
    from preemptible.stopping.options import Stopping
    from preemptible.stopping.signal_handler import (DistributedSignalHandler, GatherFuture, SignalLike,
                                                     all_gather_item, get_device, parse_signals, resolve_signal)
    from preemptible.stopping.vote import AgreedMax
    from preemptible.stopping.watchdog import HANG_EXIT, Watchdog


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'preemptible' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
