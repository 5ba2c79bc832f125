"""A plain training loop made preemptible with `preemptible.Run`: torchdata's StatefulDataLoader,
gradient accumulation, mixed precision with a GradScaler, and an evaluation phase.

    torchrun --nproc_per_node=2 examples/accumulate_amp_eval.py runs/accum   # DDP (CPU: gloo)
    python examples/accumulate_amp_eval.py runs/accum                        # one process

Send TERM (or Ctrl-C) to any rank: every rank stops at the same point, one checkpoint is written,
and the same command again continues bit-identically. The stop is checked between micro-batches
and between eval batches too, so neither delays it; a stop there saves the last step boundary and
the resume repeats the interrupted step (or evaluation) from its start.
"""

import argparse
import math
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import preemptible

parser = argparse.ArgumentParser()
parser.add_argument("run_dir")
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per optimizer step")
parser.add_argument("--eval-every", type=int, default=20)
parser.add_argument("--interval", type=int, default=25, help="save every N steps")
parser.add_argument("--log-every", type=int, default=10)
parser.add_argument("--step-seconds", type=float, default=0.0, help="sleep per micro-batch (tests aim signals)")
parser.add_argument("--eval-seconds", type=float, default=0.0, help="sleep per eval batch (tests aim signals)")
args = parser.parse_args()

env = preemptible.init_distributed()  # joins torchrun's process group; one process without it
device, rank, world = env.device, env.rank, env.world_size
torch.manual_seed(0)

# Data: a regression task; each rank reads its own shard, the loader's position is saved per rank.
x = torch.randn(4096, 16)
y = x @ torch.randn(16, 1) + 0.1 * torch.randn(4096, 1)
train = StatefulDataLoader(TensorDataset(x[:3584], y[:3584]), batch_size=8,
                           sampler=DistributedSampler(TensorDataset(x[:3584]), num_replicas=world, rank=rank, seed=0))
val = DataLoader(TensorDataset(x[3584:], y[3584:]), batch_size=64,
                 sampler=DistributedSampler(TensorDataset(x[3584:]), num_replicas=world, rank=rank, shuffle=False))

model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
model = DistributedDataParallel(model.to(device)) if dist.is_initialized() else model.to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
scaler = torch.amp.GradScaler(device.type)

run = preemptible.Run(args.run_dir, model=model, optimizer=optimizer, scheduler=scheduler, data=train,
                      state={"scaler": scaler}, values={"best_val": math.inf}, max_steps=args.steps,
                      checkpoint=preemptible.Checkpointer(interval=args.interval),
                      report=preemptible.Report(log_every=args.log_every))


def evaluate() -> float:
    model.eval()
    total = torch.zeros(2, device=device)
    with torch.no_grad():
        for xb, yb in val:
            if run.should_stop():  # a stop during evaluation is not delayed by it
                break
            time.sleep(args.eval_seconds)
            total += torch.stack([F.mse_loss(model(xb.to(device)), yb.to(device), reduction="sum"),
                                  torch.tensor(float(len(xb)), device=device)])
    model.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


with run:
    micro = 0
    for xb, yb in run.batches():
        # Evaluate at the top of the loop, before the next step: a run resumed from this step does it too.
        if micro == 0 and run.step > 0 and run.step % args.eval_every == 0 and not run.stopping:
            loss_val = evaluate()
            if run.stopping:
                break
            run.values["best_val"] = min(run.values["best_val"], loss_val)
            run.event("eval", val_loss=loss_val, best_val=run.values["best_val"])
        with torch.autocast(device.type, dtype=amp_dtype):
            loss = F.mse_loss(model(xb.to(device)), yb.to(device)) / args.accumulate
        scaler.scale(loss).backward()
        micro += 1
        time.sleep(args.step_seconds)
        if micro < args.accumulate:
            if run.should_stop():  # between micro-batches: the partial step is dropped, resumed whole
                break
            continue
        micro = 0
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        run.step_done(loss=loss * args.accumulate, scale=scaler.get_scale())
run.exit()
