"""A tiny Run loop for the watchdog's tests, one process or several started as `srun` starts tasks
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK in the environment; no agent).

    python watchdog_loop.py RUN_DIR '{"timeout": 3, "steps": 40, ...}'

Options (JSON): timeout (number or "auto"), floor, steps, interval (checkpoint every N steps),
step_sleep (seconds per step), first_step_sleep (a slow first step: compilation), hang_at/hang_rank
(sleep without progress there: a frozen rank), eval_at/eval_seconds/eval_rank0_only (a long
evaluation: every rank calls should_stop() between its batches, or rank 0 alone calls
run.heartbeat() while the others wait at a barrier), watchdog (false: none).
"""

import json
import sys
import time

import torch
import torch.distributed as dist

import preemptible

run_dir, opts = sys.argv[1], json.loads(sys.argv[2])
env = preemptible.init_distributed("cpu", timeout=opts.get("group_timeout"))
torch.manual_seed(0)
model = torch.nn.Linear(8, 8)
if env.world_size > 1:
    model = torch.nn.parallel.DistributedDataParallel(model)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
watchdog = preemptible.Watchdog(timeout=opts.get("timeout", "auto"), floor=opts.get("floor", 60.0))
batches = (torch.randn(4, 8) for _ in iter(int, 1))  # drawn from torch's RNG: Run restores it on a resume
run = preemptible.Run(run_dir, model=model, optimizer=opt, data=batches, max_steps=opts.get("steps", 40),
                      checkpoint=preemptible.Checkpointer(interval=opts.get("interval", 10),
                                                          interrupt_every=opts.get("interrupt_every")),
                      watchdog=watchdog if opts.get("watchdog", True) else None)


def evaluate(seconds: float) -> None:
    end = time.monotonic() + seconds
    if opts.get("eval_rank0_only"):
        if env.rank == 0:
            while time.monotonic() < end:
                time.sleep(0.2)
                run.heartbeat("evaluation on rank 0")
        dist.barrier()
        return
    while time.monotonic() < end:
        time.sleep(0.2)
        if run.should_stop():
            return


with run:
    for x in run.batches():
        if run.step == 0 and opts.get("first_step_sleep"):
            time.sleep(opts["first_step_sleep"])
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        time.sleep(opts.get("step_sleep", 0.0))
        if run.step_done():
            break
        if run.step == opts.get("hang_at") and env.rank == opts.get("hang_rank", 0):
            print(f"rank {env.rank} freezing at step {run.step}", flush=True)
            time.sleep(3600)
        if run.step == opts.get("eval_at"):
            evaluate(opts["eval_seconds"])
print(f"rank {env.rank} ended at step {run.step}", flush=True)
run.exit()
