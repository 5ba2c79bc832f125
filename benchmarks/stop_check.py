"""What the per-step stop check costs in the reference recipe, and how fast a signal stops it.

    python benchmarks/stop_check.py [--worlds 2 4] [--repeats 5] [--steps 200]

Runs `recipes/finetune.py` under torchrun (DDP, gloo on CPU; NCCL on GPU) with each stop check,
configurations alternating within each repeat, and prints per world size the median step time
and the throughput ratio to no check at all (target for the default: >= 0.99), beside the
documented per-step `any(signals_received())`. Then sends SIGTERM to one worker mid-run and
prints how many steps and seconds after delivery every rank stopped (target: <= 2 steps or
<= 1 s, whichever is later).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = ["model.n_layer=6", "model.n_head=4", "model.n_embd=64", "model.block_size=64", "data.batch_size=8",
         "data.max_bytes=1000000", "model.dropout=0.0", "checkpoint.interval=0", "trainer.log_every=50"]
CONFIGS = {
    "no check (signal_handler=null)": ["signal_handler=null"],
    "default (stop_check=auto)": [],
    "pipelined MAX (stop_check=reduce)": ["trainer.stop_check=reduce"],
    "documented all_gather per step": ["trainer.stop_check=all_gather"],
}


def command(run_dir: Path, world: int, steps: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
            str(REPO / "recipes" / "finetune.py"), f"hydra.run.dir={run_dir}", f"trainer.max_steps={steps}",
            *MODEL, *extra]


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def step_times(run_dir: Path, skip: int = 20) -> list[float]:
    t = [r["time"] for r in rows(run_dir) if "event" not in r]
    return [b - a for a, b in zip(t[skip:], t[skip + 1:])]


def throughput(worlds: list[int], repeats: int, steps: int, root: Path) -> None:
    for world in worlds:
        per_run: dict[str, list[float]] = {name: [] for name in CONFIGS}
        for rep in range(repeats):
            for name, extra in CONFIGS.items():
                run_dir = root / f"w{world}-r{rep}-{len(per_run[name])}-{abs(hash(name))}"
                subprocess.run(command(run_dir, world, steps, extra), check=True, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                per_run[name].append(statistics.median(step_times(run_dir)))
        base = per_run["no check (signal_handler=null)"]
        print(f"\nworld size {world}: {repeats} repeats x {steps} steps (first 20 skipped); ratio = median over "
              "repeats of (no-check step time / this step time), runs of one repeat adjacent")
        print(f"  {'stop check':38s} {'ms/step':>8s} {'throughput ratio':>17s} {'per repeat':>s}")
        for name, values in per_run.items():
            ratios = [b / v for b, v in zip(base, values)]
            print(f"  {name:38s} {statistics.median(values) * 1e3:8.2f} {statistics.median(ratios):17.3f} "
                  f"  {' '.join(f'{r:.3f}' for r in ratios)}")


def latency(worlds: list[int], repeats: int, root: Path) -> None:
    print("\nstop latency, default settings: SIGTERM to the last rank's worker at a random moment")
    print(f"  {'world':>5s} {'delivered in step':>18s} {'stopped at':>10s} {'steps after':>11s} {'seconds after':>13s}")
    rng = random.Random(0)
    for world in worlds:
        for rep in range(repeats):
            run_dir = root / f"lat-w{world}-{rep}"
            proc = subprocess.Popen(command(run_dir, world, 100000, ["trainer.log_every=1"]), cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_steps = rng.randint(30, 80)
            while not any(r.get("step", 0) >= wait_steps for r in rows(run_dir) if "event" not in r):
                time.sleep(0.01)
            time.sleep(rng.random() * 0.05)
            worker = _worker_of_rank(proc.pid, world - 1)
            sent = time.time()
            os.kill(worker, signal.SIGTERM)
            proc.wait(timeout=120)
            steps = {r["step"]: r["time"] for r in rows(run_dir) if "event" not in r}
            stop = next(r for r in rows(run_dir) if r.get("event") == "preempted")["step"]
            during = min(s for s, t in steps.items() if t >= sent)  # the step running at delivery
            print(f"  {world:5d} {during:18d} {stop:10d} {stop - during:11d} {steps[stop] - sent:13.3f}")


def _worker_of_rank(agent: int, rank: int) -> int:
    while True:
        for task in Path(f"/proc/{agent}/task").iterdir():
            for child in (task / "children").read_text().split():
                try:
                    env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in env:
                    return int(child)
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus | torch {torch.__version__} | "
          f"backend {'nccl' if torch.cuda.is_available() else 'gloo'} | DDP | model: {' '.join(MODEL)}")
    with tempfile.TemporaryDirectory(prefix="stop-bench-", dir=REPO) as tmp:
        throughput(args.worlds, args.repeats, args.steps, Path(tmp))
        latency(args.worlds, 3, Path(tmp))


if __name__ == "__main__":
    main()
