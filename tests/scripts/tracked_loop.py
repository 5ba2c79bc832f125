"""A small preemptible loop feeding TensorBoard, W&B (offline) and MLflow (local file store) at once.

    python tests/scripts/tracked_loop.py RUN_DIR [--steps 60] [--interval 10] [--step-seconds 0.02]

tests/e2e/test_recipe_trackers.py stops it (SIGTERM), kills it (SIGKILL) and resumes it, then reads each
tracker back.
"""

import argparse
import os
import time

import torch
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from preemptible import Checkpointer, Report, Run
from preemptible.observe.trackers import MLflow, TensorBoard, WandB

parser = argparse.ArgumentParser()
parser.add_argument("run_dir")
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--interval", type=int, default=10)
parser.add_argument("--step-seconds", type=float, default=0.02)
parser.add_argument("--pause-at", type=int, default=None, help="sleep a minute after this step (to be killed there)")
args = parser.parse_args()

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=15, gamma=0.5)
data = StatefulDataLoader(TensorDataset(torch.randn(256, 8), torch.randn(256, 1)), batch_size=8, shuffle=True)
trackers = [TensorBoard(flush_secs=0.2), WandB(project="tests", mode="offline"),
            MLflow(tracking_uri="file://" + os.path.abspath(os.path.join(args.run_dir, "mlruns")), experiment="tests")]

run = Run(args.run_dir, model=model, optimizer=opt, scheduler=sched, data=data, max_steps=args.steps,
          tracker=trackers,
          checkpoint=Checkpointer(interval=args.interval, keep=10, meta={"config": {"lr": 0.05, "steps": args.steps}}),
          report=Report(log_every=1))
with run:
    for x, y in run.batches():
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        time.sleep(args.step_seconds)
        run.step_done(loss=loss, grad_scale=1.0)
        if run.step == args.pause_at:
            time.sleep(60)
run.exit()
