"""The one place that writes and reads checkpoints (torch.distributed.checkpoint, DCP).

Commit. A checkpoint counts only when committed: every rank's files are written, checksummed while
written (CRC-32C, storage.py) and fsync'd, `.metadata` exists, and rank 0 has written a `COMMITTED`
marker listing every file with its size and checksum, then renamed `step_N.partial/` to `step_N/`.

Head and lineage. `latest` names the run's head: the checkpoint it last committed or resumed from,
with the head's *line* (its ancestry: a list of [lineage id, last step] segments). A run continues
its head's lineage; resuming from an older checkpoint (`resume=PATH`) starts a new lineage there,
and the checkpoints that are not its ancestors are moved to `abandoned/` (kept, never pruned,
unless `keep_abandoned=false`). `auto` follows the head (and a newer commit of its lineage, if one
was committed but `latest` not yet replaced), never merely the highest step number; the same
command with `resume=PATH` again continues the branch it started at PATH. Pruning keeps the newest
`keep` of the head's line and nothing else is touched.

Trust. A resume verifies every file's size and checksum before loading and skips a checkpoint
that does not match, saying why. Nothing in a checkpoint is unpickled beyond plain data and DCP's
own metadata classes (safe_load.py), so a checkpoint from someone else cannot run code.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from preemptible import faults, heartbeat
from preemptible.distributed.env import barrier, is_distributed
from preemptible.errors import CheckpointError, ConfigError
from preemptible.checkpoint.remote import Remote, Uploader, is_remote
from preemptible.checkpoint.layout import (ABANDONED, check_meta, COMMIT, FORMAT, LATEST, in_line, marker_checksum,  # noqa: F401
                                           read_marker, step_of, why_invalid)  # (this module's face: re-exported)
from preemptible.checkpoint.lineage import Finding, Resume  # noqa: F401 -- Resume: part of this module's face
from preemptible.checkpoint.reader import _quiet_single_process, describe_failure, load_model_weights, load_state  # noqa: F401,E501
from preemptible.checks import boolean, number
from preemptible.checkpoint.storage import SUMS_PREFIX, file_writer, fsync_path, write_atomic
from preemptible.names import CHECKPOINTS

log = logging.getLogger("preemptible.checkpoint")  # the name users filter on (stable across moves)

@contextmanager
def _zip_crc32(enabled: bool) -> Iterator[None]:
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(enabled)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


PROBE_BYTES = 4 << 20  # written (and fsync'd) once at setup: the write speed an untimed save is estimated from


def _write_speed(probe: Path, durable: bool) -> float:
    """Bytes per second of one PROBE_BYTES write to `probe` (removed again), fsync'd if `durable`."""
    block = os.urandom(1 << 20)
    started = time.perf_counter()
    try:
        with open(probe, "wb") as f:
            for _ in range(PROBE_BYTES >> 20):
                f.write(block)
            f.flush()
            if durable:
                os.fsync(f.fileno())
    finally:
        probe.unlink(missing_ok=True)
    return PROBE_BYTES / max(time.perf_counter() - started, 1e-4)


