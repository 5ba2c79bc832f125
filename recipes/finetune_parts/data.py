"""Byte-level text that exists on every machine (the stdlib's sources), in a resumable order.

Data position is saved with torchdata's StatefulDataLoader and StatefulDistributedSampler: the
maintained way to resume mid-epoch without hand-written skipping.
"""

from __future__ import annotations

import glob
import os
import warnings
import signal
import sysconfig
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from preemptible.errors import ConfigError
from preemptible.stopping.signals import LEFT_TO_THE_MAIN_PROCESS


def stdlib_files() -> list[str]:
    """The running Python's standard-library sources, in a fixed order."""
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


class ByteWindows(Dataset):
    """Non-overlapping windows of `block_size + 1` bytes: (input, next-byte targets)."""

    def __init__(self, paths: Optional[Sequence[str]] = None, block_size: int = 128, max_bytes: int = 4_000_000):
        if isinstance(paths, str):
            paths = [paths]  # data.paths=FILE: one file, not its characters
        if paths is not None and (not isinstance(paths, Sequence) or not all(isinstance(p, str) for p in paths)):
            raise ConfigError(f"data.paths={paths!r}; expected a list of text files, e.g. data.paths=[a.txt,b.txt], "
                              "or null for the standard library's sources")
        if paths is not None and len(paths) == 0:
            raise ConfigError("data.paths=[] lists no files; give text files (data.paths=[my.txt]) or null for the "
                              "standard library's sources")
        for name, value, low in (("block_size", block_size, 1), ("max_bytes", max_bytes, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"data.{name}={value!r}; expected an int >= {low}")
        files = list(paths) if paths is not None else stdlib_files()
        chunks, total = [], 0
        for path in files:
            if not os.path.isfile(path):
                raise ConfigError(f"data.paths: {path!r} is not a file; give paths of text files")
            with open(path, "rb") as f:
                data = f.read(max(0, max_bytes - total))
            chunks.append(data)
            total += len(data)
            if total >= max_bytes:
                break
        data = b"".join(chunks)
        if len(data) < 2 * (block_size + 1):
            raise ConfigError(
                f"data.paths: {len(data)} bytes of text in {files[:3]}{'...' if len(files) > 3 else ''}; "
                f"need at least {2 * (block_size + 1)} (two windows of model.block_size+1)"
            )
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.block_size = block_size

    def __len__(self) -> int:
        return (len(self.data) - 1) // (self.block_size + 1)

    def __getitem__(self, i: int):
        w = self.data[i * (self.block_size + 1): (i + 1) * (self.block_size + 1)].long()
        return w[:-1], w[1:]


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """DataLoader workers share the process group, so a signal sent to it (Ctrl-C, a container
    runtime) reaches them too; one that died would break the loader before the main process
    saved. The main process decides; workers ignore preemption signals and keep serving, and
    exit with it (PyTorch's worker watchdog)."""
    signal.set_wakeup_fd(-1)  # inherited through fork: the parent's watcher must not see our signals
    for s in LEFT_TO_THE_MAIN_PROCESS:
        signal.signal(s, signal.SIG_IGN)


class Batches:
    """An endless, resumable stream of batches for one rank: epochs follow one another."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int, num_workers: int = 0):
        for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"data.{name}={value!r}; expected an int >= {low}")
        if len(dataset) < batch_size * world_size:
            raise ConfigError(
                f"data: {len(dataset)} windows cannot fill one batch of data.batch_size={batch_size} "
                f"on each of {world_size} ranks; add text or lower data.batch_size"
            )
        self.sampler = StatefulDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                  seed=seed, drop_last=True)
        # Its own generator: creating an iterator must not draw from the global RNG, or a resumed
        # run's dropout would differ from an uninterrupted one.
        with warnings.catch_warnings():  # torchdata's own deprecation notice about torch.set_vital: not the user's
            warnings.filterwarnings("ignore", message=".*set_vital.*is deprecated")
            self.loader = StatefulDataLoader(dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True,
                                             num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
                                             worker_init_fn=_leave_signals_to_the_main_process if num_workers else None)
        self.batch_size, self.world_size = batch_size, world_size
        self.epoch = 0
        self.seen = 0  # samples this rank has taken in the current epoch
        self._it: Optional[Iterator] = None

    def __next__(self):
        while True:
            if self._it is None:
                self.sampler.set_epoch(self.epoch)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
                self.seen += self.batch_size
                return batch
            except StopIteration:
                self.epoch += 1
                self.seen = 0
                self._it = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seen": self.seen, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.seen = state["epoch"], state["seen"]
        self.sampler.set_epoch(self.epoch)
        self.loader.load_state_dict(state["loader"])
        self._it = None

    def __iter__(self) -> "Batches":
        return self

    def global_position(self) -> dict[str, int]:
        """Where the stream is, the same on every rank (saved once; see `resume_position`)."""
        return {"epoch": self.epoch, "seen": self.seen}

    def resume_position(self, position: dict[str, int], saved_world_size: int) -> None:
        """A resume on another number of ranks: continue the global stream where it was."""
        self.reposition(position["epoch"], position["seen"] * saved_world_size)

    def reposition(self, epoch: int, global_seen: int) -> None:
        """Continue an epoch that another number of ranks had taken `global_seen` samples of.

        The epoch's permutation depends only on seed and epoch; rank r takes every world-th
        index, so skipping global_seen // world of its own indices continues the global stream
        (exactly when divisible; otherwise up to world-1 samples are skipped or repeated).
        """
        self.epoch, self.seen = epoch, global_seen // self.world_size
        self.sampler.set_epoch(epoch)
        self.sampler.load_state_dict({"yielded": self.seen})
        self._it = None


def make_batches(rank: int, world_size: int, seed: int, paths: Optional[Sequence[str]] = None, block_size: int = 128,
                 max_bytes: int = 4_000_000, batch_size: int = 16, num_workers: int = 0) -> Batches:
    """The `data` config group's target: text -> windows -> this rank's resumable batches."""
    dataset = ByteWindows(paths, block_size=block_size, max_bytes=max_bytes)
    return Batches(dataset, batch_size, rank, world_size, seed, num_workers=num_workers)
