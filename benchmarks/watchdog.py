"""What the watchdog costs a training loop: throughput with it on against off, in one run.

    python benchmarks/watchdog.py [--world 2] [--rounds 12] [--steps 30] [--control] [--blocks]

N gloo ranks (spawned) run the reference recipe's GPT under DDP inside `preemptible.Run` loops.
Each round makes two Runs one after the other, one with `Watchdog(timeout=10)` (its thread polls
every second, each rank writes its beat file, the progress clock is read) and one without, in an
order that alternates by round, and times their steps after the first (the start, the resume and
the last save are not the loop's throughput). Printed: the median step time of each, and the
median over rounds of off / on (target: >= 0.99). --control runs both halves without it: what
the method itself reads when nothing differs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))  # the recipe's building blocks


def _setup(rank: int, world: int, port: int):
    """The process group, the recipe's GPT under DDP, AdamW and the recipe's batches, for one rank."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from finetune_parts.data import make_batches
    from finetune_parts.model import GPT

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DistributedDataParallel(GPT(block_size=64, n_layer=6, n_head=4, n_embd=64, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, make_batches(rank, world, seed=0, block_size=64, max_bytes=1_000_000, batch_size=8)


def _rank_main(rank: int, world: int, port: int, rounds: int, steps: int, root: str, control: bool) -> None:
    import torch.distributed as dist

    import preemptible

    model, opt, batches = _setup(rank, world, port)
    times: dict[str, list[float]] = {"off": [], "on": []}
    cpu: list[float] = []   # CPU seconds of each watchdog thread
    wall: list[float] = []  # seconds each lived
    for r in range(rounds + 1):  # round 0 warms both paths up
        for mode in (("on", "off") if r % 2 else ("off", "on")):
            run = preemptible.Run(Path(root) / f"{r}-{mode}", model=model, optimizer=opt, data=batches,
                                  max_steps=steps, checkpoint=preemptible.Checkpointer(interval=0, resume="never"),
                                  stopping=preemptible.Stopping(notices=None, slurm_time_limit=False),
                                  watchdog=preemptible.Watchdog(timeout=10) if mode == "on" and not control else None)
            with run:
                run._entered_at_monotonic = time.perf_counter()
                t0 = None
                for x, y in run.batches():
                    loss = model(x, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    run.step_done(loss=loss)
                    if t0 is None:
                        t0 = time.perf_counter()
                elapsed = (time.perf_counter() - t0) / (steps - 1)
                if r and run._watcher is not None:  # the watchdog thread's own CPU time, from /proc
                    stat = Path(f"/proc/self/task/{run._watcher._thread.native_id}/stat").read_text()
                    ticks = sum(int(v) for v in stat.rsplit(")", 1)[1].split()[11:13])
                    cpu.append(ticks / os.sysconf("SC_CLK_TCK"))
                    wall.append(time.perf_counter() - run._entered_at_monotonic)
            if r:
                times[mode].append(elapsed)
    if rank == 0:
        (Path(root) / "times.json").write_text(json.dumps({**times, "cpu": [sum(cpu)], "wall": [sum(wall)]}))
    dist.barrier()
    del model
    dist.destroy_process_group()


def _blocks_main(rank: int, world: int, port: int, rounds: int, steps: int, root: str, control: bool) -> None:
    """One Run with a watchdog; its thread is stopped and started again between blocks of steps, so
    the two halves differ in the thread alone (the progress clock is written either way)."""
    import torch.distributed as dist

    import preemptible
    from preemptible.stopping.watchdog import Watcher

    model, opt, batches = _setup(rank, world, port)
    run = preemptible.Run(Path(root) / "blocks", model=model, optimizer=opt, data=batches,
                          max_steps=(2 * rounds + 2) * steps + 1,
                          checkpoint=preemptible.Checkpointer(interval=0, resume="never"),
                          stopping=preemptible.Stopping(notices=None, slurm_time_limit=False),
                          watchdog=preemptible.Watchdog(timeout=10))
    times: dict[str, list[float]] = {"off": [], "on": []}
    with run:
        order = [m for r in range(rounds + 1) for m in (("on", "off") if r % 2 else ("off", "on"))]
        it = iter(run.batches())
        for i, mode in enumerate(order):
            running = run._watcher._thread is not None
            if (mode == "on" and not control) != running:
                if running:
                    run._watcher.stop()
                else:
                    run._watcher = Watcher(run.watchdog, run._ender, run.world_size, run._save_seconds).start()
                    run._watcher.arm()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                x, y = next(it)
                loss = model(x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                run.step_done(loss=loss)
            if i >= 2:  # round 0 warms up
                times[mode].append((time.perf_counter() - t0) / steps)
        for _ in it:
            run.step_done()
    if rank == 0:
        (Path(root) / "times.json").write_text(json.dumps({**times, "cpu": [0.0], "wall": [1.0]}))
    dist.barrier()
    del model
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--control", action="store_true", help="both halves without the watchdog: the method's own bias")
    ap.add_argument("--blocks", action="store_true", help="one Run; the watchdog's thread stopped and started "
                    "between blocks of --steps steps (--rounds pairs of blocks): the tighter comparison")
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as root:
        mp.start_processes(_blocks_main if a.blocks else _rank_main, args=(a.world, port, a.rounds, a.steps, root, a.control), nprocs=a.world,
                           start_method="spawn")
        times = json.loads((Path(root) / "times.json").read_text())
    ratios = [off / on for off, on in zip(times["off"], times["on"])]
    what = (f"one Run, {a.rounds} rounds of two blocks x {a.steps} steps (the thread stopped / started between "
            "blocks)" if a.blocks else f"{a.rounds} rounds of two Runs x {a.steps} steps")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; {a.world} gloo ranks, DDP, "
          f"the recipe's GPT (6 layers, 64 wide); {what}, order alternating")
    if a.control:
        print("CONTROL: the 'on' half runs without the watchdog too")
    print("| watchdog | median step (ms) |")
    print("|---|---|")
    for mode in ("off", "on"):
        print(f"| {mode} | {1000 * statistics.median(times[mode]):.2f} |")
    if not a.control and not a.blocks:
        print(f"the watchdog threads' own CPU time (rank 0, /proc): {times['cpu'][0]:.3f} s over {times['wall'][0]:.1f} s "
              f"of training ({100 * times['cpu'][0] / times['wall'][0]:.3f} %; the clock's resolution is 0.01 s)")
    print(f"throughput on / off: median over rounds {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}); target >= 0.99")


if __name__ == "__main__":
    main()
