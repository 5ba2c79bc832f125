"""A run's lifecycle lines (resumed, stopped, done, already finished) on rank 0's stderr when the
application configured no logging: a library adds a handler only then, and only for the run's life.

To silence them: configure logging yourself (any handler on the root logger, as Hydra does), or
give the library's logger a level of its own, e.g. `logging.getLogger("preemptible").setLevel(
logging.WARNING)`. Warnings and errors are shown either way (as Python shows them with no logging
set up).
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Optional

LOGGER = "preemptible"
LIFECYCLE = {"lifecycle": True}  # `extra=` of a log record that is a lifecycle line
FORMAT = "preemptible: %(message)s"


class _LifecycleOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or bool(getattr(record, "lifecycle", False))


def attach(rank: int) -> Optional[Callable[[], None]]:
    """On rank 0 with no logging configured: show lifecycle lines and warnings on stderr until the
    returned function is called. None (nothing changed) anywhere else."""
    lib, root = logging.getLogger(LOGGER), logging.getLogger()
    if rank != 0 or root.handlers or lib.handlers or lib.level != logging.NOTSET:
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_LifecycleOnly())
    lib.addHandler(handler)
    lib.setLevel(logging.INFO)

    def detach() -> None:
        lib.removeHandler(handler)
        lib.setLevel(logging.NOTSET)
        handler.close()
    return detach
