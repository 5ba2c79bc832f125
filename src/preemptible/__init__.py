"""preemptible: distributed PyTorch training that survives preemption.

Importing it changes nothing process-wide (no signal handlers, atexit hooks, warning filters or
serialization settings) and imports nothing heavy: each public name is loaded on first use, so
that `preemptible.early.hold_signals()` can run before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "AgreedMax": "preemptible.stop",
    "CheckpointError": "preemptible.errors",
    "Checkpointer": "preemptible.checkpoint",
    "ConfigError": "preemptible.errors",
    "DistEnv": "preemptible.distributed",
    "DistributedSignalHandler": "preemptible.signal_handler",
    "GatherFuture": "preemptible.signal_handler",
    "Notice": "preemptible.notices",
    "Notices": "preemptible.notices",
    "Run": "preemptible.run",
    "SignalLike": "preemptible.signal_handler",
    "UnsafeCheckpointError": "preemptible.errors",
    "all_gather_item": "preemptible.signal_handler",
    "exit_run": "preemptible.distributed",
    "export_weights": "preemptible.export",
    "get_device": "preemptible.signal_handler",
    "hold_signals": "preemptible.early",
    "init_distributed": "preemptible.distributed",
    "load_model_weights": "preemptible.checkpoint",
    "params_sha256": "preemptible.state",
    "read_history": "preemptible.metrics",
    "read_metrics": "preemptible.metrics",
    "parse_signals": "preemptible.signal_handler",
    "resolve_signal": "preemptible.signal_handler",
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
