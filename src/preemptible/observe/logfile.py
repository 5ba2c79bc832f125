"""The run's log file (`Report(log_file=)`): this process's log records while the run owns the
directory. A write that fails (a full disk, a read-only remount) never stops training and is said
once on stderr, not once per record; the records go on to the other handlers as before."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable, Optional


class RunLogFile(logging.FileHandler):
    """A FileHandler that says one line when its file stops taking records, and one when it takes
    them again."""

    def __init__(self, path: Path, owns: Callable[[], bool] = lambda: True):
        super().__init__(path)
        self.failing = False
        self._failed_now = False
        self._owns = owns

    def emit(self, record: logging.LogRecord) -> None:
        if not self._owns():
            return  # the run directory is another run's now: nothing more is written there
        self._failed_now = False
        super().emit(record)  # calls handleError on a failed write
        if self.failing and not self._failed_now:
            self.failing = False
            _say(f"preemptible: the log file {self.baseFilename} takes records again")

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as e:
            self._failed(e)

    def close(self) -> None:
        try:
            super().close()
        except OSError as e:  # what was buffered cannot be written: said once, never the run's error
            self._failed(e)
            self.stream = None

    def _failed(self, error: BaseException) -> None:
        self._failed_now = True
        if not self.failing:
            self.failing = True
            _say(f"preemptible: the log file {self.baseFilename} cannot be written ({error}); training goes on, "
                 "its records go to the other log handlers only until it can")

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed(sys.exc_info()[1])


def open_log(path: Path, formatter: Optional[logging.Formatter],
             owns: Callable[[], bool] = lambda: True) -> Optional[RunLogFile]:
    """The handler, or None with one line on stderr if the file cannot be opened. `owns`: whether
    the run still owns its directory (records are written only while it does)."""
    try:
        handler = RunLogFile(path, owns)
    except OSError as e:
        _say(f"preemptible: the log file {path} cannot be opened ({e.strerror or e}); training goes on without it")
        return None
    handler.setFormatter(formatter)
    return handler


def _say(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
