"""DCP file writing that overlaps the flush to disk with the writing itself.

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
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

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


class _EarlyFlushStream:
    """A binary file whose written bytes are handed to the kernel for writeback every `kick_bytes`."""

    def __init__(self, f: Any, kick_bytes: int, kick: Callable[[int, int, int], None]):
        self._f, self._kick_bytes, self._kick = f, kick_bytes, kick
        self._fd = f.fileno()
        self._written = f.tell()  # counted here: tell() is a system call, and zip headers are many small writes
        self._kicked = self._written  # bytes before this offset have been handed to the kernel
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preemptible-writeback")

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        done = 0
        while done < len(view):  # up to each kick boundary: a 1 GiB tensor starts flushing after 8 MiB
            chunk = view[done:done + self._kicked + self._kick_bytes - self._written]
            self._f.write(chunk)
            done += len(chunk)
            self._written += len(chunk)
            if self._written - self._kicked >= self._kick_bytes:
                self._f.flush()  # the bytes must be in the page cache before writeback can see them
                self._pool.submit(self._kick, self._fd, self._kicked, self._written - self._kicked)
                self._kicked = self._written
        return len(view)

    def close(self) -> None:
        self._pool.shutdown(wait=True)  # no writeback request may outlive the descriptor
        self._f.close()

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, seek, ... as the file has them
        return getattr(self._f, name)


class EarlyFlushFileSystem(FileSystem):
    def __init__(self, kick_bytes: int):
        self.kick_bytes = kick_bytes

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        if mode != "wb" or start_writeback is None or self.kick_bytes <= 0:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        stream = _EarlyFlushStream(open(Path(path), "wb"), self.kick_bytes, start_writeback)
        try:
            yield stream
        finally:
            stream.close()


def file_writer(path: str | os.PathLike, thread_count: int, fsync: bool = True,
                kick_bytes: int = 8 << 20) -> FileSystemWriter:
    """DCP's FileSystemWriter; with fsync, writeback starts every `kick_bytes` (0: at the fsync)."""
    writer = FileSystemWriter(str(path), sync_files=fsync, thread_count=thread_count)
    if fsync:  # without, the bytes may stay in the page cache: starting writeback would only slow it
        writer.fs = EarlyFlushFileSystem(kick_bytes)
    return writer
