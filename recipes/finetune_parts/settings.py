"""The recipe's own settings: every value checked before anything runs or is written, and what a
resume does when the configuration changed since the checkpoint was written.

Building blocks and the parts of the run check their own arguments when they are built (model,
data, checkpoint, stopping, ...); this module checks the recipe's own keys and the ones that
relate two nodes, and refuses keys that moved, so a typo fails at start, in one line.
"""

from __future__ import annotations

import logging
import types
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from preemptible.checks import number, path
from preemptible.errors import ConfigError

log = logging.getLogger("preemptible.train")


# Keys that moved when the configuration got a node per part of Run (named as the library names
# them): an old key on the command line gets one line naming its replacement.
MOVED_KEYS = {
    "trainer.max_time": "stopping.max_time", "trainer.stop_check": "stopping.stop_check",
    "trainer.exit_code_on_stop": "stopping.exit_code_on_stop", "scheduler.requeue": "stopping.requeue",
    "scheduler.time_limit": "stopping.slurm_time_limit", "scheduler.save_guess": "stopping.save_guess",
    "scheduler.margin": "stopping.margin", "scheduler.grace_period": "stopping.grace_period",
    "trainer.log_every": "report.log_every", "trainer.param_digests": "report.param_digests",
}


def refuse_moved_keys(overrides: list[str]) -> None:
    """Before Hydra parses them (it would say only "not in struct"): a moved key names its new home."""
    for item in overrides:
        key = item.lstrip("+~").split("=", 1)[0]
        if key in MOVED_KEYS:
            raise ConfigError(f"{key}= moved: use {MOVED_KEYS[key]}= (the configuration has a node per part of the run)")
        if key == "scheduler" or key.startswith("scheduler."):
            raise ConfigError(f"{key}= moved: the scheduler keys are under stopping. (stopping.requeue, "
                              "stopping.slurm_time_limit, stopping.save_guess, stopping.margin, stopping.grace_period)")


