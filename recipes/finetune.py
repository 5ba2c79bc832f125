"""Reference fine-tuning recipe: a small GPT on byte-level text that survives preemption.

    python recipes/finetune.py                                  # embedded default, CPU or CUDA
    torchrun --nproc_per_node=2 recipes/finetune.py run_name=x  # DDP, one shared run directory
    python recipes/finetune.py signal_handler.sig=SIGUSR2       # choose the stop signal
    python recipes/finetune.py signal_handler=none              # no signal handling
    python recipes/finetune.py notices.cloud=aws                # also stop on an EC2 spot notice
    python recipes/finetune.py tracker=tensorboard              # or wandb, mlflow: one run across resumes

On a signal at any rank (TERM, INT, HUP by default) every rank stops at the same step, writes one
committed checkpoint and exits 128+signum; the same command again resumes from it, bit-identically.
A notice (`touch <run_dir>/STOP`, a cloud's spot notice) stops it the same way, exit status 75.
"""

from __future__ import annotations

from preemptible.stopping.early import hold_signals

hold_signals()  # first: a TERM/INT/HUP/USR2 during the seconds of imports below is honoured, not fatal

import os
import sys
import warnings

import hydra
import torch
from omegaconf import DictConfig

from preemptible import Run, exit_run, init_distributed
from preemptible.checkpoint.writer import load_model_weights
from finetune_parts.hydra_glue import build, call
from preemptible.distributed.env import ignore_late_signals, shutdown
from preemptible.errors import CheckpointError, ConfigError
from preemptible.distributed.parallel import parallelize
from finetune_parts.settings import (apply_after_resume, check_hydra_run_dir, check_vocab, composed,
                                         in_recipe_terms, refuse_changes, schedule_lambdas, validate)

# torchdata calls a torch API that torch deprecated; the warning says nothing actionable to users.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")


def train(cfg: DictConfig) -> Run:
    # ---- every value checked, everything built, before anything is written
    validate(cfg)
    check_hydra_run_dir()
    env = init_distributed(cfg.trainer.device)
    torch.manual_seed(cfg.seed)  # same model init on every rank
    model = build(cfg, "model").to(env.device)
    if model.init_from:
        load_model_weights(model, model.init_from, name="model.init_from")
    torch.manual_seed(cfg.seed + env.rank)  # dropout differs per rank, reproducibly
    batches = build(cfg, "data", rank=env.rank, world_size=env.world_size, seed=cfg.seed)
    check_vocab(cfg.model.vocab_size, batches.loader.dataset.data)
    example = lambda: [torch.zeros(2, cfg.model.block_size, dtype=torch.long, device=env.device)] * 2  # noqa: E731
    model = parallelize(model, cfg.trainer.parallelism, env, example)
    optimizer = call(cfg, "optim", model.parameters())
    schedule = call(cfg, "lr_schedule", optimizer, total_steps=cfg.trainer.max_steps)
    configured_schedule = schedule_lambdas(schedule)

    # ---- the run: owns cfg.run_dir, stops on signals and time limits, resumes, saves, exits
    trainer, scheduler = cfg.trainer, cfg.scheduler
    run = Run(cfg.run_dir, model=model, optimizer=optimizer, scheduler=schedule, data=batches,
              max_steps=trainer.max_steps, checkpointer=build(cfg, "checkpoint"),
              handler=build(cfg, "signal_handler"), notices=build(cfg, "notices"), tracker=build(cfg, "tracker"),
              stop_check=trainer.stop_check, max_time=trainer.max_time,
              slurm_time_limit=scheduler.time_limit, grace_period=scheduler.grace_period,
              save_guess=scheduler.save_guess, margin=scheduler.margin, requeue=scheduler.requeue,
              exit_code_on_stop=trainer.exit_code_on_stop, log_every=trainer.log_every, log_file="finetune.log",
              lease_wait=cfg.ownership.wait, stale_after=cfg.ownership.stale_after,
              param_digests=True if trainer.param_digests else "done", meta={"config": composed(cfg)}, seed=cfg.seed)
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


@hydra.main(config_path="../conf", config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run = train(cfg)
    except (ConfigError, CheckpointError) as e:
        # One write, on a line of its own: failing writer threads may still be printing their tracebacks.
        message = in_recipe_terms(e) if isinstance(e, ConfigError) else e
        sys.stderr.flush()
        os.write(2, f"\nerror: {message}\n".encode())
        ignore_late_signals()
        shutdown()
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    exit_run(run.exit_code)  # every rank waits for the others; late signals cannot change the status


if __name__ == "__main__":
    main()
