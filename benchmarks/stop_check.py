"""What the per-step stop check costs, and how fast a signal stops the reference recipe.

    python benchmarks/stop_check.py [--worlds 2 4] [--rounds 40] [--steps-per-block 10]

Throughput: N gloo ranks (spawned) run the reference recipe's training step (its GPT, data and
AdamW, under DDP) and alternate, block by block inside the same run, between five stop checks:
none; the default (pipelined MAX reduction, interval chosen for <= 1 s latency); the same every
step; the flag riding on DDP's gradient all-reduce; the documented per-step
`any(signals_received())`. Alternating inside one run cancels this shared
machine's drift, which is larger than the effect measured. Printed: median block time per check
and the throughput ratio to no check (target for the default: >= 0.99).

Latency: the recipe itself under torchrun; SIGTERM to one worker at a random moment; printed:
the step that was running at delivery, the step all ranks stopped at, steps and seconds between
(target: <= 2 steps or <= 1 s, whichever is later).
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

from preemptible.observe.metrics import read_metrics

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))  # the recipe's building blocks
MODEL = ["model.n_layer=6", "model.n_head=4", "model.n_embd=64", "model.block_size=64", "data.batch_size=8",
         "data.max_bytes=1000000", "model.dropout=0.0", "checkpoint.interval=0", "report.log_every=50"]


def command(run_dir: Path, world: int, steps: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
            str(REPO / "recipes" / "finetune.py"), f"run_dir={run_dir}", f"trainer.max_steps={steps}",
            *MODEL, *extra]


def rows(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl")


def _rank_main(rank: int, world: int, port: int, rounds: int, per_block: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from preemptible import DistributedSignalHandler
    from finetune_parts.data import make_batches
    from finetune_parts.model import GPT

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shape = dict(block_size=64, n_layer=6, n_head=4, n_embd=64, dropout=0.0)

    def replica(hooked: bool):
        torch.manual_seed(0)
        model = DistributedDataParallel(GPT(**shape))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    plain, flagged = replica(False), replica(True)
    batches = make_batches(rank, world, seed=0, block_size=64, max_bytes=1_000_000, batch_size=8)
    flag_handler = DistributedSignalHandler("SIGUSR2").__enter__()
    flag_handler.ride_on_gradients(flagged[0])
    every_step = DistributedSignalHandler("SIGUSR1", escalate=False, check_every=1).__enter__()
    default = DistributedSignalHandler("SIGHUP", escalate=False, check_every="auto", max_latency=1.0).__enter__()
    configs = {
        "no check": (plain, lambda: False),
        "default: pipelined MAX, check_every=auto": (plain, default.should_stop),
        "pipelined MAX every step (check_every=1)": (plain, every_step.should_stop),
        "flag on the gradient all-reduce": (flagged, flag_handler.should_stop),
        "documented all_gather every step": (plain, lambda: any(every_step.signals_received())),
    }

    def step(model, optimizer, check):
        x, y = next(batches)
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return check()

    for (model, optimizer), check in configs.values():  # warm up every path
        for _ in range(5):
            step(model, optimizer, check)
    times: dict[str, list[float]] = {name: [] for name in configs}
    order = list(configs)
    shuffle = random.Random(0)  # the same order on every rank
    for _ in range(rounds):
        shuffle.shuffle(order)  # a fresh order each round: no check always follows the same one
        for name in order:
            (model, optimizer), check = configs[name]
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(per_block):
                step(model, optimizer, check)
            times[name].append((time.perf_counter() - t0) / per_block)
    intervals = default.check_interval
    for h in (default, every_step, flag_handler):
        h.release()
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "auto_every": intervals}))
    dist.barrier()
    del configs, plain, flagged  # DDP reducers go before their process group
    dist.destroy_process_group()


def throughput(worlds: list[int], rounds: int, per_block: int, root: Path) -> None:
    import torch.multiprocessing as mp

    for world in worlds:
        out = root / f"times-{world}.json"
        with socket_port() as port:
            mp.start_processes(_rank_main, args=(world, port, rounds, per_block, str(out)), nprocs=world,
                               start_method="spawn")
        result = json.loads(out.read_text())
        times = result["times"]
        base = times["no check"]
        print(f"\nworld size {world}: {rounds} rounds; each round runs every check for a block of {per_block} steps, "
              f"in a fresh random order; ratio = median over rounds of (no-check block time / this check's block "
              f"time in the same round); check_every=auto settled on every {result['auto_every']} steps")
        print(f"  {'stop check':44s} {'ms/step':>8s} {'throughput ratio':>17s}")
        for name, values in times.items():
            ratio = statistics.median(b / v for b, v in zip(base, values))
            print(f"  {name:44s} {statistics.median(values) * 1e3:8.2f} {ratio:17.3f}")


class socket_port:
    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        return None


def latency(worlds: list[int], repeats: int, root: Path) -> None:
    print("\nstop latency, default settings: SIGTERM to the last rank's worker at a random moment")
    print(f"  {'world':>5s} {'delivered in step':>18s} {'stopped at':>10s} {'steps after':>11s} {'seconds after':>13s}")
    rng = random.Random(0)
    for world in worlds:
        for rep in range(repeats):
            run_dir = root / f"lat-w{world}-{rep}"
            log = root / f"lat-w{world}-{rep}.log"
            with open(log, "w") as out:
                proc = subprocess.Popen(command(run_dir, world, 100000, ["report.log_every=1"]), cwd=REPO,
                                        stdout=out, stderr=subprocess.STDOUT)
            wait_steps = rng.randint(30, 80)
            deadline = time.monotonic() + 300
            while not any(r.get("step", 0) >= wait_steps for r in rows(run_dir) if "event" not in r):
                if proc.poll() is not None or time.monotonic() > deadline:  # never wait on a run that ended
                    proc.kill()
                    raise SystemExit(f"the run ended ({proc.poll()}) before step {wait_steps}:\n{log.read_text()[-3000:]}")
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
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--steps-per-block", type=int, default=10)
    ap.add_argument("--latency-runs", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus | torch {torch.__version__} | "
          f"backend {'nccl' if torch.cuda.is_available() else 'gloo'} | DDP | model: {' '.join(MODEL)}")
    with tempfile.TemporaryDirectory(prefix="stop-bench-") as tmp:
        throughput(args.worlds, args.rounds, args.steps_per_block, Path(tmp))
        latency(args.worlds, args.latency_runs, Path(tmp))


if __name__ == "__main__":
    main()
