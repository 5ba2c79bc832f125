"""Which checkpoint a run resumes from: the head (`latest`), the run's line of ancestry, and
`resume=` (auto, never, or a path to go back to). Decided by rank 0, the same on every rank.
Reads only (except fetching a remote checkpoint into the local tier). A part of `Checkpointer`
(a mixin), kept apart from how checkpoints are written."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from preemptible.checkpoint.layout import COMMIT, LATEST, in_line, read_marker, step_of, why_invalid
from preemptible.distributed.env import broadcast_object
from preemptible.errors import ConfigError
from preemptible.checkpoint.storage import fsync_path

log = logging.getLogger("preemptible.checkpoint")


@dataclass
class Resume:
    """What `Checkpointer.resume_path` decided: where to load from, and the line the run continues."""
    path: Optional[Path]
    line: list = field(default_factory=list)
    branched: bool = False          # a new lineage starts at `path` (resume=PATH of an older checkpoint)
    skipped: list = field(default_factory=list)  # (path, why) of checkpoints passed over
    verify_seconds: float = 0.0


class Finding:
    """Finding the checkpoint to resume from (see the module docstring); mixed into `Checkpointer`."""

    _sums_while_loading = False  # set by resume_path(sums_while_loading=True) while rank 0 decides

    # -- finding ---------------------------------------------------------------------------

    def _top_level(self) -> list[Path]:
        """Checkpoint directories directly under root, newest step first."""
        dirs = [p for p in self.root.iterdir() if step_of(p) is not None and p.is_dir()] if self.root.is_dir() else []
        return sorted(dirs, key=step_of, reverse=True)

    def _by_line(self, line: list) -> tuple[list[Path], list[Path], list[tuple[Path, str]]]:
        """Top-level checkpoints, newest first, split by `line`: on it, off it, and those with a
        COMMITTED marker that cannot be read (with why). Unfinished saves (no marker) are in none."""
        on, off, unreadable = [], [], []
        for path in self._top_level():
            try:
                (on if in_line(read_marker(path), line) else off).append(path)
            except ValueError as e:
                if (path / COMMIT).exists():
                    unreadable.append((path, str(e)))
        return on, off, unreadable

    def _resolve(self, name: str) -> Path:
        return Path(name) if os.path.isabs(name) else self.root / name

    def committed(self) -> list[Path]:
        """Structurally valid checkpoints directly under root (sizes checked, not checksums), newest first."""
        return [p for p in self._top_level() if why_invalid(p) is None]

    def read_head(self) -> Optional[dict[str, Any]]:
        """`latest` as {"checkpoint", "step", "line"}; None if absent; ValueError if unusable."""
        latest = self.root / LATEST
        if not latest.exists():
            return None
        text = latest.read_text(errors="replace").strip()
        try:
            head = json.loads(text)
            if not (isinstance(head, dict) and isinstance(head.get("checkpoint"), str) and isinstance(head.get("line"), list)
                    and head["line"] and all(isinstance(s, list) and len(s) == 2 for s in head["line"])):
                raise ValueError
        except ValueError:
            raise ValueError(f"it is not a head record ({text[:80]!r})") from None
        return head

    @staticmethod
    def _foreign_head(path: Path, line: list) -> Optional[str]:
        """None if a head outside root is where this run's line branched (resume=PATH elsewhere);
        otherwise why it is not followed (a copied or tampered `latest`)."""
        try:
            marker = read_marker(path)
        except ValueError as e:
            return str(e)
        if len(line) >= 2 and line[-2] == [marker["lineage"], marker["step"]]:
            return None
        return (f"it names {path}, outside this run's checkpoint directory and not where this run's line "
                "branched (a head copied from another run, or changed by hand)")

    def _pick(self, candidates: list[Path], skipped: list) -> Optional[Path]:
        """The first candidate that is valid (verified if `verify`); the others are logged and listed."""
        for path in candidates:
            why = why_invalid(path, verify=self._sums_first)
            if why is None:
                return path
            log.warning("checkpoint: skipping %s: %s", path, why)
            skipped.append((str(path), why))
        return None

    @property
    def _sums_first(self) -> bool:
        """Whether choosing a checkpoint reads every file's CRC-32C (else the load checks them)."""
        return self.verify and not self._sums_while_loading

    def resume_path(self, sums_while_loading: bool = False) -> Resume:
        """Where to resume from, decided by rank 0 and the same on every rank; ConfigError if invalid.
        `sums_while_loading`: choose by sizes only; the load then checks the checksums (`load(...,
        checksums=True)`), and a mismatch there means choosing again without it."""
        decision: Any = None
        if self.rank == 0:
            started = time.perf_counter()
            self._sums_while_loading = sums_while_loading
            try:
                fetched = self._fetch_remote() if self.remote is not None and self.resume == "auto" else []
                decision = self._decide()
                decision.skipped = fetched + decision.skipped
                decision.verify_seconds = time.perf_counter() - started
            except ConfigError as e:
                decision = e
            finally:
                self._sums_while_loading = False
        decision = broadcast_object(decision)
        if isinstance(decision, ConfigError):
            raise decision
        return decision

    def _fetch_remote(self) -> list:
        """Rank 0: remote checkpoints newer than the newest valid local one are downloaded into the
        local tier (newest first, until one is valid); returns [(where, why)] for those skipped."""
        skipped: list = []
        local = [p for p in self._top_level() if why_invalid(p) is None]
        newest_local = step_of(local[0]) if local else -1
        try:
            committed, unfinished = self.remote.listing()
        except Exception as e:  # noqa: BLE001 -- the store cannot be read: resume from what is here
            log.warning("checkpoint: %s cannot be listed (%s); resuming from the local tier only", self.remote.url, e)
            return skipped
        for step, name in unfinished:
            if step > newest_local:
                why = f"no {COMMIT} object (an upload that did not finish)"
                log.warning("checkpoint: skipping %s: %s", self.remote.where(name), why)
                skipped.append((self.remote.where(name), why))
        for step, name in committed:
            if step <= newest_local:
                break
            started = time.perf_counter()
            into = self.root / f"{name}.download"
            why = self.remote.download(name, into)
            if why is None:
                final = self.root / name
                if final.exists():  # an unfinished local save of the same step
                    shutil.rmtree(final)
                os.rename(into, final)
                fsync_path(self.root, self.fsync)
                log.info("checkpoint: downloaded %s from %s in %.2fs (sizes and CRC-32C checked)", name,
                         self.remote.url, time.perf_counter() - started)
                break
            log.warning("checkpoint: skipping %s: %s", self.remote.where(name), why)
            skipped.append((self.remote.where(name), why))
        return skipped

    def _decide(self) -> Resume:
        head = None
        try:
            head = self.read_head()
        except ValueError as e:
            log.warning("checkpoint: ignoring %s: %s; the checkpoint directories are scanned instead",
                        self.root / LATEST, e)
        if self.resume == "never":
            existing = self.committed()
            if existing or head is not None:
                newest = existing[0].name if existing else head["checkpoint"]
                raise ConfigError(f"resume=never, but {self.root} already holds this run's checkpoints "
                                  f"(newest: {newest}); use resume=auto to continue them, or a new "
                                  "run directory (or checkpoint dir) to start fresh beside them")
            return Resume(None, self.line)
        if self.resume == "auto":
            return self._follow_head(head)
        return self._from_path(Path(self.resume), head)

    def _follow_head(self, head: Optional[dict[str, Any]]) -> Resume:
        skipped: list = []
        if head is not None and isinstance(head.get("branched_from"), str):
            self.branched_from = head["branched_from"]
        if head is None:  # no head record (first run, or it was lost): the newest valid checkpoint here
            found = self._pick(self._top_level(), skipped)
            if found is None:
                return Resume(None, self.line, skipped=skipped)
            return Resume(found, read_marker(found)["line"], skipped=skipped)
        candidates, _, unreadable = self._by_line(head["line"])
        for path, why in unreadable:
            log.warning("checkpoint: skipping %s: %s", path, why)
            skipped.append((str(path), why))
        head_path = self._resolve(head["checkpoint"])
        if head_path not in candidates and head_path.exists():  # the head is outside root: a branch point elsewhere?
            inside = head_path.absolute().parent == self.root.absolute()
            why = None if inside else self._foreign_head(head_path, head["line"])
            if why is None:
                candidates.append(head_path)
            else:
                log.warning("checkpoint: not following %s: %s", self.root / LATEST, why)
                skipped.append((str(head_path), why))
        candidates.sort(key=lambda p: step_of(p) or 0, reverse=True)
        found = self._pick(candidates, skipped)
        if found is None:
            reasons = "; ".join(f"{Path(p).name}: {why}" for p, why in skipped) or "none is left"
            raise ConfigError(f"no valid checkpoint is left on this run's line (head {head['checkpoint']}: {reasons}); "
                              f"nothing was loaded or deleted. Resume from an older one with resume=PATH, "
                              f"start over in a new run directory, or remove {self.root / LATEST} to take the newest "
                              "valid checkpoint here")
        return Resume(found, head["line"] if found == head_path else read_marker(found)["line"], skipped=skipped)

    def _from_path(self, path: Path, head: Optional[dict[str, Any]]) -> Resume:
        if head is not None and head.get("branched_from") == str(path.absolute()):
            # The same command again (a requeue after going back): continue the branch this run
            # started at PATH, whether or not PATH itself is still there (pruning may have taken it).
            resume = self._follow_head(head)
            if resume.path is not None and resume.path.absolute() != path.absolute():
                log.info("resume=%s: this run already branched from it; resuming the branch's newest commit %s",
                         self.resume, resume.path)
            return resume
        why = why_invalid(path, verify=self._sums_first)
        if why:
            raise ConfigError(f"resume={self.resume!r} is not a valid checkpoint: {why}; "
                              "use resume=auto to take the newest valid one")
        marker = read_marker(path)
        segment = [marker["lineage"], marker["step"]]
        if head is not None:
            head_line = head["line"]
            branched_here = len(head_line) >= 2 and head_line[-2] == segment
            is_head = head_line[-1][0] == marker["lineage"] and self._resolve(head["checkpoint"]).resolve() == path.resolve()
            if branched_here or is_head:
                # The same command again (a requeue): continue the branch this run started at PATH.
                resume = self._follow_head(head)
                if resume.path is not None and resume.path.resolve() != path.resolve():
                    log.info("resume=%s: this run already continued from it; resuming its newest "
                             "commit %s", self.resume, resume.path)
                return resume
        line = [s for s in marker["line"][:-1]] + [segment, [uuid.uuid4().hex[:12], None]]
        return Resume(path, line, branched=True)


class Lineage(Finding):
    """The same decision, read-only and without a writer: what a resume of `root` would take
    (`python -m preemptible status|export` use it)."""

    def __init__(self, root: Path, resume: str = "auto", verify: bool = True):
        self.root, self.resume, self.verify = Path(root), resume, verify
        self.line: list = [[uuid.uuid4().hex[:12], None]]
        self.branched_from: Optional[str] = None

    def decide(self) -> Resume:
        return self._decide()