def validate(cfg: DictConfig) -> None:
    """The recipe's own keys, checked now (ConfigError names the key and what fits); each part of
    the run (checkpoint, stopping, ownership, report, ...) checks its own when it is built."""
    path("run_dir", cfg.run_dir)
    number("trainer.max_steps", cfg.trainer.max_steps, low=1, integer=True)
    number("seed", cfg.seed, low=0, integer=True)
    optim = cfg.get("optim")
    if optim is not None and "lr" in optim:
        number("optim.lr", optim.lr, low=0, strict=True)
    if optim is not None and "weight_decay" in optim:
        number("optim.weight_decay", optim.weight_decay, low=0)
    if optim is not None and "betas" in optim:
        betas = optim.betas
        if not (OmegaConf.is_list(betas) and len(betas) == 2 and all(
                not isinstance(b, bool) and isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            raise ConfigError(f"optim.betas={_plain(betas)!r}; expected two numbers in [0, 1), e.g. [0.9,0.95]")
    data, model = cfg.get("data"), cfg.get("model")
    if data is not None and model is not None and "block_size" in data and "block_size" in model:
        if isinstance(data.block_size, int) and isinstance(model.block_size, int) \
                and data.block_size > model.block_size:
            raise ConfigError(f"data.block_size={data.block_size} is longer than model.block_size="
                              f"{model.block_size} (the positions the model embeds); use data.block_size <= "
                              f"{model.block_size}, or a larger model.block_size")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def check_hydra_run_dir() -> None:
    """`hydra.run.dir=X` (Hydra's habit) does not place this recipe's run: say so, naming run_dir=."""
    try:
        from hydra.core.hydra_config import HydraConfig

        given = HydraConfig.get().run.dir
    except (ImportError, ValueError):  # not under @hydra.main (a composed config in a test)
        return
    if given not in (".", None):
        raise ConfigError(f"hydra.run.dir={given!r} does not place the run here; use run_dir={given!r} (the run "
                          "directory, where checkpoints, metrics and the log go)")


def check_vocab(vocab_size: int, data: Any) -> None:
    """The model must embed every byte value the data holds."""
    top = int(data.max()) if len(data) else 0
    if vocab_size <= top:
        raise ConfigError(f"model.vocab_size={vocab_size} is too small for the data: it holds byte values up to {top}; "
                          "use model.vocab_size=256 for byte-level text")


# ----------------------------------------------------------------------------- resume with changes

# Keys whose change a resume cannot honour: the checkpoint would not load, or the data order and
# RNG streams it continues belong to the old values.
REFUSED = ("model.vocab_size", "model.block_size", "model.n_layer", "model.n_head", "model.n_embd", "model._target_",
           "optim._target_", "lr_schedule._target_", "seed", "data._target_", "data.paths", "data.block_size",
           "data.max_bytes", "data.batch_size")
# Keys that take effect from the resumed step on (applied after the checkpoint is loaded).
APPLIED = ("optim.", "lr_schedule.", "trainer.max_steps", "model.dropout")


def composed(cfg: DictConfig) -> dict[str, Any]:
    """The configuration a checkpoint records: resolved, as plain data."""
    return OmegaConf.to_container(cfg, resolve=True)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(saved: Optional[dict], now: dict) -> tuple[list[str], list[str], list[str]]:
    """(refused, applied, other) changed keys, each as 'key: old -> new'."""
    if not saved:
        return [], [], []
    old, new = _flat(saved), _flat(now)
    refused, applied, other = [], [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key) or key.startswith("hydra."):
            continue
        text = f"{key}: {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}"
        if key in REFUSED:
            refused.append(text)
        elif key.startswith(APPLIED):
            applied.append(text)
        else:
            other.append(text)
    return refused, applied, other


def refuse_changes(saved: Optional[dict], now: dict, checkpoint: str) -> None:
    """Before loading: ConfigError naming every change a resume cannot honour."""
    refused, _, _ = config_changes(saved, now)
    if refused:
        raise ConfigError(f"{checkpoint} was written with another configuration that a resume cannot honour "
                          f"({'; '.join(refused)}); start a new run (run_name=...), or fine-tune from it with "
                          f"model.init_from={checkpoint}")


def apply_after_resume(saved: Optional[dict], now: dict, checkpoint: str, optimizer: Any, schedule: Any,
                       fresh_lambdas: list[dict]) -> None:
    """After loading (and `refuse_changes`): apply the changes from the resumed step on, say what changed.

    The optimizer's hyperparameters and the LR schedule come from the checkpoint when it loads;
    here the current configuration's values replace them, so that a changed `optim.lr`, schedule
    or `trainer.max_steps` (the schedule is stretched to the new length) applies from the first
    resumed step. Unchanged values leave the loaded state exactly as it was.
    """
    _, applied, other = config_changes(saved, now)
    if applied:
        before = [g["lr"] for g in optimizer.param_groups]
        opt_cfg = {k: v for k, v in now.get("optim", {}).items() if not k.startswith("_")}
        for group in optimizer.param_groups:
            for k, v in opt_cfg.items():
                if k in group:
                    group[k] = tuple(v) if isinstance(group[k], tuple) else v
            if "lr" in opt_cfg:
                group["initial_lr"] = opt_cfg["lr"]
        if "lr" in opt_cfg:
            schedule.base_lrs = [opt_cfg["lr"]] * len(optimizer.param_groups)
        for fn, fresh in zip(schedule.lr_lambdas, fresh_lambdas):
            if fresh is not None:
                fn.__dict__.update(fresh)  # the schedule as configured now (its length: trainer.max_steps)
        lrs = [base * fn(schedule.last_epoch) for base, fn in zip(schedule.base_lrs, schedule.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        schedule._last_lr = lrs
        log.warning("configuration changed since %s, applied from the resumed step on: %s; the LR of the next "
                    "step is %.4g (was %.4g)", checkpoint, "; ".join(applied), lrs[0], before[0])
    if other:
        log.info("configuration changed since %s (takes effect now): %s", checkpoint, "; ".join(other))


def schedule_lambdas(schedule: Any) -> list[Optional[dict]]:
    """The schedule's own parameters as built from the configuration (before a load replaces them);
    None for a plain function (LambdaLR saves nothing of those either)."""
    return [None if isinstance(fn, types.FunctionType) else dict(vars(fn)) for fn in schedule.lr_lambdas]
