"""What rank 0 leaves for users and tests: metrics.jsonl, a progress bar or plain log lines."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

log = logging.getLogger("preemptible.train")

from preemptible.names import METRICS, PROGRESS  # noqa: F401  (PROGRESS: rewritten every step, no fsync: a kill keeps it)
PROGRESS_WIDTH = 127  # PROGRESS is rewritten in place: every record padded to one width
ENDS = ("done", "preempted", "failed", "killed", "hung")  # events that close a run's segment of metrics.jsonl
ROW_KEYS = ("step", "time", "event")  # what a row of metrics.jsonl says itself: no metric may take these names
BACKLOG = 10_000  # rows kept while metrics.jsonl cannot be written (a full disk), written once it can


class Metrics:
    """Appends one JSON object per step and per event to `<run dir>/metrics.jsonl` (rank 0 only).

    Step losses stay on the device until a flush (every `log_every` steps, and before every
    event), so logging never adds a per-step host-device sync.
    """

    def __init__(self, run_dir: str, enabled: bool, max_steps: Optional[int], log_every: int = 10):
        self.enabled, self.log_every, self.max_steps = enabled, log_every, max_steps
        self.path = os.path.join(run_dir, METRICS)
        self.progress_path = os.path.join(run_dir, PROGRESS)
        self._progress_fd: Optional[int] = None
        self._pending: list[tuple[int, Any, Optional[float], float, dict]] = []
        self._checked_tail = False
        self._backlog: list[dict] = []  # rows not yet written: the last write failed (a full disk)
        self._dropped = 0  # rows dropped from a full backlog
        self.sinks: list[Any] = []  # callables given every appended row (steps and events), in order
        self._bar = None
        self.failing = False  # the last write of metrics.jsonl failed
        self.owns: Any = lambda: True  # whether the run still owns its directory (else nothing is written)
        self._disowned = False
        self.since: Optional[float] = None  # this process's start, in PROGRESS (the time a killed run was alive)
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps or None, dynamic_ncols=True, desc="train")

    def start(self, step: int) -> None:
        if self._bar is not None:
            if step:
                self._bar.set_description(f"train (resumed at step {step})")
            self._bar.update(step - self._bar.n)

    def step(self, step: int, loss: Any = None, lr: Optional[float] = None, **extra: Any) -> None:
        """One row: loss and any other metric may be tensors (read at the flush, not now)."""
        if not self.enabled:
            return
        detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
        now = time.time()
        self._pending.append((step, detach(loss), lr, now, {k: detach(v) for k, v in extra.items()}))
        self._reached(step, now)
        if len(self._pending) >= self.log_every:
            self.flush()

    def flush(self) -> None:
        if not self.enabled or not self._pending:
            return
        rows = []
        for s, loss, lr, t, extra in self._pending:
            row: dict[str, Any] = {"step": s}
            if loss is not None:
                row["loss"] = _plain(loss)
            if lr is not None:
                row["lr"] = lr
            row.update({k: _plain(v) for k, v in extra.items()})
            row["time"] = t
            rows.append(row)
        self._pending.clear()
        self._append(rows)
        last = rows[-1]
        shown = {k: v for k, v in last.items() if k not in ("step", "time") and isinstance(v, (int, float))}
        if self._bar is not None:
            self._bar.update(last["step"] - self._bar.n)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
        else:
            total = f"/{self.max_steps}" if self.max_steps else ""
            log.info("step %d%s %s", last["step"], total, " ".join(f"{k} {v:.4g}" for k, v in shown.items()))

    def event(self, name: str, **fields: Any) -> None:
        self.flush()
        if self.enabled:
            self._append([stamped({"event": name, **fields})])

    def _append(self, rows: list[dict]) -> None:
        """Write `rows` (after any that could not be written before) and feed the sinks. A write
        that fails (a full disk, a read-only remount) never stops training: one warning, the rows
        kept (up to BACKLOG) and written with the next rows once the file can be written again."""
        self._backlog += rows
        if len(self._backlog) > BACKLOG:
            self._dropped += len(self._backlog) - BACKLOG
            del self._backlog[:-BACKLOG]
        if self._disowned or not self.owns():
            if not self._disowned:
                log.warning("%s: the run directory is no longer this run's; nothing more is written there", self.path)
            self._disowned = True
            self._backlog.clear()
            return
        check, self._checked_tail = not self._checked_tail, True
        try:
            append_rows(self.path, self._backlog, check_tail=check)
        except OSError as e:
            if not self.failing:
                log.warning("%s cannot be written (%s); training goes on, and its rows are kept in memory and written "
                            "once it can be", self.path, e.strerror or e)
            self.failing, self._checked_tail = True, False  # a torn last line is ended at the next write
        else:
            if self.failing:
                log.warning("%s written again (%d rows late%s)", self.path, len(self._backlog),
                            f", {self._dropped} older ones dropped" if self._dropped else "")
            self._backlog.clear()
            self.failing, self._dropped = False, 0
        for sink in self.sinks:
            sink(rows)

    def _reached(self, step: int, now: float) -> None:
        """The step reached, in PROGRESS: one pwrite in place, so a kill between flushes still
        leaves the step it happened at (the page cache survives the process)."""
        if self._disowned:
            return
        try:
            if self._progress_fd is None:
                self._progress_fd = os.open(self.progress_path, os.O_WRONLY | os.O_CREAT, 0o644)
            record = {"step": step, "time": round(now, 3), "since": self.since, "up": uptime()}
            os.pwrite(self._progress_fd, (json.dumps(record).ljust(PROGRESS_WIDTH) + "\n").encode(), 0)
        except OSError:
            pass  # a progress record is a convenience for status and plot; never a reason to stop training

    def close(self, outcome: Optional[str] = None) -> None:
        """Flush; on a terminal the bar ends with `outcome` ("done", "stopped: SIGTERM at step 12")."""
        self.flush()
        if self._backlog and self.enabled:
            self._append([])  # one more try; what still cannot be written: its events, on stderr
            events = [r for r in self._backlog if "event" in r]
            if events:
                log.warning("%s could not be written: its last events were %s", self.path,
                            " ".join(json.dumps(r) for r in events[-3:]))
        if self._progress_fd is not None:
            os.close(self._progress_fd)
            self._progress_fd = None
        if self._bar is not None:
            if outcome:
                self._bar.set_description(f"train: {outcome}")
            self._bar.close()


def check_metric_names(metrics: dict) -> None:
    """ConfigError for a metric named as a row's own field (step, time, event)."""
    taken = [k for k in metrics if k in ROW_KEYS]
    if taken:
        from preemptible.errors import ConfigError

        raise ConfigError(f"step_done({taken[0]}=...): {', '.join(ROW_KEYS)} are names every metrics row uses "
                          "itself; pass the metric under another name")


