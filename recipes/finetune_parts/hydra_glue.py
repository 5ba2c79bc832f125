"""Hydra chooses and wires; these helpers turn its failures into one line a user can act on."""

from __future__ import annotations

import re
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from preemptible.errors import ConfigError


def build(cfg: DictConfig, key: str, **runtime: Any) -> Any:
    """Instantiate `cfg[key]` (None if the group is unset, null, or an empty option such as
    `none.yaml`) with runtime objects passed in."""
    node = cfg.get(key)
    if node is None or (isinstance(node, DictConfig) and len(node) == 0):
        return None
    try:
        return instantiate(node, **runtime)
    except InstantiationException as e:
        cause = e.__cause__ or e
        message = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise _in_group(key, message) from None
    except (ValueError, TypeError) as e:
        raise _in_group(key, str(e)) from None


def _in_group(key: str, message: str) -> ConfigError:
    """`interval=-1; ...` from the checkpoint group reads `checkpoint.interval=-1; ...`."""
    if re.match(r"^[a-z_]+=", message):
        return ConfigError(f"{key}.{message}")
    return ConfigError(f"{key}: {message}")


def call(cfg: DictConfig, key: str, *args: Any, **kwargs: Any) -> Any:
    """Build `cfg[key]` (a `_partial_` node) and call it with runtime objects; errors name the group."""
    factory = build(cfg, key)
    try:
        return factory(*args, **kwargs)
    except (ValueError, TypeError) as e:
        raise _in_group(key, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
