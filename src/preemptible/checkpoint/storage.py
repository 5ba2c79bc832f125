"""DCP file writing that checksums every file while writing it and overlaps the flush to disk with it.

Every byte written passes through a CRC-32C (crc32c: hardware-accelerated, ~10 GB/s, releases the
GIL, and the checksum S3 verifies natively), so a file's checksum costs no second read. Each rank
records its files' checksums and sizes in `.sums_<rank>.json` once its files are written; rank 0
folds them into the commit marker (checkpoint.py), and a resume verifies them.

DCP's FileSystemWriter writes a file into the page cache and fsyncs it at the end, so a durable
save costs write time plus flush time. Here every `kick_bytes` written, a helper thread asks the
kernel to start writing those bytes back (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: it returns
without waiting for the disk; the writer thread never waits on the disk queue). By the final
fsync little is left to flush. Same files, same format, same fsync: the flush only starts earlier.
Where sync_file_range does not exist (not Linux), files are written exactly as DCP does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import crc32c
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from preemptible import faults, heartbeat
from preemptible.files import fsync_path, write_atomic  # noqa: F401  (this module's face: the writer imports them here)

SUMS_PREFIX = ".sums_"  # .sums_<rank>.json: {file name: [size, crc32c]} of the files that rank wrote

_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start write-out of dirty pages in the range, do not wait


def _load_sync_file_range() -> Optional[Callable[[int, int, int], None]]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range  # ctypes releases the GIL for the call
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # a failure only means a later, longer fsync

    return start_writeback


start_writeback = _load_sync_file_range()


class _ChecksumStream:
    """A binary file written front to back whose bytes are checksummed as they pass (CRC-32C) and,
    with `kick`, handed to the kernel for writeback every `kick_bytes`."""

    def __init__(self, f: Any, kick_bytes: int = 0, kick: Optional[Callable[[int, int, int], None]] = None,
                 on_close: Optional[Callable[[int, int], None]] = None):
        self._f, self._kick_bytes, self._kick, self._on_close = f, kick_bytes, kick, on_close
        self._fd = f.fileno()
        self._written = f.tell()  # counted here: tell() is a system call, and zip headers are many small writes
        self._kicked = self._written  # bytes before this offset have been handed to the kernel
        self.crc = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preemptible-writeback") if kick else None

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self._pool is None:
            self._f.write(view)
            self.crc = crc32c.crc32c(view, self.crc)
            self._written += len(view)
            return len(view)
        done = 0
        while done < len(view):  # up to each kick boundary: a 1 GiB tensor starts flushing after 8 MiB
            chunk = view[done:done + self._kicked + self._kick_bytes - self._written]
            self._f.write(chunk)
            self.crc = crc32c.crc32c(chunk, self.crc)  # while the kernel copies the previous chunk out
            done += len(chunk)
            self._written += len(chunk)
            if self._written - self._kicked >= self._kick_bytes:
                self._f.flush()  # the bytes must be in the page cache before writeback can see them
                self._pool.submit(self._kick, self._fd, self._kicked, self._written - self._kicked)
                self._kicked = self._written
                faults.inject("chunk")  # the fault suite's slow disk: each 8 MiB takes this long
                heartbeat.beat()  # a save making progress is not a stuck rank (signal escalation)
        return len(view)

    def seek(self, *args: Any) -> int:
        raise OSError("checkpoint files are written front to back (a seek would break their checksum)")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # no writeback request may outlive the descriptor
        self._f.close()
        heartbeat.beat()
        if self._on_close is not None:
            self._on_close(self._written, self.crc)

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, seek, ... as the file has them
        return getattr(self._f, name)


class ChecksumFileSystem(FileSystem):
    """DCP's local file system; every file written gets its size and CRC-32C recorded in `sums`
    (by file name; `.metadata.tmp` as `.metadata`, the name DCP renames it to)."""

    def __init__(self, kick_bytes: int = 0):
        self.kick_bytes = kick_bytes
        self.sums: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        name = Path(path).name
        name = name[:-len(".tmp")] if name == ".metadata.tmp" else name

        def record(size: int, crc: int) -> None:
            with self._lock:
                self.sums[name] = (size, crc)

        faults.inject("write")
        kick = start_writeback if self.kick_bytes > 0 else None
        stream = _ChecksumStream(open(Path(path), "wb"), self.kick_bytes, kick, record)
        try:
            yield stream
        finally:
            stream.close()


class ChecksumWriter(FileSystemWriter):
    """DCP's FileSystemWriter whose files are checksummed while written; once this rank's files
    are written (and fsync'd), their sums go to `.sums_<rank>.json` beside them, before DCP's
    coordinator writes `.metadata`: so they exist whenever `.metadata` does."""

    def _write_data(self, planner: Any, file_queue: Any) -> Any:
        future = super()._write_data(planner, file_queue)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        with self.fs._lock:
            sums = {name: list(v) for name, v in self.fs.sums.items() if name != ".metadata"}
        path = Path(self.path) / f"{SUMS_PREFIX}{rank}.json"
        with open(path, "w") as f:
            json.dump(sums, f)
            f.flush()
            if self.sync_files:
                os.fsync(f.fileno())
        return future


def file_writer(path: str | os.PathLike, thread_count: int, fsync: bool = True,
                kick_bytes: int = 8 << 20) -> ChecksumWriter:
    """DCP's FileSystemWriter, checksumming as it writes; with fsync, writeback starts every
    `kick_bytes` (0: at the fsync); without, the bytes may stay in the page cache (starting
    writeback early would only slow it)."""
    writer = ChecksumWriter(str(path), sync_files=fsync, thread_count=thread_count)
    writer.fs = ChecksumFileSystem(kick_bytes if fsync and start_writeback is not None else 0)
    return writer


def file_crc32c(path: str | os.PathLike, chunk: int = 8 << 20,
                stop: Optional[threading.Event] = None) -> tuple[int, int]:
    """(size, CRC-32C) of a file as it is on disk now (what a resume verifies); `stop` set: it
    returns early (what it has read so far)."""
    crc, size = 0, 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n or (stop is not None and stop.is_set()):
                return size, crc
            crc = crc32c.crc32c(view[:n], crc)
            size += n


# ----------------------------------------------------------------------------- atomic small files
