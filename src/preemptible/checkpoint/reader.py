"""Reading checkpoints back: DCP's load through the safe reader and planner (nothing runs code,
whoever wrote the checkpoint), and model weights for fine-tuning (`load_model_weights`)."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from preemptible.checkpoint.layout import read_marker, why_invalid
from preemptible.checkpoint.safe_load import SafePlanner, SafeReader
from preemptible.errors import ConfigError, CorruptCheckpointError, UnsafeCheckpointError
from preemptible.names import COMMIT


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns on every single-process save/load; single process is a supported mode here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class _NoMetadataTraceback(logging.Filter):
    """DCP logs a metadata file it cannot read on the root logger, with its traceback; the load's
    own error (one line: the checksum that does not match, the class that is not allowed) says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Global metadata is not found")


@contextmanager
def _quiet_metadata_fallback() -> Iterator[None]:
    quiet = _NoMetadataTraceback()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)



def describe_failure(e: BaseException) -> str:
    """One line for a DCP failure: the first failing rank's own exception, not DCP's wrapper."""
    failures = getattr(e, "failures", None)
    if failures:
        rank, (exc, _) = sorted(failures.items(), key=lambda kv: kv[0])[0]
        return f"{type(exc).__name__} on rank {rank}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"



def load_state(path: Path, state: dict[str, Any], what: str, checksums: bool = False) -> None:
    """DCP load through the safe reader and planner; ConfigError naming `what` on any failure.
    `checksums`: each file's CRC-32C checked as it is read (CorruptCheckpointError on every rank
    if any rank's file does not match; DCP gathers every rank's failure)."""
    try:
        listed = read_marker(path)["files"] if (Path(path) / COMMIT).exists() else None
    except ValueError as e:
        raise ConfigError(f"{what} is not a valid checkpoint: {e}") from None
    reader = SafeReader(str(path), listed, checksums=checksums)
    try:
        with _quiet_single_process(), _quiet_metadata_fallback():
            dcp.load(state, storage_reader=reader, planner=SafePlanner())
    except (UnsafeCheckpointError, CorruptCheckpointError) as e:
        raise type(e)(f"{what}: {e}") from None
    except (Exception, CheckpointException) as e:  # shape/key mismatches surface here, wrapped by DCP
        failed = [exc for exc, _ in getattr(e, "failures", {}).values()]
        for kind, own in ((UnsafeCheckpointError, reader.unsafe), (CorruptCheckpointError, reader.mismatch)):
            found = [exc for exc in failed if isinstance(exc, kind)]
            if own is not None or found:
                raise kind(f"{what}: {own or found[0]}") from None
        raise ConfigError(f"{what} does not fit this model/run: {describe_failure(e)}") from None


def load_model_weights(model: Any, path: str, verify: bool = True, name: str = "path") -> None:
    """Weights from one of our checkpoint directories or a torch.save'd state dict into `model`
    (read with weights_only=True: neither can run code). Errors call `path` by `name`."""
    p = Path(path)
    if p.is_dir():
        why = why_invalid(p, verify=verify)
        if why:
            raise ConfigError(f"{name}={path!r} is not a valid checkpoint: {why}")
        state = {"model_optim": {"model": model.state_dict()}}
        load_state(p, state, what=f"{name}={path!r}")
        model.load_state_dict(state["model_optim"]["model"])
        return
    if not p.is_file():
        raise ConfigError(f"{name}={path!r} does not exist; give a checkpoint directory or a .pt state dict")
    try:
        weights = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UnsafeCheckpointError(f"{name}={path!r} is not a plain state dict that loads without "
                                    f"running code ({type(e).__name__}); it was not loaded") from None
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ConfigError(f"{name}={path!r} does not fit the model: {str(e).splitlines()[0][:300]}") from None
