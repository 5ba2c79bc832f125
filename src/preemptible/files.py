"""Small files written whole or not at all: a temporary file beside the target, then `os.replace`
(atomic on POSIX), and, when durable, fsync of the file and of its directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def fsync_path(path: Path, durable: bool = True) -> None:
    if not durable:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str, durable: bool = True, tmp_name: Optional[str] = None) -> None:
    """`path` holds `text` afterwards, or its old content if this fails part way. `tmp_name`: the
    temporary file's name (default `<name>.tmp`; a writer that may race another gives its own)."""
    tmp = path.with_name(tmp_name or path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:  # a full disk, say: no temporary file left behind
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_path(path.parent, durable)
