"""Reference fine-tuning recipe: a small GPT on byte-level text that survives preemption.

    python recipes/finetune.py                                  # embedded default, CPU or CUDA
    torchrun --nproc_per_node=2 recipes/finetune.py run_name=x  # DDP, one shared run directory
    python recipes/finetune.py signal_handler.sig=SIGUSR2       # choose the stop signal
    python recipes/finetune.py signal_handler=none              # no signal handling
    python recipes/finetune.py notices.cloud=aws                # also stop on an EC2 spot notice
    python recipes/finetune.py tracker=tensorboard              # or wandb, mlflow: one run across resumes
    python recipes/finetune.py watchdog.timeout=60              # a frozen or lost rank ends the job (status 86)

On a signal at any rank (TERM, INT, HUP by default) every rank stops at the same step, writes one
committed checkpoint and exits 128+signum; the same command again resumes from it, bit-identically.
A notice (`touch <run_dir>/STOP`, a cloud's spot notice) stops it the same way, exit status 75.

The configuration has a node per part of the run, named as the library names it (`checkpoint`,
`stopping`, `ownership`, `report`, `watchdog`, `signal_handler`, `notices`, `tracker`); the recipe's own
building blocks (model, data, LR schedules, settings) are in recipes/finetune_parts.
"""

from __future__ import annotations

from preemptible import hold_signals

hold_signals()  # first: a TERM/INT/HUP/USR2 during the seconds of imports below is honoured, not fatal

import os
import sys
import warnings

import hydra
import torch
from omegaconf import DictConfig

from finetune_parts.hydra_glue import build, call, node_errors
from finetune_parts.settings import (apply_after_resume, check_hydra_run_dir, check_vocab, composed, refuse_changes,
                                     refuse_moved_keys, schedule_lambdas, validate)
from preemptible import CheckpointError, ConfigError, Run, init_distributed, load_model_weights
from preemptible.distributed.env import ignore_late_signals, shutdown
from preemptible.distributed.parallel import parallelize

# torchdata calls a torch API that torch deprecated; the warning says nothing actionable to users.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")


def train(cfg: DictConfig) -> Run:
    # ---- every value checked, everything built, before anything is written
    validate(cfg)
    check_hydra_run_dir()
    watchdog = build(cfg, "watchdog")  # its timeout bounds the process group's too
    with node_errors("trainer"):
        env = init_distributed(cfg.trainer.device, timeout=watchdog.group_timeout if watchdog else None)
    torch.manual_seed(cfg.seed)  # same model init on every rank
    model = build(cfg, "model").to(env.device)
    if model.init_from:
        load_model_weights(model, model.init_from, name="model.init_from")
    torch.manual_seed(cfg.seed + env.rank)  # dropout differs per rank, reproducibly
    batches = build(cfg, "data", rank=env.rank, world_size=env.world_size, seed=cfg.seed)
    check_vocab(cfg.model.vocab_size, batches.loader.dataset.data)
    example = lambda: [torch.zeros(2, cfg.model.block_size, dtype=torch.long, device=env.device)] * 2  # noqa: E731
    with node_errors("trainer"):
        model = parallelize(model, cfg.trainer.parallelism, env, example)
    optimizer = call(cfg, "optim", model.parameters())
    schedule = call(cfg, "lr_schedule", optimizer, total_steps=cfg.trainer.max_steps)
    configured_schedule = schedule_lambdas(schedule)

    # ---- the run: owns cfg.run_dir, stops on signals, notices and time limits, resumes, saves, exits
    stopping = build(cfg, "stopping", signals=build(cfg, "signal_handler"), notices=build(cfg, "notices"))
    run = Run(cfg.run_dir, model=model, optimizer=optimizer, scheduler=schedule, data=batches,
              max_steps=cfg.trainer.max_steps, stopping=stopping,
              checkpoint=build(cfg, "checkpoint", meta={"config": composed(cfg)}),
              ownership=build(cfg, "ownership"), tracker=build(cfg, "tracker"), report=build(cfg, "report"),
              watchdog=watchdog)
    # a resume refuses what it cannot honour (before loading) and applies changed hyperparameters (after)
    run.before_resume = lambda marker, path: refuse_changes(marker.get("config"), composed(cfg), str(path))
    run.after_resume = lambda marker, path: apply_after_resume(marker.get("config"), composed(cfg), path.name,
                                                               optimizer, schedule, configured_schedule)

    # ---- the loop
    with run:
        for x, y in run.batches():
            loss = model(x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            run.step_done(loss=loss)
    return run


def fail(e: Exception) -> None:
    """One line on stderr (one write: failing writer threads may still be printing their tracebacks),
    exit 2 for something the user can fix in the configuration or the files, 1 for a failed save."""
    sys.stderr.flush()
    os.write(2, f"\nerror: {e}\n".encode())
    ignore_late_signals()
    shutdown()
    sys.exit(2 if isinstance(e, ConfigError) else 1)


@hydra.main(config_path="../conf", config_name="finetune", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    try:
        run = train(cfg)
    except (ConfigError, CheckpointError) as e:
        fail(e)
    run.exit()  # every rank waits for the others; late signals cannot change the status


def main() -> None:
    try:
        refuse_moved_keys(sys.argv[1:])
    except ConfigError as e:
        fail(e)
    hydra_main()


if __name__ == "__main__":
    main()