def append_rows(path: str, rows: list[dict], check_tail: bool = True) -> None:
    """Append rows to a metrics.jsonl: one write() (a reader never sees half of them; it may see
    the tail of a write in progress, a line without its newline yet, which read_metrics skips)."""
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # A process killed mid-write can leave a torn last line: end it, so the first row starts a
        # line of its own instead of gluing onto the torn one.
        if check_tail and _ends_torn(path):
            data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def append_event(run_dir: Union[str, "os.PathLike[str]"], row: dict) -> None:
    """One event from any rank, outside a Metrics (the watchdog's record of a hang): best effort."""
    try:
        append_rows(os.path.join(os.fspath(run_dir), METRICS), [stamped(row)])
    except OSError:
        pass


def stamped(row: dict) -> dict:
    """An event row with its time; an end of this process's run (not `killed`, which the next run
    writes) also with `alive_seconds`, how long this process has lived on a clock that no wall-clock
    change moves (what `interval='auto'` reads)."""
    if row.get("event") in ENDS and row["event"] != "killed" and "alive_seconds" not in row:
        row = {**row, "alive_seconds": uptime()}
    return {**row, "time": time.time()}


_started: tuple[int, Optional[float]] = (-1, None)  # (pid, its start on the boot clock): read once per process


def _start_seconds() -> Optional[float]:
    """This process's start, in seconds on the boot clock (/proc/self/stat's field 22), read once
    per process (a forked child reads its own): uptime() is asked at every step's progress record."""
    global _started
    if _started[0] != os.getpid():
        try:
            with open("/proc/self/stat") as f:
                ticks = int(f.read().rsplit(")", 1)[1].split()[19])
            _started = (os.getpid(), ticks / os.sysconf("SC_CLK_TCK"))
        except (OSError, ValueError, IndexError):
            _started = (os.getpid(), None)
    return _started[1]


