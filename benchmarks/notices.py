"""What polling for notices costs the training step, and how fast a notice becomes a checkpoint.

    python benchmarks/notices.py [--rounds 30] [--steps-per-block 20] [--polls 5 0.05] [--nproc 1 2]

Cost: the reference recipe's model and AdamW step in this process, alternating block by block
between no notices and a running `Notices` poller (an AWS IMDSv2 service on 127.0.0.1 in another
process, and the stop file) at each --polls interval: the default 5 s, and 100x more often so any
cost shows. Alternating inside one run cancels this shared machine's drift. Printed: median block
time each way and the throughput ratio (target at the default: no measurable cost, >= 0.99).

Notice to checkpoint: the recipe under torchrun (--nproc ranks), an AWS notice issued at a random
step; printed: issued -> seen by the poller (<= poll_seconds), seen -> every rank agreed and the
stop's checkpoint committed (the `preempted` event's `seconds_since_notice`), and the total.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "recipes"))  # the recipe's building blocks
from metadata_servers import MetadataServer  # noqa: E402  (the notice-to-checkpoint runs)

from preemptible import Notices  # noqa: E402
from preemptible.observe.metrics import read_metrics  # noqa: E402

MODEL = ["model.n_layer=4", "model.n_head=4", "model.n_embd=64", "model.block_size=64", "data.batch_size=8",
         "data.max_bytes=1000000", "checkpoint.interval=0", "report.log_every=10", "report.param_digests=done"]


def _server_process() -> tuple[subprocess.Popen, str]:
    """An AWS metadata service in a process of its own (as the real one is: not in the trainer)."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from metadata_servers import MetadataServer; "
            "s = MetadataServer('aws').start(); print(s.url, flush=True); time.sleep(3600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(REPO / "tests")], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def step_cost(rounds: int, per_block: int, polls: list[float]) -> None:
    from finetune_parts.model import GPT

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = GPT(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=64, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (8, 64))

    def block() -> float:
        t = time.perf_counter()
        for _ in range(per_block):
            loss = model(x, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - t

    kinds = ["off"] + [f"poll {p:g}s" for p in polls]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    server, url = _server_process()
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            block()  # warm up
            for r in range(rounds):
                order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]  # rotate: no kind always first
                for kind in order:
                    notices = None
                    if kind != "off":
                        notices = Notices(cloud="aws", endpoint=url, poll_seconds=float(kind.split()[1][:-1]))
                        notices.start(run_dir, lambda n: None)
                    times[kind].append(block())
                    if notices is not None:
                        notices.stop()
    finally:
        server.kill()
    off = statistics.median(times["off"])
    print(f"step cost: {rounds} rounds x {per_block} steps per block, blocks alternating; the AWS IMDSv2 "
          f"service in another process; the stop file polled too")
    for kind in kinds:
        med = statistics.median(times[kind])
        print(f"  {kind:>12}: median block {med * 1000:7.1f} ms   throughput ratio vs off = {off / med:.3f}")


def notice_to_checkpoint(nproc: int, runs: int, poll: float) -> None:
    rows = []
    for i in range(runs):
        with MetadataServer("aws") as server, tempfile.TemporaryDirectory() as run_dir:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   str(REPO / "recipes" / "finetune.py"), f"run_dir={run_dir}", "trainer.max_steps=100000",
                   "notices.cloud=aws", f"notices.endpoint={server.url}", f"notices.poll_seconds={poll}", *MODEL]
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=dict(os.environ, OMP_NUM_THREADS="1"))
            target = random.Random(i).randint(20, 60)
            while not [r for r in read_metrics(run_dir) if r.get("step", 0) >= target and "event" not in r]:
                if proc.poll() is not None:
                    raise SystemExit(f"the run exited ({proc.returncode}) before step {target}")
                time.sleep(0.05)
            server.notify()
            proc.wait(timeout=300)
            stop = [r for r in read_metrics(run_dir) if r.get("event") == "preempted"][0]
            notice = stop["notices"]["0"]
            seen = notice["seen"] - server.noticed_at
            rows.append((seen, stop["seconds_since_notice"], proc.returncode))
    print(f"notice to checkpoint: {nproc} rank(s) under torchrun, poll every {poll:g}s, {runs} runs")
    for seen, commit, code in rows:
        print(f"  issued->seen {seen:5.2f}s  seen->committed {commit:5.2f}s  total {seen + commit:5.2f}s  "
              f"(torchrun exit {code})")
    print(f"  median: issued->seen {statistics.median(r[0] for r in rows):.2f}s, seen->committed "
          f"{statistics.median(r[1] for r in rows):.2f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps-per-block", type=int, default=20)
    ap.add_argument("--polls", type=float, nargs="+", default=[5.0, 0.05],
                    help="poll intervals for the cost measurement (5 s: the default)")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=3, help="notice-to-checkpoint runs per world size")
    ap.add_argument("--run-poll", type=float, default=1.0, help="poll interval of the recipe runs")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    step_cost(args.rounds, args.steps_per_block, args.polls)
    for n in args.nproc:
        notice_to_checkpoint(n, args.runs, args.run_poll)


if __name__ == "__main__":
    main()
