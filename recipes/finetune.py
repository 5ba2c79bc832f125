"""Reference fine-tuning recipe: a small GPT on byte-level text that survives preemption.

    python recipes/finetune.py                                  # embedded default, CPU or CUDA
    torchrun --nproc_per_node=2 recipes/finetune.py run_name=x  # DDP, one shared run directory
    python recipes/finetune.py signal_handler.sig=SIGUSR2       # choose the stop signal

On a signal at any rank (TERM, INT, HUP by default) every rank stops at the same step, writes one
committed checkpoint and exits 128+signum; the same command again resumes from it, bit-identically.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel

from preemptible import faults, slurm
from preemptible.checkpoint import load_model_weights
from preemptible.config import build, call
from preemptible.distributed import (barrier, broadcast_object, exit_run, ignore_late_signals, init_distributed,
                                     shutdown)
from preemptible.errors import CheckpointError, ConfigError
from preemptible.metrics import Metrics
from preemptible.ownership import RunLease
from preemptible.parallel import parallelize
from preemptible.preemption import agreed_stop, end_time, exit_status, save_skip_reason, want_requeue
from preemptible.recipe.settings import (apply_after_resume, check_vocab, composed, refuse_changes,
                                         schedule_lambdas, validate)
from preemptible.state import TrainState, params_sha256
from preemptible.stop import Deadline, reason_name

log = logging.getLogger("preemptible.train")


def train(cfg: DictConfig) -> int:
    # ---- every value checked, everything built, before anything is written
    validate(cfg)
    env = init_distributed(cfg.trainer.device)
    run_dir = HydraConfig.get().runtime.output_dir
    max_steps = cfg.trainer.max_steps
    torch.manual_seed(cfg.seed)  # same model init on every rank
    model = build(cfg, "model").to(env.device)
    if model.init_from:
        load_model_weights(model, model.init_from)
    torch.manual_seed(cfg.seed + env.rank)  # dropout differs per rank, reproducibly
    batches = build(cfg, "data", rank=env.rank, world_size=env.world_size, seed=cfg.seed)
    check_vocab(cfg.model.vocab_size, batches.loader.dataset.data)
    example = lambda: [torch.zeros(2, cfg.model.block_size, dtype=torch.long, device=env.device)] * 2  # noqa: E731
    model = parallelize(model, cfg.trainer.parallelism, env, example)
    optimizer = call(cfg, "optim", model.parameters())
    schedule = call(cfg, "lr_schedule", optimizer, total_steps=max_steps)
    configured_schedule = schedule_lambdas(schedule)
    handler = build(cfg, "signal_handler")
    should_stop = stop_check(handler, model, cfg.trainer.stop_check)
    checkpointer = build(cfg, "checkpoint")
    deadline = Deadline(end_time(cfg.trainer.max_time, cfg.scheduler.time_limit), cfg.scheduler.save_guess,
                        cfg.scheduler.margin)
    if deadline.end is not None and handler is None:
        raise ConfigError("trainer.max_time and SLURM time limits need a signal_handler to agree on the stop step; "
                          "drop signal_handler=null, or set trainer.max_time=null and scheduler.time_limit=false")
    want_requeue(cfg.scheduler.requeue)  # validate now, not at the stop

    # ---- own the run directory (a second run waits, then fails naming this one), then write to it
    with own(run_dir, cfg, checkpointer, env) as lease:
        checkpointer.setup(run_dir, env.rank)
        checkpointer.owner_check = lease.check if lease else None
        checkpointer.meta = {"config": composed(cfg)}
        metrics = Metrics(run_dir, enabled=env.is_main, max_steps=max_steps, log_every=cfg.trainer.log_every)
        train_state = TrainState(model, optimizer, schedule, batches, env.rank, env.world_size)
        state, progress = train_state.dcp, train_state.progress

        def digest(always: bool = False):
            """params_sha256 where it is written (rank 0), on every rank when sharded (a collective)."""
            if not (always or cfg.trainer.param_digests):
                return None
            return params_sha256(model) if env.is_main or cfg.trainer.parallelism == "fsdp" else None

        # ---- from here a signal is recorded, during resume too
        stop = None
        with handler if handler is not None else _NoHandler():
            # resume from the run's head checkpoint (or start its branch at checkpoint.resume=PATH)
            resume = checkpointer.resume_path()
            if resume.path is not None:
                saved_config = checkpointer.marker(resume.path).get("config")
                refuse_changes(saved_config, composed(cfg), str(resume.path))
                saved_world = train_state.restore(checkpointer, resume.path, cfg.seed)
                apply_after_resume(saved_config, composed(cfg), resume.path.name, optimizer, schedule,
                                   configured_schedule)
                checkpointer.adopt(resume, progress.step)
                log.info("resumed from %s at step %d (written by %d ranks, now %d; verified in %.2fs)", resume.path,
                         progress.step, saved_world, env.world_size, resume.verify_seconds)
                metrics.event("resumed", step=progress.step, world_size=env.world_size, saved_world_size=saved_world,
                              params_sha256=digest(), branched=resume.branched, skipped=resume.skipped,
                              **{"from": str(resume.path)})
            metrics.start(progress.step)

            # the loop: one step, then the agreed stop check, then a periodic save
            while progress.step < max_steps:
                x, y = next(batches)
                loss = model(x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                checkpointer.wait_staged()  # an async save must have copied the weights before they change
                optimizer.step()
                lr = schedule.get_last_lr()[0]
                schedule.step()
                progress.step += 1
                metrics.step(progress.step, loss, lr)
                deadline.step_done()
                if handler is not None and deadline.expired(checkpointer.last_save_seconds):
                    handler.request_stop()  # the time limit is near: voted like a signal
                faults.inject("step", progress.step)
                if should_stop():
                    stop = agreed_stop(handler, progress.step)
                    break
                if checkpointer.due(progress.step):
                    checkpointer.save(progress.step, state, wait=False)  # async if checkpoint.async_save
                checkpointer.poll()

            # stop or finish: one committed checkpoint (unless it cannot fit the grace period), then say so
            faults.inject("final_save", progress.step)
            if stop is None:
                path = checkpointer.save(progress.step, state)
                metrics.event("done", step=progress.step, params_sha256=digest(always=True), checkpoint=str(path))
                log.info("done at step %d", progress.step)
                if handler is not None and handler.received:
                    log.info("%s arrived after the last step: the run is complete and committed, nothing to stop",
                             reason_name(handler.received[0][0]))
            else:
                estimate = checkpointer.last_save_seconds or cfg.scheduler.save_guess
                skipped = save_skip_reason(stop, cfg.scheduler.grace_period, estimate)
                path = None if skipped else checkpointer.save(progress.step, state)
                metrics.event("preempted", step=progress.step, signal=stop.reason, ranks=stop.ranks,
                              params_sha256=digest(), checkpoint=str(path) if path else None,
                              **({"save_skipped": skipped} if skipped else {}))
                again = ("run the same command to resume" if checkpointer.resume != "never"
                         else "run it again with checkpoint.resume=auto to resume")
                if skipped:
                    log.warning("stopped at step %d on %s without saving: %s; the resume starts from %s (%s)",
                                progress.step, stop.reason, skipped, checkpointer.head or "scratch", again)
                else:
                    log.info("stopped at step %d on %s; checkpoint %s; %s", progress.step, stop.reason, path, again)
        ignore_late_signals()  # committed: a late TERM (torchrun ending the other workers) changes nothing now
        checkpointer.close()
        metrics.close()
        barrier()
    if stop is None:
        return 0
    if env.is_main and want_requeue(cfg.scheduler.requeue):
        slurm.requeue()  # only now: the checkpoint is durable and every rank is past its last collective
    return exit_status(stop, cfg.trainer.exit_code_on_stop)


class own:
    """Rank 0 takes the run directory's lease (and the checkpoint directory's, if it lies outside);
    every rank learns the outcome, so a refusal is one error on every rank. Yields rank 0's lease."""

    def __init__(self, run_dir: str, cfg: DictConfig, checkpointer, env):
        self.dirs = [Path(run_dir)]
        if checkpointer.dir and not Path(checkpointer.dir).resolve().is_relative_to(Path(run_dir).resolve()):
            self.dirs.append(Path(checkpointer.dir))
        self.cfg, self.env, self.leases, self.log_file = cfg.ownership, env, [], None

    def __enter__(self):
        error = None
        if self.env.is_main:
            for key, d in zip(("run directory", "checkpoint.dir"), self.dirs):
                try:
                    self.leases.append(RunLease(d, wait=self.cfg.wait, stale_after=self.cfg.stale_after).acquire())
                except ConfigError as e:
                    error = ConfigError(f"checkpoint.dir={str(d)!r}: {e}") if key == "checkpoint.dir" else e
                    break
        error = broadcast_object(error)
        if error is not None:
            self._release()
            raise error
        global _owned
        _owned = True
        self.log_file = logging.FileHandler(self.dirs[0] / "finetune.log")  # only once the directory is ours
        self.log_file.setFormatter(logging.getLogger().handlers[0].formatter if logging.getLogger().handlers else None)
        logging.getLogger().addHandler(self.log_file)
        return self.leases[0] if self.leases else None

    def _release(self):
        for lease in reversed(self.leases):
            lease.release()
        self.leases = []

    def __exit__(self, *exc):
        self._release()
        if self.log_file is not None:
            logging.getLogger().removeHandler(self.log_file)
            self.log_file.close()


