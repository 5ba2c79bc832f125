"""preemptible: distributed PyTorch training that survives preemption.

Importing it changes nothing process-wide (no signal handlers, atexit hooks, warning filters or
serialization settings) and imports nothing heavy: each public name is loaded on first use, so
that `preemptible.early.hold_signals()` can run before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "AgreedMax": "preemptible.stopping.vote",
    "CheckpointError": "preemptible.errors",
    "Checkpointer": "preemptible.checkpoint.writer",
    "ConfigError": "preemptible.errors",
    "DistEnv": "preemptible.distributed.env",
    "DistributedSignalHandler": "preemptible.stopping.signal_handler",
    "GatherFuture": "preemptible.stopping.signal_handler",
    "Notice": "preemptible.stopping.notices",
    "Notices": "preemptible.stopping.notices",
    "Run": "preemptible.run.facade",
    "SignalLike": "preemptible.stopping.signal_handler",
    "UnsafeCheckpointError": "preemptible.errors",
    "all_gather_item": "preemptible.stopping.signal_handler",
    "exit_run": "preemptible.distributed.env",
    "export_weights": "preemptible.observe.export",
    "get_device": "preemptible.stopping.signal_handler",
    "hold_signals": "preemptible.stopping.early",
    "init_distributed": "preemptible.distributed.env",
    "load_model_weights": "preemptible.checkpoint.writer",
    "params_sha256": "preemptible.run.state",
    "read_history": "preemptible.observe.metrics",
    "read_metrics": "preemptible.observe.metrics",
    "parse_signals": "preemptible.stopping.signal_handler",
    "resolve_signal": "preemptible.stopping.signal_handler",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'preemptible' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
