"""The pieces `Run` is assembled from that need no Run method: what a checkpoint stores for the
run (`Progress`, the same on every rank; `RankState`, per rank), and the checks of its arguments."""

from __future__ import annotations

import logging
from typing import Any

from preemptible.checks import number
from preemptible.errors import ConfigError
from preemptible.run.feed import stateful
from preemptible.run.state import check_plain, from_blob, set_rng_state, to_blob, unwrap

log = logging.getLogger("preemptible.run")

RESERVED = ("model_optim", "model", "lr_schedule", "progress")  # state= names a checkpoint uses itself


# Run's arguments that became parts: where each one lives now.
MOVED = {**{k: f"checkpoint=Checkpointer({k}=...)" for k in ("interval", "keep", "resume", "async_save", "verify",
                                                            "keep_abandoned", "meta")},
         "checkpoint_dir": "checkpoint=Checkpointer(dir=...)", "checkpointer": "checkpoint=",
         **{k: f"stopping=Stopping({k}=...)" for k in ("signals", "notices", "check_every", "max_latency", "stop_check",
                                                       "max_time", "slurm_time_limit", "grace_period", "save_guess",
                                                       "margin", "requeue", "exit_code_on_stop")},
         "handler": "stopping=Stopping(signals=<the handler>)",
         "lease_wait": "ownership=Ownership(wait=...)", "stale_after": "ownership=Ownership(stale_after=...)",
         **{k: f"report=Report({k}=...)" for k in ("log_every", "log_file", "param_digests")}}


# Run's arguments that are no longer needed: why.
GONE = {"seed": "after a resume on another world size the RNG streams are reseeded from the checkpoint's "
                "lineage, step and rank (the same checkpoint gives the same streams, another run other ones); "
                "drop seed="}


def refuse_moved(moved: dict[str, Any]) -> None:
    for name in moved:
        if name in GONE:
            raise ConfigError(f"Run({name}=...) is no longer an argument: {GONE[name]}")
        if name in MOVED:
            raise ConfigError(f"Run({name}=...) moved to a part of Run: pass {MOVED[name]} "
                              "(from preemptible import Checkpointer, Stopping, Ownership, Report)")
        raise ConfigError(f"Run() got an unknown argument {name}=; see help(preemptible.Run)")


def part(name: str, value: Any, kind: type) -> Any:
    """A part of Run as given (checked when it was made), or one with its defaults."""
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise ConfigError(f"{name}={type(value).__name__}; expected a preemptible.{kind.__name__} (or None: "
                          "its defaults)")
    return value


def check_training_objects(model: Any, optimizer: Any, scheduler: Any, state: Any, values: Any,
                           max_steps: Any) -> None:
    import torch

    if optimizer is not None and model is None:
        raise ConfigError("optimizer= needs model= too (the optimizer's state is keyed by the model's parameters)")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model={type(model).__name__}; expected a torch.nn.Module")
    if scheduler is not None and not stateful(scheduler):
        raise ConfigError(f"scheduler={type(scheduler).__name__} has no state_dict()/load_state_dict(); pass a "
                          "torch.optim.lr_scheduler object")
    check_state(dict(state or {}))
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"values={values!r}; expected a dict of plain values")
    check_optimizer(optimizer, model)
    number("max_steps", max_steps, integer=True, none_ok=True)


class Progress:
    """DCP Stateful, the same on every rank: step, world size, the user's plain values, and the
    data's global position (for a resume on another number of ranks)."""

    def __init__(self, run: Any):
        self.run = run
        self.loaded: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        run, boundary = self.run, self.run.feed.boundary
        return {"step": run.step, "world_size": run.world_size, "epoch": boundary["epoch"],
                "position": boundary.get("position"), "values": to_blob(self.savable_values())}

    def savable_values(self) -> dict[str, Any]:
        """What a save writes of `run.values`: every value a resume can load. `run.values` refuses
        anything else where it is changed; a value that got past that anyway (changed through
        `dict.__setitem__`, say) is left out of this checkpoint with one warning naming it, so a
        stop's save never fails on a value."""
        out = {}
        for key, value in self.run.values.items():
            value = unwrap(value)
            try:
                check_plain(value, f"run.values[{key!r}]")
            except ConfigError as e:
                log.warning("%s; this checkpoint is saved without run.values[%r] (a resume will not have it)", e, key)
                continue
            out[key] = value
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = dict(state)
        self.run.step = int(state["step"])
        if state.get("values") is not None:
            self.run.values.clear()
            self.run.values.update(from_blob(state["values"], "the run's saved values"))


class RankState:
    """DCP Stateful for this rank: its RNGs and data position as they were at the last step boundary."""

    def __init__(self, feed: Any):
        self.feed = feed

    def state_dict(self) -> dict[str, Any]:
        b = self.feed.boundary
        return {"blob": to_blob({"rng": b["rng"], "data": b["data"], "epoch": b["epoch"], "generator": b["generator"]})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loaded = from_blob(state["blob"], "this rank's saved RNG and data position")
        set_rng_state(loaded["rng"])
        self.feed.restore_position(loaded.get("data"), int(loaded.get("epoch", 0)), loaded.get("generator"))


def check_state(state: dict[str, Any]) -> None:
    for name, obj in state.items():
        if not isinstance(name, str) or not name or name in RESERVED or name.startswith("rank"):
            raise ConfigError(f"state key {name!r}: expected a name other than {', '.join(RESERVED)} and rank*")
        if not stateful(obj):
            raise ConfigError(f"state[{name!r}]={type(obj).__name__} has no state_dict()/load_state_dict(); "
                              "pass plain values in values= instead")


def check_optimizer(optimizer: Any, model: Any) -> None:
    """Every parameter the optimizer steps must be the model's (an optimizer built on another model
    would make every save fail)."""
    if optimizer is None or model is None:
        return
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list):
        raise ConfigError(f"optimizer={type(optimizer).__name__}; expected a torch.optim.Optimizer")
    mine = {id(p) for p in model.parameters()}
    foreign = sum(1 for g in groups for p in g.get("params", []) if id(p) not in mine)
    if foreign:
        raise ConfigError(f"optimizer= holds {foreign} parameter(s) that are not model='s; build the optimizer "
                          "from the model you pass (after wrapping it in DDP or fully_shard)")
