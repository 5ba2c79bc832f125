"""The validation rules every argument goes through, written once: each raises a one-line
`ConfigError` naming the argument, the value, and what fits.

Numbers must be finite (a `nan` compares false with everything: a limit of `nan` seconds would
never fire), booleans must be real booleans (`'no'` and `2` are not taken as true), and paths
must be strings or path objects (`123` is not a directory name).
"""

from __future__ import annotations

import math
import os
from typing import Any

from preemptible.errors import ConfigError


def number(name: str, value: Any, *, low: float = 0.0, strict: bool = False, none_ok: bool = False,
           integer: bool = False, unit: str = "", hint: str = "", auto_ok: bool = False,
           high: float = math.inf) -> None:
    """`value` is a finite int (or float unless `integer`) >= `low` (> `low` if `strict`) and <= `high`,
    or None if `none_ok`, or the string 'auto' if `auto_ok`."""
    if (value is None and none_ok) or (auto_ok and isinstance(value, str) and value == "auto"):
        return
    kinds = (int,) if integer else (int, float)
    ok = (not isinstance(value, bool) and isinstance(value, kinds) and math.isfinite(value)
          and (value > low if strict else value >= low) and value <= high)
    if not ok:
        what = "an int" if integer else (unit or "a number")
        bound = (f"> {low:g}" if strict else f">= {low:g}") + (f" and <= {high:g}" if high < math.inf else "")
        odd = isinstance(value, float) and not math.isfinite(value)
        raise ConfigError(f"{name}={value!r}; expected {what} {bound}{' or null' if none_ok else ''}"
                          f"{' (a finite value)' if odd else ''}{f' ({hint})' if hint else ''}")


def seconds(name: str, value: Any, *, strict: bool = False, none_ok: bool = False) -> None:
    number(name, value, low=0, strict=strict, none_ok=none_ok, unit="seconds")


def boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}; expected true or false")


def path(name: str, value: Any, *, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name}={value!r}; expected a directory path{' or null' if none_ok else ''}")


def one_of(name: str, value: Any, choices: tuple) -> None:
    """`value` is one of `choices` (compared by type too: `True` is not `1`)."""
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        names = ", ".join("null" if c is None else str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
        raise ConfigError(f"{name}={value!r}; expected one of {names}")


def exit_status(name: str, value: Any, *, none_means: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255):
        raise ConfigError(f"{name}={value!r}; expected an exit status from 0 to 255, or null ({none_means})")
