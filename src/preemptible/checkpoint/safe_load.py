"""Reading checkpoints without executing anything in them: checkpoints can come from others.

DCP reads `.metadata` with plain `pickle` and non-tensor entries with `torch.load(weights_only=
False)`; either runs whatever code a crafted file names. Here `.metadata` goes through an
unpickler that only builds DCP's own metadata classes (and the torch types they hold), and
non-tensor entries through `torch.load(weights_only=True)` (plain containers, numbers, strings,
tensors). Tensors DCP already reads with `weights_only=True`.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import StorageMeta

from preemptible.checkpoint.storage import file_crc32c
from preemptible.errors import CorruptCheckpointError, UnsafeCheckpointError
from preemptible.names import COMMIT

# Every global a DCP `.metadata` pickle refers to (torch 2.9-2.13), and nothing that can act.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"LoadItemType", "WriteItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
}


def _is_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format))


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_GLOBALS.get(module, ()) or _is_dtype(module, name):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"its .metadata refers to {module}.{name}, which a DCP checkpoint never "
                                    "contains; it was not loaded (a crafted file could run code when unpickled)")


def load_metadata(stream: Any) -> Any:
    """A DCP Metadata object from a `.metadata` stream, building only allowlisted classes."""
    return _MetadataUnpickler(stream).load()


def plain_name(name: Any) -> bool:
    """A file name that stays inside its checkpoint directory: no separator, not '.', '..' or empty."""
    return (isinstance(name, str) and name not in ("", ".", "..", COMMIT) and "/" not in name
            and "\\" not in name and "\0" not in name)


def check_metadata(metadata: Any, directory: str, listed: Optional[dict[str, Any]] = None) -> None:
    """UnsafeCheckpointError unless every byte range `.metadata` points at lies in a file of this
    checkpoint (listed by its commit marker, when `listed` is given) and every tensor's claimed
    size is covered by the bytes stored for it (a crafted size must not make anyone allocate it)."""
    stored: dict[str, int] = {}
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        name, offset, length = getattr(info, "relative_path", None), getattr(info, "offset", 0), getattr(info, "length", 0)
        if not plain_name(name):
            raise UnsafeCheckpointError(f"its .metadata points at {name!r}, outside the checkpoint's own files; "
                                        "it was not loaded")
        if listed is not None:
            if name not in listed:
                raise UnsafeCheckpointError(f"its .metadata points at {name!r}, which its commit marker does not "
                                            "list (unverified bytes); it was not loaded")
            size = listed[name][0]
        else:
            f = os.path.join(directory, name)
            size = os.path.getsize(f) if os.path.isfile(f) and not os.path.islink(f) else -1
        if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset and 0 <= length
                and offset + length <= size):
            raise UnsafeCheckpointError(f"its .metadata points at bytes {offset}+{length} of {name!r}, which "
                                        f"{'holds ' + str(size) + ' bytes' if size >= 0 else 'is not a file here'}; "
                                        "it was not loaded")
        fqn = getattr(index, "fqn", None)
        stored[fqn] = stored.get(fqn, 0) + length
    for fqn, entry in (getattr(metadata, "state_dict_metadata", None) or {}).items():
        size = getattr(entry, "size", None)
        if size is None:
            continue
        claimed = math.prod(size) * torch.empty((), dtype=entry.properties.dtype).element_size()
        if claimed > stored.get(fqn, 0):
            raise UnsafeCheckpointError(f"its .metadata claims {fqn!r} is {tuple(size)} ({claimed} bytes) but the "
                                        f"checkpoint stores {stored.get(fqn, 0)} bytes for it; it was not loaded")


def _sum(path: Any, stop: threading.Event, into: dict) -> None:
    try:
        into["v"] = file_crc32c(path, stop=stop)
    except OSError as e:  # the load's own read fails the same way; it reports it
        into["v"] = (None, None)
        into["error"] = e


class _Checksummed(FileSystem):
    """DCP's file system for reading, with each file the commit marker lists with a CRC-32C
    checked while DCP reads it: when DCP opens the file, a thread reads it once from disk and sums
    it (DCP's own reads meanwhile come from the page cache that read fills); when DCP closes it,
    the sum is compared. One read of each file from disk, not a verify pass and then a load pass."""

    def __init__(self, listed: dict[str, Any]):
        super().__init__()
        self.listed = listed
        self.mismatch: Optional[CorruptCheckpointError] = None  # DCP wraps what read_data raises: keep it

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[io.IOBase]:
        entry = self.listed.get(os.path.basename(str(path)))
        if mode != "rb" or not entry or entry[1] is None:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        stop, summed = threading.Event(), {}
        thread = threading.Thread(target=_sum, args=(path, stop, summed), daemon=True, name="preemptible-verify")
        thread.start()
        try:
            with super().create_stream(path, mode) as stream:
                yield stream
        except Exception:
            self._check(path, entry, thread, summed)  # changed bytes explain a failed read best
            raise
        except BaseException:  # KeyboardInterrupt, SystemExit: no waiting for the rest of the file
            stop.set()
            thread.join()
            raise
        self._check(path, entry, thread, summed)

    def _check(self, path: Any, entry: Any, thread: threading.Thread, summed: dict) -> None:
        thread.join()
        size, crc = summed.get("v", (None, None))
        if size is None:
            return
        if (size, crc) != (entry[0], entry[1]):
            self.mismatch = CorruptCheckpointError(
                f"{os.path.basename(str(path))} does not match its checksum (crc32c {crc:08x} of {size} bytes, the "
                f"commit says {entry[1]:08x} of {entry[0]}): its bytes changed after it was written")
            raise self.mismatch


class SafeReader(FileSystemReader):
    """DCP's FileSystemReader with `.metadata` read through the allowlisting unpickler, and
    checked to point only inside the checkpoint (`listed`: the commit marker's files). With
    `checksums`, every listed file's CRC-32C is checked as it is read (`_Checksummed`)."""

    unsafe: "UnsafeCheckpointError | None" = None  # DCP retries other metadata files after a failure: keep why

    def __init__(self, path: str, listed: Optional[dict[str, Any]] = None, checksums: bool = False, **kwargs: Any):
        super().__init__(path, **kwargs)
        self.listed = listed
        self.directory = str(path)
        if checksums and listed:
            self.fs = _Checksummed(listed)

    @property
    def mismatch(self) -> Optional[CorruptCheckpointError]:
        return getattr(self.fs, "mismatch", None)

    def read_metadata(self) -> Any:
        # No `rank=`: our checkpoints hold one global .metadata, so DCP's fallback to per-rank
        # metadata files (which it tries, with a second traceback, on readers that take kwargs) never runs.
        path = self._get_metadata_path()
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = load_metadata(f)
                check_metadata(metadata, self.directory, self.listed)
            except UnsafeCheckpointError as e:
                self.unsafe = e
                raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor entries read by `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"entry {read_item.dest_index.fqn!r} holds something other than plain "
                                        f"data ({str(e).splitlines()[0][:200]}); it was not loaded") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # what DCP's own planner uses

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def read_metadata(path: str, listed: Optional[dict[str, Any]] = None) -> Any:
    """The checkpoint's DCP metadata, read safely (UnsafeCheckpointError if it names anything else,
    points outside the checkpoint, or claims more bytes than it stores)."""
    return SafeReader(path, listed).read_metadata()
