"""Reading checkpoints without executing anything in them: checkpoints can come from others.

DCP reads `.metadata` with plain `pickle` and non-tensor entries with `torch.load(weights_only=
False)`; either runs whatever code a crafted file names. Here `.metadata` goes through an
unpickler that only builds DCP's own metadata classes (and the torch types they hold), and
non-tensor entries through `torch.load(weights_only=True)` (plain containers, numbers, strings,
tensors). Tensors DCP already reads with `weights_only=True`.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta

from preemptible.errors import UnsafeCheckpointError

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


class SafeReader(FileSystemReader):
    """DCP's FileSystemReader with `.metadata` read through the allowlisting unpickler."""

    unsafe: "UnsafeCheckpointError | None" = None  # DCP retries other metadata files after a failure: keep why

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = load_metadata(f)
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


def read_metadata(path: str) -> Any:
    """The checkpoint's DCP metadata, read safely (UnsafeCheckpointError if it names anything else)."""
    return SafeReader(path).read_metadata()
