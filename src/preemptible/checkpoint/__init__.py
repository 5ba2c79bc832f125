"""Checkpointing: the on-disk layout (read-only: markers, validity, names), lineage and the resume
decision, the writer (save, commit, prune, async), storage (checksummed writes), safe loading
(nothing that runs code), and the remote tier (s3://).

`preemptible.checkpoint.Checkpointer` and `load_model_weights` are loaded on first use, so a tool
that only reads (`layout`, `lineage`) never imports the writer.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"Checkpointer": "writer", "load_model_weights": "reader", "load_state": "reader"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'preemptible.checkpoint' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
