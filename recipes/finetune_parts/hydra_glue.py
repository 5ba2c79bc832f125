"""Hydra chooses and wires; these helpers turn its failures into one line a user can act on, naming
the configuration node (`checkpoint.interval=-1; ...`)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from preemptible.errors import ConfigError, first_line, in_part


def build(cfg: DictConfig, key: str, **runtime: Any) -> Any:
    """Instantiate `cfg[key]` (None if the group is unset, null, or an empty option such as
    `none.yaml`) with runtime objects passed in."""
    node = cfg.get(key)
    if node is None or (isinstance(node, DictConfig) and len(node) == 0):
        return None
    with node_errors(key):
        try:
            if not runtime:
                return instantiate(node)
            # runtime objects are passed as they are (Hydra would read a dict in them as config)
            return instantiate(node, _partial_=True)(**runtime)
        except InstantiationException as e:
            cause = e.__cause__ or e
            raise (cause if isinstance(cause, ConfigError) else ConfigError(first_line(cause))) from None


def call(cfg: DictConfig, key: str, *args: Any, **kwargs: Any) -> Any:
    """Build `cfg[key]` (a `_partial_` node) and call it with runtime objects; errors name the node."""
    factory = build(cfg, key)
    with node_errors(key):
        return factory(*args, **kwargs)


@contextmanager
def node_errors(key: str) -> Iterator[None]:
    """A ValueError/TypeError raised inside names the node it came from (`key.argument=...`)."""
    try:
        yield
    except ConfigError as e:
        raise in_part(key, e)
    except (ValueError, TypeError) as e:
        raise in_part(key, ConfigError(first_line(e))) from None
