"""Goodput: what a preemption costs. The recipe under torchrun, preempted on a schedule until it has
done N steps; printed: goodput = N x the uninterrupted step time / total wall time, and where each
interruption's time went.

    python benchmarks/goodput.py                      # TERM every 60 s of wall time, then SIGKILL every 60 s
    python benchmarks/goodput.py --period 30 --kinds term

Per interruption:
  signal -> exit      TERM to torchrun (what Kubernetes does to the pod's first process): the agreed
                      stop, the save, every worker's exit, torchrun's exit. KILL: one worker SIGKILLed
                      (a lost node), torchrun tearing the others down.
  relaunch -> step    the same command again until its first resumed step, split into
                        agent:  torchrun's own start (its imports, rendezvous, spawning workers)
                        worker: a worker's interpreter, imports, process group, model/data/config build
                        resume: finding, verifying (CRC-32C) and loading the checkpoint
                        first step: from the loaded checkpoint to the end of the first step
  steps lost          steps done after the last checkpoint, done again (KILL only; a TERM saves first)
A bare `python -c "import torch"` is timed in the same run, for scale: this machine's speed drifts.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from preemptible.observe.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
MODEL = ["model.n_layer=4", "model.n_head=4", "model.n_embd=64", "model.block_size=64", "data.batch_size=8",
         "data.max_bytes=1000000", "report.log_every=10", "report.param_digests=done"]


def rows(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl")


EXTRA: list[str] = []  # --override


def launch(run_dir: Path, steps: int, interval: int, nproc: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "recipes" / "finetune.py"), f"run_dir={run_dir}", *MODEL, f"trainer.max_steps={steps}",
           f"checkpoint.interval={interval}", *EXTRA]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def worker_pids(agent: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{agent}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def baseline(work: Path, steps: int, interval: int, nproc: int) -> tuple[float, float]:
    run_dir = work / "baseline"
    start = time.time()
    proc = launch(run_dir, steps, interval, nproc)
    proc.wait()
    wall = time.time() - start
    times = [r["time"] for r in rows(run_dir) if "event" not in r]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    return statistics.median(gaps), wall


def preempted(work: Path, kind: str, steps: int, interval: int, nproc: int, period: float) -> dict:
    run_dir = work / kind
    start = time.time()
    records = []
    launched = time.time()
    proc = launch(run_dir, steps, interval, nproc)
    while True:
        deadline = launched + period
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if proc.poll() is not None:
            break  # finished
        last_step = max((r["step"] for r in rows(run_dir) if "event" not in r), default=0)
        sent = time.time()
        if kind == "term":
            os.kill(proc.pid, signal.SIGTERM)
        else:
            workers = []
            for _ in range(100):  # the agent may still be starting them
                workers = worker_pids(proc.pid)
                if workers:
                    break
                time.sleep(0.05)
            if not workers:
                continue
            os.kill(workers[-1], signal.SIGKILL)
        proc.wait()
        exited = time.time()
        before = len(rows(run_dir))
        launched = time.time()
        proc = launch(run_dir, steps, interval, nproc)
        # the new process's resumed event and first step
        while True:
            new = rows(run_dir)[before:]
            resumed = next((r for r in new if r.get("event") == "resumed"), None)
            first = next((r for r in new if "event" not in r), None)
            if resumed and first or proc.poll() is not None:
                break
            time.sleep(0.05)
        stopped_at = max((r["step"] for r in rows(run_dir)[:before] if "event" not in r), default=last_step)
        records.append({
            "signal_to_exit": exited - sent,
            "agent": (resumed["process_started"] - launched) if resumed and resumed.get("process_started") else None,
            "worker": (resumed["entered"] - resumed["process_started"]) if resumed and resumed.get("process_started")
            else None,
            "resume": (resumed["verify_seconds"] + resumed["load_seconds"]) if resumed else None,
            "first_step": (first["time"] - resumed["time"]) if resumed and first else None,
            "relaunch_to_step": (first["time"] - launched) if first else None,
            "steps_lost": stopped_at - resumed["step"] if resumed else None,
        })
    wall = time.time() - start
    done = [r for r in rows(run_dir) if r.get("event") == "done"]
    return {"wall": wall, "records": records, "done": bool(done)}


def bare_import_torch() -> float:
    t = time.time()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.time() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=0, help="steps to do (default: --periods periods of work)")
    parser.add_argument("--periods", type=float, default=4, help="periods of uninterrupted work (when --steps is 0)")
    parser.add_argument("--period", type=float, default=60.0, help="seconds of wall time between preemptions")
    parser.add_argument("--interval", type=int, default=100, help="checkpoint.interval")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--kinds", default="term,kill")
    parser.add_argument("--override", action="append", default=[], help="a recipe override (repeatable), "
                        "e.g. trainer.device=cpu")
    args = parser.parse_args()
    EXTRA.extend(args.override)

    import torch

    with tempfile.TemporaryDirectory(prefix="goodput-") as tmp:
        work = Path(tmp)
        probe, _ = baseline(work / "probe", 60, 0, args.nproc)
        steps = args.steps or int(args.periods * args.period / probe)
        step_time, base_wall = baseline(work, steps, args.interval, args.nproc)
        imports = [bare_import_torch() for _ in range(3)]
        print(f"machine: {os.uname().machine} {os.cpu_count()} cpus | torch {torch.__version__} | {args.nproc} ranks "
              f"| {' '.join(MODEL + EXTRA)} checkpoint.interval={args.interval}")
        print(f"uninterrupted: {steps} steps, {step_time * 1000:.1f} ms/step (median), {base_wall:.1f} s wall "
              f"(start-up and the final save included: goodput {steps * step_time / base_wall:.3f})")
        print(f"bare `python -c 'import torch'`: {statistics.median(imports):.2f} s (median of 3)\n")
        for kind in args.kinds.split(","):
            result = preempted(work, kind, steps, args.interval, args.nproc, args.period)
            recs = result["records"]
            print(f"{kind.upper()} every {args.period:g} s: {len(recs)} interruptions, {result['wall']:.1f} s wall, "
                  f"finished: {result['done']}; goodput {steps * step_time / result['wall']:.3f}")
            cols = ("signal_to_exit", "agent", "worker", "resume", "first_step", "relaunch_to_step", "steps_lost")
            print("  " + " ".join(f"{c:>16}" for c in cols) + "   per preemption")
            for r in recs:
                cells = [("-" if r[c] is None else (f"{r[c]:d}" if c == "steps_lost" else f"{r[c]:.2f}")) for c in cols]
                per = (r["signal_to_exit"] + r["relaunch_to_step"]) if r["relaunch_to_step"] is not None else None
                print("  " + " ".join(f"{c:>16}" for c in cells) + f"   {per:.2f} s" if per else "")
            if recs:
                med = {c: statistics.median([r[c] for r in recs if r[c] is not None] or [0]) for c in cols}
                print("  median " + " ".join(f"{med[c]:>9.2f}" for c in cols) +
                      f"   {med['signal_to_exit'] + med['relaunch_to_step']:.2f} s per preemption "
                      f"(+ {med['steps_lost'] * step_time:.2f} s of steps lost)\n")


if __name__ == "__main__":
    main()
