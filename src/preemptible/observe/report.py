"""`Report`: what a run says while it trains, one part of `Run` (`Run(report=Report(...))`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Optional, Union

from preemptible.checks import number, one_of
from preemptible.errors import ConfigError
from preemptible.names import RUN_DIR_NAMES, is_run_dir_name


@dataclass(frozen=True)
class Report:
    """log_every:     losses are read from the device and printed every N steps (metrics.jsonl gets
                       every step either way; reading less often avoids a host-device sync per step).
    log_file:          a file name in the run directory that gets this process's log records while the
                       run owns it (None: none); not a name the run directory uses itself (OWNER,
                       metrics.jsonl, ...). A write that fails (a full disk) is one line, never the run's end.
    param_digests:     'done' (the done event carries the parameters' SHA-256), True (the preempted
                       and resumed events too: a pass over the parameters at each), False (none).
    """

    log_every: int = 10
    log_file: Optional[str] = None
    param_digests: Union[bool, Literal["done"]] = "done"

    def __post_init__(self) -> None:
        number("log_every", self.log_every, low=1, integer=True)
        one_of("param_digests", self.param_digests, ("done", True, False))
        name = self.log_file
        if name is not None and (not isinstance(name, str) or not name or os.sep in name or name in (".", "..")):
            raise ConfigError(f"log_file={name!r}; expected a file name (it is written inside the run directory)")
        if name is not None and is_run_dir_name(name):
            raise ConfigError(f"log_file={name!r} is a name the run directory uses itself ({', '.join(RUN_DIR_NAMES)}); "
                              "choose another, such as train.log")
