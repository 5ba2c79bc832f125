"""The shortest preemptible loop with an exponential moving average (EMA) of the weights: the EMA
model is saved and restored with everything else, so a resumed run's EMA is the uninterrupted one's.

    torchrun --nproc_per_node=2 examples/ema.py runs/ema   # DDP (CPU: gloo)
    python examples/ema.py runs/ema                        # one process
    python -m preemptible export runs/ema ema.safetensors  # the trained model's weights, for sampling
"""

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

import preemptible

parser = argparse.ArgumentParser()
parser.add_argument("run_dir")
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--interval", type=int, default=50, help="save every N steps")
parser.add_argument("--log-every", type=int, default=10)
parser.add_argument("--step-seconds", type=float, default=0.0, help="sleep per step (tests aim signals with it)")
args = parser.parse_args()

env = preemptible.init_distributed()
torch.manual_seed(0)

# A 4-class problem; the sampler shuffles per epoch and is itself stateful (torchdata's).
x = torch.randn(2048, 32)
labels = (x[:, :4].argmax(dim=1) + (x[:, 4] > 1).long()) % 4
dataset = TensorDataset(x, labels)
loader = StatefulDataLoader(dataset, batch_size=16, sampler=StatefulDistributedSampler(
    dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=0))

net = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(128, 4))
net = net.to(env.device)
model = DistributedDataParallel(net) if dist.is_initialized() else net
ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.99))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

run = preemptible.Run(args.run_dir, model=model, optimizer=optimizer, scheduler=scheduler, data=loader,
                      state={"ema": ema}, max_steps=args.steps,
                      checkpoint=preemptible.Checkpointer(interval=args.interval),
                      report=preemptible.Report(log_every=args.log_every))
with run:
    for xb, yb in run.batches():
        loss = F.cross_entropy(model(xb.to(env.device)), yb.to(env.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.update_parameters(net)
        time.sleep(args.step_seconds)
        run.step_done(loss=loss)
    if not run.stopping:  # the last step is done: evaluate the EMA (a stopped run does it when resumed)
        with torch.no_grad():
            acc = (ema(x.to(env.device)).argmax(dim=1).cpu() == labels).float().mean().item()
        run.event("ema_accuracy", accuracy=acc, ema_sha256=preemptible.params_sha256(ema.module))
run.exit()