def stop_check(handler, model, mode: str):
    """The per-step question "stop now?", answered the same on every rank at the same step.

    reduce: the handler's pipelined MAX reduction on a CPU group, as often as
    signal_handler.check_every says ('auto': as rarely as a stop within max_latency allows);
    gradients: the flag rides on DDP's gradient all-reduce (no collective of its own);
    all_gather: the documented per-step `any(signals_received())`, kept for comparison.
    """
    modes = ("reduce", "gradients", "all_gather")
    if mode not in modes:
        raise ConfigError(f"trainer.stop_check={mode!r}; expected one of {', '.join(modes)}")
    if handler is None:
        return lambda: False
    if mode == "gradients":
        if not isinstance(model, DistributedDataParallel):
            raise ConfigError("trainer.stop_check=gradients needs DDP with more than one rank; use reduce")
        handler.ride_on_gradients(model)
    if mode == "all_gather":
        return lambda: any(handler.signals_received())
    return handler.should_stop


class _NoHandler:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


_owned = False  # this process held the run directory's lease (so the files in it are its own)


def _remove_if_new(run_dir: Path, was_empty: bool) -> None:
    """A failed start in a new run directory leaves nothing behind: the files this run made there
    (its log, an empty checkpoint directory) and the directory itself. An existing run's files,
    and anything another process put there, are never touched."""
    if not was_empty:
        return
    if _owned:
        (run_dir / "finetune.log").unlink(missing_ok=True)
    for d in (run_dir / "checkpoints", run_dir):
        try:
            d.rmdir()  # only if empty
        except OSError:
            pass


@hydra.main(config_path="../conf", config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    was_empty = not any(run_dir.iterdir())  # Hydra made it just now (it writes nothing else: see conf)
    error, code = None, 0
    try:
        code = train(cfg)
    except ConfigError as e:
        error, code = e, 2
        _remove_if_new(run_dir, was_empty)
    except CheckpointError as e:
        error, code = e, 1
    if error is None:
        exit_run(code)  # every rank waits for the others; late signals cannot change the status
    # One write, on a line of its own: failing writer threads may still be printing their tracebacks.
    sys.stderr.flush()
    os.write(2, f"\nerror: {error}\n".encode())
    ignore_late_signals()
    shutdown()
    sys.exit(code)


if __name__ == "__main__":
    # `signal_handler=null` reads better than Hydra's `~signal_handler`; both disable handling.
    sys.argv = ["~signal_handler" if a.lower() in ("signal_handler=null", "signal_handler=none") else a
                for a in sys.argv]
    main()
