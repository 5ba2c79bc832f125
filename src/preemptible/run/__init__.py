"""The `Run` facade and its parts: state capture at step boundaries (`parts`, `state`), the data
contract (`feed`), and how a run ends (`ending`)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "Run":
        from preemptible.run.facade import Run

        return Run
    raise AttributeError(f"module 'preemptible.run' has no attribute {name!r}")