def uptime() -> Optional[float]:
    """Seconds this process has lived, on the boot clock (monotonic: a wall-clock jump does not
    move it); None where /proc cannot tell."""
    start = _start_seconds()
    try:
        return None if start is None else round(time.clock_gettime(time.CLOCK_BOOTTIME) - start, 3)
    except (OSError, AttributeError):
        return None


def process_start_time() -> Optional[float]:
    """When this process started (wall clock; Linux /proc), for the resumed event's startup timings."""
    up = uptime()
    return None if up is None else round(time.time() - up, 3)


def unclean_end(run_dir: Union[str, "os.PathLike[str]"]) -> Optional[int]:
    """The step the last run reached if it ended without a record of its end (killed: SIGKILL, the
    node lost), from durable facts: the last metrics row and the PROGRESS record. None if it ended
    cleanly (done, stopped, failed) or there was no run."""
    rows = _tail_rows(os.path.join(os.fspath(run_dir), METRICS))  # the end of the file is all it needs
    open_ = False
    last_step = None
    for row in rows:
        if row.get("event") in ENDS:
            open_ = False
        elif row.get("event") == "resumed" or "event" not in row:
            open_ = True
            if "event" not in row:
                last_step = row["step"]
    record = read_progress(run_dir)
    progress = record["step"] if record else None
    if not open_ and not (progress is not None and not rows):
        return None
    reached = [s for s in (last_step, progress) if s is not None]
    return max(reached) if reached else None


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (JSON's true is not a time)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_progress(run_dir: Union[str, "os.PathLike[str]"]) -> Optional[dict]:
    """The PROGRESS record ({"step", "time", "since": the writing process's start}), or None."""
    try:
        with open(os.path.join(os.fspath(run_dir), PROGRESS)) as f:
            record = json.loads(f.read().strip() or "null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def _ends_torn(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def _well_formed(row: Any) -> bool:
    """A row as this module writes it: an int step, a numeric time if any, a str event if any."""
    return (isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool)
            and ("time" not in row or is_number(row["time"])) and ("event" not in row or isinstance(row["event"], str)))


def read_metrics(path: Union[str, "os.PathLike[str]"], strict: bool = False) -> list[dict]:
    """The rows of a metrics.jsonl (or of `<path>/metrics.jsonl` when `path` is a run directory).

    Safe while the run is writing: a last line without its newline is a write in progress and is
    left out. A complete line that is not a metrics row (a torn write from a killed process, or a
    line written by hand: not a JSON object, no int `step`, a non-numeric `time`) is skipped, or with `strict=True` raises ValueError naming the file and line. A missing file
    gives []. After a crash a step can appear twice: the later row is the one that counts.
    """
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.basename(path) != METRICS:
        path = os.path.join(path, METRICS)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return _parse(data, path, strict)


def _tail_rows(path: str, nbytes: int = 1 << 16) -> list[dict]:
    """The well-formed rows in the last `nbytes` of a metrics file (the first, partial line dropped)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            start = max(0, f.tell() - nbytes)
            f.seek(start)
            data = f.read()
    except OSError:  # none yet, or not a file (a directory of that name): nothing to read; writes say so
        return []
    if start:
        data = data.split(b"\n", 1)[1] if b"\n" in data else b""
    return _parse(data, path, strict=False)


def _parse(data: bytes, path: str, strict: bool) -> list[dict]:
    lines = data.split(b"\n")
    lines.pop()  # after the last newline: "" or a line still being written
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not _well_formed(row):
            if strict:
                raise ValueError(f"{path}: line {number} is not a metrics row (a JSON object with an int step): "
                                 f"{line[:80]!r}")
            continue
        out.append(row)
    return out


@dataclass
class History:
    """A run's metrics as they stand: `rows`, one per step in step order (after a crash the later
    line of a repeated step wins, as the resumed run recomputed it), and `events` in file order."""
    rows: list[dict]
    events: list[dict]

    def series(self, key: str) -> tuple[list[int], list[Any]]:
        """(steps, values) of one metric over the steps that have it."""
        pairs = [(r["step"], r[key]) for r in self.rows if key in r]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def read_history(run_dir: Union[str, "os.PathLike[str]"]) -> History:
    """The run's history from metrics.jsonl (the source of truth): see `History`."""
    by_step: dict[int, dict] = {}
    events = []
    for row in read_metrics(run_dir):
        if "event" in row:
            events.append(row)
        elif isinstance(row.get("step"), int):
            by_step[row["step"]] = row
    return History([by_step[s] for s in sorted(by_step)], events)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value
