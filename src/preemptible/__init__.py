"""preemptible: distributed PyTorch training that survives preemption."""

from preemptible import distributed as _distributed  # noqa: F401  (registers the exit guard for gloo threads)
from preemptible.signal_handler import (
    DistributedSignalHandler,
    GatherFuture,
    all_gather_item,
    get_device,
    parse_signals,
)
from preemptible.distributed import exit_run
from preemptible.stop import AgreedMax

__all__ = [
    "AgreedMax",
    "DistributedSignalHandler",
    "GatherFuture",
    "all_gather_item",
    "exit_run",
    "get_device",
    "parse_signals",
]
