"""Checkpoint cost: our committed save vs. a plain torch.save of the same state to the same disk.

    python benchmarks/checkpoint_cost.py [--n-layer 8 --n-embd 768] [--repeats 3] [--dir PATH]

Single process, CPU. Prints a table: seconds per save (median over repeats, configurations
alternating), the ratio to a plain torch.save (target <= 1.2; our save also fsyncs and commits),
and for async saving the time the training loop is blocked (the call, plus the wait before the
next optimizer step while the copy overlaps a forward/backward) vs. the synchronous save
(target <= 0.10).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

import torch

from preemptible.checkpoint import Checkpointer
from preemptible.recipe.model import GPT
from preemptible.state import ModelOptimState, Progress


def state_bytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(state_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(state_bytes(v) for v in tree)
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir under the current directory)")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = GPT(block_size=256, n_layer=args.n_layer, n_head=args.n_embd // 64, n_embd=args.n_embd)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, 256, (4, 256))

    def train_step():
        model(batch, batch).backward()

    train_step()
    optimizer.step()  # optimizer state exists, as in a real run
    progress = Progress()
    progress.step = 1
    state = {"model_optim": ModelOptimState(model, optimizer), "progress": progress}
    nbytes = state_bytes(state["model_optim"].state_dict())

    root = tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir or os.getcwd())
    names = ("torch.save", "torch.save+fsync", "preemptible sync", "preemptible async (total)",
             "preemptible async (blocked)")
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        for r in range(args.repeats):
            for name in names:
                target = os.path.join(root, f"{r}-{name.replace(' ', '_')}")
                if name.startswith("torch.save"):
                    plain = {"model_optim": state["model_optim"].state_dict(), "progress": {"step": 1}}
                    t0 = time.perf_counter()
                    with open(target, "wb") as f:
                        torch.save(plain, f)
                        if name.endswith("fsync"):
                            f.flush()
                            os.fsync(f.fileno())
                    times[name].append(time.perf_counter() - t0)
                else:
                    ckpt = Checkpointer(dir=target, interval=1, keep=1, async_save="async" in name)
                    ckpt.setup(target, 0)
                    t0 = time.perf_counter()
                    if name.endswith("(blocked)"):
                        ckpt.save(1, state, wait=False)
                        blocked = time.perf_counter() - t0
                        train_step()  # the next step's forward/backward overlaps the staging copy
                        t1 = time.perf_counter()
                        ckpt.wait_staged()  # what the loop waits for before optimizer.step()
                        blocked += time.perf_counter() - t1
                        times[name].append(blocked)
                        ckpt.close()
                    elif name.endswith("(total)"):
                        ckpt.save(1, state, wait=False)
                        ckpt.close()  # until committed
                        times[name].append(time.perf_counter() - t0)
                    else:
                        ckpt.save(1, state)
                        times[name].append(time.perf_counter() - t0)
                shutil.rmtree(target, ignore_errors=True) if os.path.isdir(target) else os.remove(target)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus | torch {torch.__version__} | "
          f"world size 1 | state {nbytes / 2**20:.0f} MiB (model+AdamW, {args.n_layer}x{args.n_embd}) | "
          f"median of {args.repeats}, alternating")
    print(f"{'configuration':32s} {'seconds':>8s} {'ratio':>8s}  vs")
    for k in ("torch.save", "torch.save+fsync", "preemptible sync", "preemptible async (total)"):
        print(f"{k:32s} {med[k]:8.3f} {med[k] / med['torch.save']:8.3f}  torch.save   (target for sync <= 1.2)")
    blocked = med["preemptible async (blocked)"]
    print(f"{'preemptible async (blocked)':32s} {blocked:8.3f} {blocked / med['preemptible sync']:8.3f}  preemptible sync"
          f"   (target <= 0.10)")


if __name__ == "__main__":
    main()