class Checkpointer(Finding):
    """Save, commit, prune and find checkpoints under `dir` (default: `<run dir>/checkpoints`).

    interval: save every N steps (0: only on a stop signal and at the end), or 'auto': the interval
              that minimises the expected lost time from the measured cost of a save and the
              expected time between interruptions (Daly's rule; `preemptible.checkpoint.interval`).
    interrupt_every: with interval='auto', seconds expected between interruptions (None: learned
              from the run directory's history of stops, kills and hangs; with none yet, one is
              assumed as far ahead as the run directory has been alive, and saves take at most
              10 % of the time).
    keep:     committed checkpoints of the run's line kept (>= 1); older ones pruned after a newer commit.
    resume:   'auto' (the head, or the newest valid checkpoint of its line), 'never' (start fresh;
              refused where committed checkpoints exist), or a checkpoint directory path (start a
              branch there; the same command again continues that branch).
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
              torch.load never checks it; what a resume checks is the commit marker's CRC-32C of
              every file, computed while writing whatever this says.
    verify:   check every file's CRC-32C before resuming from a checkpoint (reads it once).
    keep_abandoned: when a resume from an older checkpoint starts a new branch, move the
              checkpoints that are not its ancestors to `abandoned/` (true) or delete them (false).

    dir may be `s3://bucket/prefix` (the `s3` extra): checkpoints are then written and committed in
    `local_dir` (default `<run dir>/checkpoints`) exactly as on disk, and uploaded in the background
    (`preemptible.remote`): data objects first, the marker object last, then `latest`. A resume on a
    machine without them downloads the newest valid remote checkpoint (sizes and CRC-32C checked).
    The local tier must be visible to every rank (one node, or a shared filesystem).
    """

    def __init__(self, dir: Optional[str | os.PathLike] = None, interval: int = 100, keep: int = 2,
                 resume: str | os.PathLike = "auto",
                 async_save: bool = False, write_threads: int = 2, fsync: bool = True, writeback_mib: int = 8,
                 zip_crc32: bool = False, verify: bool = True, keep_abandoned: bool = True,
                 local_dir: Optional[str | os.PathLike] = None, meta: Optional[dict[str, Any]] = None,
                 interrupt_every: Optional[float] = None):
        dir, resume, local_dir = (os.fspath(v) if isinstance(v, os.PathLike) else v for v in (dir, resume, local_dir))
        number("interval", interval, integer=True, auto_ok=True, hint="0 = only on stop and at the end, or 'auto'")
        number("interrupt_every", interrupt_every, strict=True, none_ok=True, unit="seconds",
               hint="null = learned from the run directory's history")
        number("keep", keep, low=1, integer=True, hint="the newest committed checkpoints kept")
        number("write_threads", write_threads, low=1, integer=True)
        number("writeback_mib", writeback_mib, integer=True, hint="0 = flush only at the final fsync")
        for name, value in (("fsync", fsync), ("zip_crc32", zip_crc32), ("async_save", async_save),
                            ("verify", verify), ("keep_abandoned", keep_abandoned)):
            boolean(name, value)
        if not isinstance(resume, str) or not resume:
            raise ConfigError(f"resume={resume!r}; expected auto, never or a checkpoint directory")
        if dir is not None and (not isinstance(dir, str) or not dir):
            raise ConfigError(f"dir={dir!r}; expected a directory path, s3://bucket/prefix, or null "
                              "(<run dir>/checkpoints)")
        if local_dir is not None and (not isinstance(local_dir, str) or not local_dir or is_remote(local_dir)):
            raise ConfigError(f"local_dir={local_dir!r}; expected a local directory path or null "
                              "(<run dir>/checkpoints)")
        check_meta(meta)
        self.remote = Remote(dir) if is_remote(dir) else None
        if local_dir is not None and self.remote is None:
            raise ConfigError(f"local_dir={local_dir!r} is for a remote dir (s3://...); dir={dir!r} is local already")
        self.local_dir = local_dir
        self.uploader: Optional[Uploader] = None
        self.remote_owner_check: Any = None  # () -> None, raises if this run lost the remote prefix
        self.dir, self.interval, self.keep, self.resume = dir, interval, keep, resume
        self.interrupt_every = interrupt_every
        self.async_save, self.write_threads = async_save, write_threads
        self.fsync, self.writeback_mib, self.zip_crc32 = fsync, writeback_mib, zip_crc32
        self.verify, self.keep_abandoned = verify, keep_abandoned
        self.root: Optional[Path] = None
        self.rank = 0
        self.run_dir: Optional[str] = None  # recorded in every marker: which run wrote it
        self.branched_from: Optional[str] = None  # the resume=PATH this run's branch started at (kept in latest)
        self.meta: dict[str, Any] = dict(meta or {})  # stored in every commit marker (the recipe: its config)
        self.line: list = [[uuid.uuid4().hex[:12], None]]  # a fresh run's own lineage, until a resume says otherwise
        self.head: Optional[str] = None  # the head checkpoint (name under root, or an absolute path)
        self.last_committed_step: Optional[int] = None
        self.last_save_seconds: Optional[float] = None  # start to commit, of the latest save
        self.write_bytes_per_s: Optional[float] = None  # measured at setup (a PROBE_BYTES write)
        self.owner_check: Any = None  # () -> None, raises if the run no longer owns its directory
        self._inflight: Optional[tuple] = None  # step, partial, final, future, start time, writer
        self._staging: Any = None  # completes once the background copy of the state is taken
        self._stager: Any = None
        self._group: Any = None

    # -- setup -----------------------------------------------------------------------------

    def setup(self, run_dir: str, rank: int) -> "Checkpointer":
        """Bind to the run directory and prove it is writable, on every rank (so errors are symmetric)."""
        self.rank = rank
        self.run_dir = str(Path(run_dir).absolute())
        if self.remote is not None:
            self.root = Path(self.local_dir) if self.local_dir else Path(run_dir) / CHECKPOINTS
            if rank == 0:
                self.uploader = Uploader(self.remote, self.keep, lambda: self.remote_owner_check
                                         and self.remote_owner_check())
        else:
            self.root = Path(self.dir) if self.dir else Path(run_dir) / CHECKPOINTS
        probe = self.root / f".write-probe-rank{rank}-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"dir={str(self.root)!r} is not writable ({e.strerror}); "
                              "choose a writable directory with dir=PATH") from None
        try:
            self.write_bytes_per_s = _write_speed(probe, self.fsync)
        except OSError as e:  # little space left, a file size limit: a save may still fit; estimate without it
            log.debug("checkpoint: the write-speed probe failed (%s)", e)
        if self.async_save and is_distributed():
            # The background thread's collectives must not interleave with training's on one group.
            self._group = dist.new_group(backend="gloo")
        return self

    def due(self, step: int) -> bool:
        return self.interval != "auto" and self.interval > 0 and step % self.interval == 0  # auto: Run's schedule

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def _name(self, path: Path) -> str:
        """How `latest` and markers refer to a checkpoint: relative to root inside it, else absolute."""
        path = Path(path).absolute()
        try:
            return str(path.relative_to(self.root.absolute()))
        except ValueError:
            return str(path)

    def wait_upload(self, timeout: Optional[float] = None) -> bool:
        """Rank 0 with a remote dir: True once every committed checkpoint is uploaded (or failed:
        see `uploader.error`) within `timeout` seconds; True at once elsewhere."""
        return self.uploader.wait(timeout) if self.uploader is not None else True

    # -- after a successful load -----------------------------------------------------------

    def adopt(self, resume: Resume, step: int) -> None:
        """Collective, after the resume's load succeeded: the run's line and head become the resumed
        checkpoint's; a new branch moves what is not its ancestor out of the way (rank 0)."""
        self.line = [list(s) for s in resume.line]
        self.head = self._name(resume.path)
        if resume.branched:
            self.branched_from = str(resume.path.absolute())
        self.last_committed_step = step
        if self.rank == 0:
            if resume.branched:
                self._set_aside(resume.path)
            self._write_head(resume.path, step)
        barrier()

    def _set_aside(self, branch_point: Path) -> None:
        """Checkpoints under root that are not on the new line: to abandoned/ (or deleted if asked)."""
        moved = []
        place = self.root / ABANDONED / time.strftime("%Y%m%d-%H%M%S")
        _, off, unreadable = self._by_line(self.line)  # unfinished saves stay: a commit of that step replaces them
        for path in off + [p for p, _ in unreadable]:
            if path.resolve() == branch_point.resolve():
                continue
            if self.keep_abandoned:
                place.mkdir(parents=True, exist_ok=True)
                os.rename(path, place / path.name)
            else:
                shutil.rmtree(path, ignore_errors=True)
            moved.append(path.name)
        if moved:
            fsync_path(self.root, self.fsync)
            log.warning("checkpoint: resuming from %s starts a new branch; %s %s, not on it, %s", branch_point,
                        "checkpoint" if len(moved) == 1 else "checkpoints", ", ".join(moved),
                        f"moved to {place}" if self.keep_abandoned else "deleted (keep_abandoned=false)")

    def _write_head(self, path: Path, step: int) -> None:
        head = {"checkpoint": self._name(path), "step": step, "line": self.line}
        if self.branched_from is not None:
            head["branched_from"] = self.branched_from  # where resume=PATH started this branch
        write_atomic(self.root / LATEST, json.dumps(head) + "\n", self.fsync)

    # -- reading and writing ----------------------------------------------------------------

    marker = staticmethod(read_marker)

    def load(self, path: Path, state: dict[str, Any], checksums: bool = False) -> None:
        """DCP load of `path` into `state` (collective); `checksums`: every file's CRC-32C checked
        while it is read (with `verify`), CorruptCheckpointError on every rank if one does not match."""
        faults.inject("load")
        load_state(path, state, what=f"checkpoint {str(path)!r}", checksums=checksums and self.verify)

    def save(self, step: int, state: dict[str, Any], wait: bool = True) -> Path:
        """Collective: every rank calls it. With `wait` (a stop, the end) it returns once the
        checkpoint is committed; without, and with `async_save`, once the state is staged."""
        final = self.path_for(step)
        if self.last_committed_step == step or (self._inflight and self._inflight[0] == step):
            if wait:
                self.wait()
            if self.last_committed_step == step and self.head is not None:
                return self._resolve(self.head)  # (the head may lie outside root: a branch point elsewhere)
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
            self._inflight = (step, partial, final, response.upload_completion, started, writer)
            return final
        try:
            with _zip_crc32(self.zip_crc32), _quiet_single_process():  # nothing else is saving meanwhile
                dcp.save(state, storage_writer=writer)  # returns after .metadata is written by the coordinator
            faults.inject("save", step)
            if self.rank == 0:
                self._commit(partial, final, step, writer)
        except (Exception, CheckpointException) as e:
            raise self._failed(final, e) from None
        barrier()
        self._committed(final, step, started)
        return final

    def _committed(self, final: Path, step: int, started: float) -> None:
        self.head = self._name(final)
        self.last_committed_step = step
        self.last_save_seconds = time.time() - started

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
        """Finish and commit any save in flight; free the staging buffers; with a remote dir, wait
        for the uploads (CheckpointError if the newest one failed: it is committed locally only)."""
        try:
            self.wait()
        finally:
            if self._stager is not None:
                self._stager.close()
                self._stager = None
        if self.uploader is not None:
            self.uploader.wait()
            if self.uploader.error:
                raise CheckpointError(f"{self.uploader.error}; the checkpoint is committed in {self.root}, and "
                                      f"{self.remote.url}'s head stays {self.uploader.uploaded or 'what it was'}")

    def poll(self) -> None:
        """At a step boundary: commit an async save that has finished (never blocks)."""
        if self._inflight is not None and self._inflight[3].done():
            self.wait()

    def wait(self) -> None:
        """Block until the in-flight async save is written, then commit it (rank 0)."""
        if self._inflight is None:
            return
        step, partial, final, future, started, writer = self._inflight
        self._inflight = None
        self.wait_staged()
        try:
            future.result()  # re-raises a failed write
            faults.inject("save", step)
            # The coordinator's future completes only after every rank's files and .metadata exist.
            if self.rank == 0:
                self._commit(partial, final, step, writer)
        except (Exception, CheckpointException) as e:
            raise self._failed(final, e) from None
        self._committed(final, step, started)

    def _failed(self, final: Path, e: BaseException) -> CheckpointError:
        if isinstance(e, CheckpointError):
            return e
        kept = self.path_for(self.last_committed_step).name if self.last_committed_step is not None else "none"
        return CheckpointError(f"checkpoint {final.name} could not be written ({describe_failure(e)}); "
                               f"nothing was committed, the latest committed checkpoint ({kept}) is intact")

    def _commit(self, partial: Path, final: Path, step: int, writer: Any) -> None:
        if self.owner_check is not None:
            self.owner_check()  # another run took the directory over: commit nothing
        sums: dict[str, list] = {}
        for f in sorted(partial.glob(f"{SUMS_PREFIX}*.json")):
            sums.update(json.loads(f.read_text()))
        metadata = writer.fs.sums.get(".metadata")
        if metadata is not None:
            sums[".metadata"] = list(metadata)
        files = {}
        for p in partial.iterdir():
            if not p.is_file() or p.name.startswith(SUMS_PREFIX):
                continue
            size = p.stat().st_size
            recorded = sums.get(p.name)
            if recorded is None or recorded[0] != size:
                raise CheckpointError(f"checkpoint {final.name}: {p.name} is {size} bytes but was written as "
                                      f"{recorded[0] if recorded else 'nothing'}; nothing was committed")
            files[p.name] = [size, recorded[1]]
        world = dist.get_world_size() if is_distributed() else 1
        marker = {"format": FORMAT, "step": step, "world_size": world, "time": time.time(), "files": files,
                  "lineage": self.line[-1][0], "line": self.line, "parent": self.head, "run_dir": self.run_dir}
        marker = {**self.meta, **marker}  # the marker's own keys win
        marker["marker_crc32c"] = marker_checksum(marker)
        write_atomic(partial / COMMIT, json.dumps(marker), self.fsync)
        for f in partial.glob(f"{SUMS_PREFIX}*.json"):
            f.unlink()
        if final.exists():  # an unfinished or foreign directory of the same step: keep it apart, then drop it
            old = final.with_name(final.name + ".replaced")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(partial, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(partial, final)
        heartbeat.beat()
        # Committed from here on: what follows only records and tidies; a failure says so and keeps it.
        try:
            fsync_path(self.root, self.fsync)
            self._write_head(final, step)
        except OSError as e:
            log.warning("checkpoint: %s is committed, but %s could not be replaced (%s); a resume still finds "
                        "it (the newest commit of this run's line)", final.name, LATEST, e)
        self.head = self._name(final)
        try:
            self._prune(final)
        except OSError as e:
            log.warning("checkpoint: %s is committed; pruning older checkpoints failed (%s)", final.name, e)
        if self.uploader is not None:
            self.uploader.submit(final)

    def _prune(self, newest: Path) -> None:
        on, _, _ = self._by_line(self.line)
        mine = [path for path in on if why_invalid(path) is None]
        for path in mine[self.keep:]:
            if path != newest:
                shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob("step_*.partial"):
            if stale != newest.with_name(newest.name + ".partial"):
                shutil.rmtree(stale, ignore_errors=True)
        log.debug("checkpoint: committed %s", newest)
