"""A user's own loop that follows the README's documented order, under torchrun:
stop agreed -> save -> leave the handler block -> preemptible.exit_run(status)."""

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from preemptible import DistributedSignalHandler, exit_run

dist.init_process_group("gloo")
rank = dist.get_rank()
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
out_dir = sys.argv[1]
status = 0
with DistributedSignalHandler(sig=[signal.SIGTERM, signal.SIGINT]) as handler:
    for step in range(1, 100_000):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and step == 5:
            open(os.path.join(out_dir, "running"), "w").close()
        time.sleep(0.005)
        if handler.should_stop():
            torch.save(model.module.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))  # the user's save
            status = 128 + max(handler.signals_by_rank())
            break
exit_run(status)
