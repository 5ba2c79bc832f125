"""Reference fine-tuning recipe: a small GPT on byte-level text that survives preemption.

    python recipes/finetune.py                                  # embedded default, CPU or CUDA
    torchrun --nproc_per_node=2 recipes/finetune.py run_name=x  # DDP, one shared run directory
    python recipes/finetune.py signal_handler.sig=SIGUSR2       # choose the stop signal

On a signal at any rank every rank stops at the same step, writes one committed checkpoint and
exits 128+signum; the same command again resumes from it, bit-identically.
"""

from __future__ import annotations

import logging
import sys

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel

from preemptible.checkpoint import load_model_weights
from preemptible.config import build
from preemptible.distributed import barrier, init_distributed, shutdown
from preemptible.errors import ConfigError
from preemptible.metrics import Metrics
from preemptible.state import ModelOptimState, Progress, RankState, params_sha256

log = logging.getLogger("preemptible.train")


def train(cfg: DictConfig) -> int:
    # ---- where and who
    env = init_distributed(cfg.trainer.device)
    run_dir = HydraConfig.get().runtime.output_dir
    max_steps = cfg.trainer.max_steps
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ConfigError(f"trainer.max_steps={max_steps!r}; expected an int >= 1")

    # ---- build everything from config (same seed on every rank for the model, then per rank)
    torch.manual_seed(cfg.seed)
    model = build(cfg, "model").to(env.device)
    if model.init_from:
        load_model_weights(model, model.init_from)
    torch.manual_seed(cfg.seed + env.rank)  # dropout differs per rank, reproducibly
    batches = build(cfg, "data", rank=env.rank, world_size=env.world_size, seed=cfg.seed)
    if env.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    optimizer = build(cfg, "optim")(model.parameters())
    schedule = build(cfg, "lr_schedule")(optimizer, total_steps=max_steps)
    handler = build(cfg, "signal_handler")
    should_stop = stop_check(handler, model, cfg.trainer.stop_check)
    checkpointer = build(cfg, "checkpoint").setup(run_dir, env.rank)
    metrics = Metrics(run_dir, enabled=env.is_main, max_steps=max_steps, log_every=cfg.trainer.log_every)
    progress = Progress()
    state = {"model_optim": ModelOptimState(model, optimizer), "lr_schedule": schedule, "progress": progress,
             f"rank{env.rank}": RankState(batches)}

    # ---- from here a signal is recorded, during resume too
    stop_signal, ranks = 0, {}
    with handler if handler is not None else _NoHandler():
        # resume from the newest committed checkpoint, if any
        resume_from = checkpointer.resume_path()
        if resume_from is not None:
            checkpointer.load(resume_from, state)
            checkpointer.last_committed_step = progress.step
            log.info("resumed from %s at step %d", resume_from, progress.step)
            metrics.event("resumed", step=progress.step, **{"from": str(resume_from)})
        metrics.start(progress.step)

        # the loop: one step, then the agreed stop check, then a periodic save
        while progress.step < max_steps:
            x, y = next(batches)
            loss = model(x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr = schedule.get_last_lr()[0]
            schedule.step()
            progress.step += 1
            metrics.step(progress.step, loss, lr)
            if should_stop():
                stop_signal, ranks = _who_stopped(handler, progress.step)
                break
            if checkpointer.due(progress.step):
                checkpointer.save(progress.step, state)

        # stop or finish: one committed checkpoint either way, then say so
        path = checkpointer.save(progress.step, state)
        if stop_signal:
            metrics.event("preempted", step=progress.step, signal=_name(stop_signal), ranks=ranks, checkpoint=str(path))
            log.info("stopped at step %d on %s; checkpoint %s; run the same command to resume",
                     progress.step, _name(stop_signal), path)
        else:
            metrics.event("done", step=progress.step, params_sha256=params_sha256(model), checkpoint=str(path))
            log.info("done at step %d", progress.step)
    metrics.close()
    barrier()
    if stop_signal:
        code = cfg.trainer.exit_code_on_stop
        return 128 + stop_signal if code is None else int(code)
    return 0


def stop_check(handler, model, mode: str):
    """The per-step question "stop now?", answered the same on every rank at the same step.

    auto: on the gradients' all-reduce for DDP on CPU (no extra collective), else the handler's
    pipelined MAX reduction; reduce / gradients: force one; all_gather: the documented per-step
    `any(signals_received())`, kept for comparison.
    """
    modes = ("auto", "reduce", "gradients", "all_gather")
    if mode not in modes:
        raise ConfigError(f"trainer.stop_check={mode!r}; expected one of {', '.join(modes)}")
    if handler is None:
        return lambda: False
    ddp = isinstance(model, DistributedDataParallel)
    if mode == "gradients" and not ddp:
        raise ConfigError("trainer.stop_check=gradients needs DDP (torchrun with more than one rank); use auto")
    if mode == "gradients" or (mode == "auto" and ddp and next(model.parameters()).device.type == "cpu"):
        handler.ride_on_gradients(model)
    if mode == "all_gather":
        return lambda: any(handler.signals_received())
    return handler.should_stop


def _who_stopped(handler, step: int) -> tuple[int, dict[str, str]]:
    """One all_gather, once: which rank got which signal (for the log and metrics)."""
    by_rank = handler.signals_by_rank()
    ranks = {str(r): _name(s) for r, s in enumerate(by_rank) if s}
    log.info("stop agreed at step %d: signals by rank %s", step, ranks)
    return max(by_rank), ranks


def _name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


class _NoHandler:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@hydra.main(config_path="../conf", config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        code = train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        shutdown()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    # `signal_handler=null` reads better than Hydra's `~signal_handler`; both disable handling.
    sys.argv = ["~signal_handler" if a.lower() in ("signal_handler=null", "signal_handler=none") else a
                for a in sys.argv]
    main()
