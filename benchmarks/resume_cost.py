"""Resume cost: finding, verifying and loading a checkpoint, against one cold read of its bytes.

    python benchmarks/resume_cost.py [--n-layer 8 --n-embd 768] [--rounds 7] [--dir PATH]

Single process, CPU. One checkpoint of the recipe's GPT and AdamW state (654 MiB at the defaults)
is written once; then each round, in a fresh random order, with the checkpoint's pages dropped
from the page cache before each:
  cold read            every file of the checkpoint read once, sequentially, 8 MiB at a time: the
                       floor of any resume that reads its bytes from disk
  resume (default)     what a Run's resume does: choose the checkpoint (sizes, markers), then load
                       it with each file's CRC-32C checked while it is read (one read of each file)
  resume, verify first the same with a verify pass before the load (every file read and summed,
                       then loaded), as resumes did before checksums were checked while loading
  load, no checksums   checkpoint.verify=false: the load alone
  the same, warm       the load alone with every page in the cache: DCP's own time (planning, and
                       a torch.load of each tensor's record), whatever the disk does
Printed: median seconds, and the median of the per-round ratios to the cold read (target: the
default <= 1.15).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint_cost import benchmark_state  # noqa: E402  (the same state as the checkpoint benchmark)
from preemptible.checkpoint.writer import Checkpointer  # noqa: E402


def drop_pages(path: Path) -> None:
    """The checkpoint's pages out of the page cache: the next read comes from the disk."""
    os.sync()
    for f in path.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_read(path: Path) -> None:
    buf = bytearray(8 << 20)
    for f in sorted(path.iterdir()):
        with open(f, "rb", buffering=0) as stream:
            while stream.readinto(buf):
                pass


def resume(cp: Checkpointer, state: dict, first: bool) -> None:
    """A Run's resume: the decision (rank 0 alone here), then the load (set-up is not timed)."""
    decision = cp.resume_path(sums_while_loading=not first)
    cp.load(decision.path, state, checksums=not first)


def checkpointer(root: str, verify: bool) -> Checkpointer:
    cp = Checkpointer(dir=root, verify=verify)
    cp.setup(root, 0)
    return cp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir under the current directory)")
    args = ap.parse_args()

    state, _ = benchmark_state(args.n_layer, args.n_embd)
    root = tempfile.mkdtemp(prefix="resume-bench-", dir=args.dir or os.getcwd())
    try:
        cp = Checkpointer(dir=root, interval=1, keep=1)
        cp.setup(root, 0)
        path = cp.save(1, state)
        cp.close()
        nbytes, nfiles = sum(f.stat().st_size for f in path.iterdir()), len(list(path.iterdir()))
        checking, trusting = checkpointer(root, True), checkpointer(root, False)
        ways = {"cold read": lambda: cold_read(path),
                "resume (default)": lambda: resume(checking, state, False),
                "resume, verify first": lambda: resume(checking, state, True),
                "load, no checksums": lambda: resume(trusting, state, False),
                "the same, warm": lambda: resume(trusting, state, False)}
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name in random.sample(list(ways), len(ways)):
                if name == "the same, warm":
                    cold_read(path)  # every page in the cache: DCP's own CPU time alone
                else:
                    drop_pages(path)
                t0 = time.perf_counter()
                ways[name]()
                times[name].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus | torch {torch.__version__} | one process | "
          f"checkpoint {nbytes / 2**20:.0f} MiB in {nfiles} files (model+AdamW, {args.n_layer}x{args.n_embd}) | {args.rounds} rounds, pages dropped before each")
    print(f"{'':22s} {'seconds':>8s} {'GB/s':>6s} {'/ cold read':>12s}")
    for name, runs in times.items():
        ratio = statistics.median(a / b for a, b in zip(runs, times["cold read"]))
        print(f"{name:22s} {statistics.median(runs):8.3f} {nbytes / statistics.median(runs) / 1e9:6.2f} "
              f"{ratio:8.3f} ({min(a / b for a, b in zip(runs, times['cold read'])):.2f}-"
              f"{max(a / b for a, b in zip(runs, times['cold read'])):.2f})")
    print("seconds: median over rounds; / cold read: median (min-max) of the ratio within each round. "
          "Target: resume (default) <= 1.15.")


if __name__ == "__main__":
    main()
