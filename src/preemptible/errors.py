"""Errors a user can fix: the recipe prints them as one line and exits non-zero."""

from __future__ import annotations

import re
from typing import Optional


class ConfigError(ValueError):
    """A bad value in the configuration or on disk; the message names it and the fix.

    `part`: the part of `Run` whose argument the message names ("checkpoint" for `Checkpointer`'s
    `dir=`), where known: the message then names it as `Run`'s argument and the recipe's
    configuration both do (`checkpoint.dir=...`).
    """

    part: Optional[str] = None

    def __str__(self) -> str:
        message = super().__str__()
        return qualify(self.part, message) if self.part else message


def qualify(part: str, message: str) -> str:
    """`interval=-1; ...` from the checkpoint part reads `checkpoint.interval=-1; ...`."""
    if re.match(r"^[a-z_]+=", message):
        return f"{part}.{message}"
    return f"{part}: {message}"


def in_part(part: str, error: ConfigError) -> ConfigError:
    """Mark `error` as raised by `part` (kept if it already names one)."""
    if error.part is None:
        error.part = part
    return error


def first_line(e: BaseException) -> str:
    """An exception's first line (or its type's name when it has no message)."""
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__


def described(e: BaseException) -> str:
    """`Type: first line` (or the type alone): an exception in one line of a log or an error."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class CheckpointError(RuntimeError):
    """A save could not be completed; the previous committed checkpoint is untouched and still latest."""


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file names code or classes a checkpoint never holds; nothing of it was loaded."""


class CorruptCheckpointError(ConfigError):
    """A checkpoint file's bytes do not match the CRC-32C its commit marker recorded (found while
    loading it): the resume chooses again, with every checksum checked first."""
