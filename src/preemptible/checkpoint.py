"""The one place that writes and reads checkpoints (torch.distributed.checkpoint, DCP).

A checkpoint counts only when committed: every rank's files are written and fsync'd (DCP's
FileSystemWriter, flushing as it writes: storage.py; `fsync=false` trades this for speed),
`.metadata` exists, rank 0 has written a `COMMITTED` marker listing every file with its size, and
renamed `step_N.partial/` to `step_N/`. `latest` is replaced atomically after that. Older ones are
pruned only after a newer one is committed. Resume takes the newest valid checkpoint and says what
it skipped and why.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from preemptible.distributed import barrier, broadcast_object, is_distributed
from preemptible import faults
from preemptible.errors import CheckpointError, ConfigError
from preemptible.storage import file_writer

log = logging.getLogger(__name__)
# DCP says this on every single-process save/load; single process is a supported mode here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

COMMIT = "COMMITTED"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_path(path: Path, durable: bool = True) -> None:
    if not durable:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str, durable: bool = True) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent, durable)


@contextmanager
def _zip_crc32(enabled: bool) -> Iterator[None]:
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(enabled)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def step_of(path: Path) -> Optional[int]:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def describe_failure(e: BaseException) -> str:
    """One line for a DCP failure: the first failing rank's own exception, not DCP's wrapper."""
    failures = getattr(e, "failures", None)
    if failures:
        rank, (exc, _) = sorted(failures.items(), key=lambda kv: kv[0])[0]
        return f"{type(exc).__name__} on rank {rank}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def why_invalid(path: Path) -> Optional[str]:
    """None if `path` is a committed, complete checkpoint; otherwise the reason it is not."""
    if not path.is_dir():
        return "not a directory"
    marker = path / COMMIT
    if not marker.is_file():
        return f"no {COMMIT} marker (the save did not finish)"
    try:
        info = json.loads(marker.read_text())
        files = dict(info["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {COMMIT} marker ({e})"
    if ".metadata" not in files:
        return "the commit marker lists no .metadata"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, the commit says {size} (truncated or changed)"
    return None


class Checkpointer:
    """Save, commit, prune and find checkpoints under `dir` (default: `<run dir>/checkpoints`).

    interval: save every N steps (0: only on a stop signal and at the end).
    keep:     committed checkpoints kept (>= 1); older ones pruned after a newer commit.
    resume:   'auto' (newest valid one, if any), 'never', or a checkpoint directory path.
    async_save: periodic saves stage the state in memory and write it in a background thread
              (DCP `async_save` on a gloo side group of its own); a stop or the end waits for it.
    write_threads: files written in parallel per rank (DCP's thread_count).
    fsync:    make every file, the marker and `latest` durable before the save returns (default).
              false: a checkpoint survives the process being killed (the page cache is the
              kernel's), not a crash of the node's kernel or a power loss before the kernel has
              written it back (about 30 s on Linux defaults): torch.save's own durability.
    writeback_mib: ask the kernel to start flushing each file every this many MiB written, so the
              final fsync has little left to do (0: everything is flushed at the fsync).
    zip_crc32: let torch.save compute the zip CRC-32 of every tensor in a synchronous save.
              torch.load never checks it, and it is half the CPU time of writing; what resume
              checks is the commit marker's file sizes.
    """

    def __init__(self, dir: Optional[str] = None, interval: int = 100, keep: int = 2, resume: str = "auto",
                 async_save: bool = False, write_threads: int = 2, fsync: bool = True, writeback_mib: int = 8,
                 zip_crc32: bool = False):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
            raise ConfigError(f"checkpoint.interval={interval!r}; expected an int >= 0 (0 = only on stop and at the end)")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"checkpoint.keep={keep!r}; expected an int >= 1 (the newest committed checkpoints kept)")
        if isinstance(write_threads, bool) or not isinstance(write_threads, int) or write_threads < 1:
            raise ConfigError(f"checkpoint.write_threads={write_threads!r}; expected an int >= 1")
        for name, value in (("fsync", fsync), ("zip_crc32", zip_crc32)):
            if not isinstance(value, bool):
                raise ConfigError(f"checkpoint.{name}={value!r}; expected true or false")
        if isinstance(writeback_mib, bool) or not isinstance(writeback_mib, int) or writeback_mib < 0:
            raise ConfigError(f"checkpoint.writeback_mib={writeback_mib!r}; expected an int >= 0 "
                              "(0 = flush only at the final fsync)")
        if not isinstance(resume, str) or not resume:
            raise ConfigError(f"checkpoint.resume={resume!r}; expected auto, never or a checkpoint directory")
        self.dir, self.interval, self.keep, self.resume = dir, interval, keep, resume
        self.async_save, self.write_threads = bool(async_save), write_threads
        self.fsync, self.writeback_mib, self.zip_crc32 = fsync, writeback_mib, zip_crc32  # checked above
        self.root: Optional[Path] = None
        self.rank = 0
        self.last_committed_step: Optional[int] = None
        self.last_save_seconds: Optional[float] = None  # start to commit, of the latest save
        self._inflight: Optional[tuple] = None  # step, partial, final, future, start time
        self._staging: Any = None  # completes once the background copy of the state is taken
        self._stager: Any = None
        self._group: Any = None

    # -- setup -----------------------------------------------------------------------------

    def setup(self, run_dir: str, rank: int) -> "Checkpointer":
        """Bind to the run directory and prove it is writable, on every rank (so errors are symmetric)."""
        self.rank = rank
        self.root = Path(self.dir) if self.dir else Path(run_dir) / "checkpoints"
        probe = self.root / f".write-probe-rank{rank}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"checkpoint.dir={str(self.root)!r} is not writable ({e.strerror}); "
                              "choose a writable directory with checkpoint.dir=PATH") from None
        if self.async_save and is_distributed():
            # The background thread's collectives must not interleave with training's on one group.
            self._group = dist.new_group(backend="gloo")
        return self

    def due(self, step: int) -> bool:
        return self.interval > 0 and step % self.interval == 0

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    # -- finding ---------------------------------------------------------------------------

    def committed(self) -> list[Path]:
        """Valid checkpoints, newest first."""
        return [p for p, why in self._scan() if why is None]

    def _scan(self) -> list[tuple[Path, Optional[str]]]:
        dirs = [p for p in self.root.iterdir() if step_of(p) is not None] if self.root.is_dir() else []
        return [(p, why_invalid(p)) for p in sorted(dirs, key=step_of, reverse=True)]

    def newest_valid(self) -> Optional[Path]:
        latest = self.root / LATEST
        if latest.exists():
            name = latest.read_text(errors="replace").strip()
            if step_of(Path(name)) is None or not (self.root / name).is_dir():
                log.warning("checkpoint: ignoring %s: it names %r, not a checkpoint directory here", latest, name[:80])
        for path, why in self._scan():
            if why is None:
                return path
            log.warning("checkpoint: skipping %s: %s", path, why)
        return None

    def resume_path(self) -> Optional[Path]:
        """Where to resume from, decided by rank 0 and the same on every rank; ConfigError if invalid."""
        decision: Any = None
        if self.rank == 0:
            try:
                decision = self._decide()
            except ConfigError as e:
                decision = e
        decision = broadcast_object(decision)
        if isinstance(decision, ConfigError):
            raise decision
        return Path(decision) if decision else None

    def _decide(self) -> Optional[str]:
        if self.resume == "never":
            return None
        if self.resume == "auto":
            found = self.newest_valid()
            return str(found) if found else None
        path = Path(self.resume)
        why = why_invalid(path)
        if why:
            raise ConfigError(f"checkpoint.resume={self.resume!r} is not a valid checkpoint: {why}; "
                              "use checkpoint.resume=auto to take the newest valid one")
        return str(path)

    # -- reading and writing ----------------------------------------------------------------

    @staticmethod
    def world_size_of(path: Path) -> int:
        """How many ranks wrote a committed checkpoint (from its commit marker)."""
        return int(json.loads((Path(path) / COMMIT).read_text()).get("world_size", 1))

    def load(self, path: Path, state: dict[str, Any]) -> None:
        faults.inject("load")
        try:
            dcp.load(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:  # shape/key mismatches surface here, wrapped by DCP
            raise ConfigError(f"checkpoint {str(path)!r} does not fit this model/run: {describe_failure(e)}") from None

    def save(self, step: int, state: dict[str, Any], wait: bool = True) -> Path:
        """Collective: every rank calls it. With `wait` (a stop, the end) it returns once the
        checkpoint is committed; without, and with `async_save`, once the state is staged."""
        final = self.path_for(step)
        if self.last_committed_step == step or (self._inflight and self._inflight[0] == step):
            if wait:
                self.wait()
            return final  # this exact state is already saved or being saved
        self.wait()  # one save at a time: finish (and commit) the one in flight first
        started = time.time()
        partial = final.with_name(final.name + ".partial")
        if self.rank == 0 and partial.exists():
            shutil.rmtree(partial)  # a torn earlier attempt at the same step
        barrier()
        writer = file_writer(partial, self.write_threads, self.fsync, self.writeback_mib << 20)
        if self.async_save and not wait:
            response = dcp.async_save(state, storage_writer=writer, process_group=self._group,
                                      async_stager=self._async_stager())
            self._staging = response.staging_completion
            self._inflight = (step, partial, final, response.upload_completion, started)
            return final
        try:
            with _zip_crc32(self.zip_crc32):  # safe to switch here: nothing else is saving meanwhile
                dcp.save(state, storage_writer=writer)  # returns after .metadata is written by the coordinator
            faults.inject("save", step)
            if self.rank == 0:
                self._commit(partial, final, step)
        except (Exception, CheckpointException) as e:
            raise self._failed(final, e) from None
        barrier()
        self.last_committed_step = step
        self.last_save_seconds = time.time() - started
        return final

    def _async_stager(self) -> Any:
        # Copies the state in a background thread, into buffers reused from save to save, while
        # the next forward/backward runs (they only read the weights): see wait_staged().
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=True, use_non_blocking_copy=cuda))
        return self._stager

    def wait_staged(self) -> None:
        """Call before the optimizer changes the weights: an async save's copy must be complete."""
        if self._staging is not None:
            self._staging.result()
            self._staging = None

    def close(self) -> None:
        """Finish and commit any save in flight; free the staging buffers."""
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def poll(self) -> None:
        """At a step boundary: commit an async save that has finished (never blocks)."""
        if self._inflight is not None and self._inflight[3].done():
            self.wait()

    def wait(self) -> None:
        """Block until the in-flight async save is written, then commit it (rank 0)."""
        if self._inflight is None:
            return
        step, partial, final, future, started = self._inflight
        self._inflight = None
        self.wait_staged()
        try:
            future.result()  # re-raises a failed write
            faults.inject("save", step)
            # The coordinator's future completes only after every rank's files and .metadata exist.
            if self.rank == 0:
                self._commit(partial, final, step)
        except (Exception, CheckpointException) as e:
            raise self._failed(final, e) from None
        self.last_committed_step = step
        self.last_save_seconds = time.time() - started

    def _failed(self, final: Path, e: BaseException) -> CheckpointError:
        kept = self.path_for(self.last_committed_step).name if self.last_committed_step is not None else "none"
        return CheckpointError(f"checkpoint {final.name} could not be written ({describe_failure(e)}); "
                               f"nothing was committed, the latest committed checkpoint ({kept}) is intact")

    def _commit(self, partial: Path, final: Path, step: int) -> None:
        files = {p.name: p.stat().st_size for p in partial.iterdir() if p.is_file()}
        world = dist.get_world_size() if is_distributed() else 1
        _write_atomic(partial / COMMIT, json.dumps({"step": step, "world_size": world, "time": time.time(),
                                                    "files": files}), self.fsync)
        if final.exists():  # an older run's checkpoint at the same step (resume=never): replace it
            old = final.with_name(final.name + ".replaced")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(partial, final)
            shutil.rmtree(old)
        else:
            os.rename(partial, final)
        _fsync_path(self.root, self.fsync)
        _write_atomic(self.root / LATEST, final.name + "\n", self.fsync)
        self._prune(final)

    def _prune(self, newest: Path) -> None:
        for path in self.committed()[self.keep:]:
            shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob("step_*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        log.debug("checkpoint: committed %s", newest)


def load_model_weights(model: Any, path: str) -> None:
    """`model.init_from`: weights from one of our checkpoint directories or a torch.save'd state dict."""
    import torch

    p = Path(path)
    try:
        if p.is_dir():
            why = why_invalid(p)
            if why:
                raise ConfigError(f"model.init_from={path!r} is not a valid checkpoint: {why}")
            state = {"model_optim": {"model": model.state_dict()}}
            dcp.load(state, checkpoint_id=str(p))
            model.load_state_dict(state["model_optim"]["model"])
        elif p.is_file():
            model.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
        else:
            raise ConfigError(f"model.init_from={path!r} does not exist; give a checkpoint directory or a .pt state dict")
    except ConfigError:
        raise
    except (Exception, CheckpointException) as e:
        raise ConfigError(f"model.init_from={path!r} does not fit the model: {describe_failure(e)}") from None
