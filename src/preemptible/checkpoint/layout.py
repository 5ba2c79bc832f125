"""What a checkpoint is on disk, read-only: names, the commit marker, validity and lineage.

A checkpoint is a directory `step_N/` under the checkpoint root, counting only when committed:
every rank's files are written and checksummed (CRC-32C), `.metadata` exists, and rank 0 has
written a `COMMITTED` marker listing every file with its size and checksum (and a checksum of
itself), then renamed `step_N.partial/` to `step_N/`. `latest` names the run's head. Nothing here
writes; readers (status, export, the resume decision) and the writer share it.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from preemptible.checkpoint.safe_load import plain_name
from preemptible.checkpoint.storage import file_crc32c
from preemptible.errors import ConfigError
from preemptible.names import ABANDONED, COMMIT, LATEST  # noqa: F401  (read by the writer and lineage)

FORMAT = 2  # markers with checksums and lineage
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_of(path: Path) -> Optional[int]:
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def marker_checksum(info: dict[str, Any]) -> int:
    """CRC-32C of a marker's JSON without its own `marker_crc32c` (keys sorted)."""
    import crc32c

    rest = {k: v for k, v in info.items() if k != "marker_crc32c"}
    return crc32c.crc32c(json.dumps(rest, sort_keys=True).encode())


def read_marker(path: Path) -> dict[str, Any]:
    """The commit marker as a dict (files: name -> [size, crc32c or None]); ValueError if unreadable,
    if it lists a file outside its directory, or if its own checksum does not match."""
    try:
        info = json.loads((Path(path) / COMMIT).read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
        crc = info.get("marker_crc32c")
        if crc is not None and crc != marker_checksum(info):
            raise ValueError("it does not match its own checksum: it changed after it was written")
        files = {name: (list(v) if isinstance(v, (list, tuple)) else [v, None]) for name, v in dict(info["files"]).items()}
        for name, (size, crc) in files.items():
            if not plain_name(name):
                raise ValueError(f"it lists {name!r}, which is not a file of this checkpoint's own directory")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or not (
                    crc is None or (isinstance(crc, int) and not isinstance(crc, bool))):
                raise ValueError(f"bad entry for {name}")
        info["files"] = files
        for key in ("step", "world_size"):
            value = info.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "step" else 1):
                raise ValueError(f"{key}={value!r} is not a {'step number' if key == 'step' else 'rank count'}")
        info.setdefault("world_size", 1)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"unreadable {COMMIT} marker ({e})") from None
    if not isinstance(info.get("lineage"), str):  # a marker from before lineages: a line of its own
        info["lineage"] = "legacy"
    line = info.get("line")
    if not (isinstance(line, list) and line and all(isinstance(s, list) and len(s) == 2 for s in line)):
        info["line"] = [[info["lineage"], None]]
    return info


def why_invalid(path: Path, verify: bool = False) -> Optional[str]:
    """None if `path` is a committed, complete checkpoint; otherwise the reason it is not.

    Without `verify` only sizes are checked (cheap); with it every file's CRC-32C too (reads it all).
    Every file must be a regular file inside the directory (not a link): nothing outside a
    checkpoint is ever read through it.
    """
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    if not (path / COMMIT).is_file() or (path / COMMIT).is_symlink():
        return f"no {COMMIT} marker (the save did not finish)"
    try:
        files = read_marker(path)["files"]
    except ValueError as e:
        return str(e)
    if ".metadata" not in files:
        return "the commit marker lists no .metadata"
    for name, (size, _) in files.items():
        f = path / name
        if f.is_symlink():
            return f"{name} is a link (a checkpoint's files are its own)"
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, the commit says {size} (truncated or changed)"
    if verify:
        return _verify_checksums(path, files)
    return None


def _verify_checksums(path: Path, files: dict[str, list]) -> Optional[str]:
    names = [n for n, (_, crc) in files.items() if crc is not None]
    if not names:
        return None  # an old marker without checksums: sizes are all it can say
    names.sort(key=lambda n: -files[n][0])  # biggest first: the pool finishes together
    with ThreadPoolExecutor(max_workers=min(4, len(names)), thread_name_prefix="preemptible-verify") as pool:
        for name, (size, crc) in zip(names, pool.map(lambda n: file_crc32c(path / n), names)):
            if crc != files[name][1]:
                return (f"{name} does not match its checksum (crc32c {crc:08x}, the commit says "
                        f"{files[name][1]:08x}): its bytes changed after it was written")
    return None


def in_line(marker: dict[str, Any], line: list) -> bool:
    """Whether a checkpoint (its marker) is on `line`: the line's own lineage, or an ancestor segment."""
    lineage, step = marker["lineage"], marker["step"]
    if lineage == line[-1][0]:
        return True
    return any(seg_lineage == lineage and seg_end is not None and step <= seg_end for seg_lineage, seg_end in line[:-1])


# What a commit marker holds of its own; meta= cannot replace these.
MARKER_KEYS = ("format", "step", "world_size", "time", "files", "lineage", "line", "parent", "run_dir",
               "marker_crc32c")


def check_meta(meta: Any) -> None:
    """meta= goes into every commit marker (JSON): plain JSON data, under keys of its own."""
    if meta is None:
        return
    if not isinstance(meta, dict):
        raise ConfigError(f"meta={meta!r}; expected a dict of JSON data (str keys) or None")
    for key, value in meta.items():
        if not isinstance(key, str) or key in MARKER_KEYS:
            raise ConfigError(f"meta key {key!r}: expected a str other than {', '.join(MARKER_KEYS)}")
        try:
            json.dumps(value, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"meta[{key!r}] is not JSON data ({e}); store str, numbers, bools, None, lists "
                              "and dicts (x.isoformat() for a datetime, x.tolist() for a tensor)") from None
