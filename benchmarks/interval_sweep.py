"""Save intervals under random SIGKILLs: `checkpoint.interval=auto` against a sweep of fixed ones.

    python benchmarks/interval_sweep.py [--every 60] [--minutes 3] [--rounds 2] [--seed 0] [--factors 0.25,0.5,1,2,4]

The recipe, one process on the CPU, a model whose save costs the loop a noticeable time. A probe
run measures the step time and what a save adds to its step; the sweep's fixed intervals are
`--factors` times Daly's interval for those costs and one interruption every `--every` s. Each
round draws one schedule of SIGKILLs (no warning: exponential gaps, mean `--every` s, counted in
wall time from the configuration's start, start-ups included) and runs every configuration
through that same schedule, in a fresh random order, each from an empty run directory until it
has done the round's steps (`--minutes` of uninterrupted work), relaunched at once after each kill.

Printed per configuration: wall time summed over rounds, goodput = steps x the uninterrupted step
time / wall, kills, steps done again, and goodput / the best fixed interval's (target for auto:
>= 0.98). `auto` learns the interruption rate from its own run directory's history (the default);
`auto, told` is given `checkpoint.interrupt_every=<--every>`.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from preemptible.checkpoint.interval import daly
from preemptible.observe.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
MODEL = ["model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.block_size=64", "data.batch_size=8",
         "data.max_bytes=1000000", "report.log_every=50", "report.param_digests=false", "watchdog=none",
         "checkpoint.keep=2"]


def launch(run_dir: Path, steps: int, interval, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "recipes" / "finetune.py"), f"run_dir={run_dir}", *MODEL,
           f"trainer.max_steps={steps}", f"checkpoint.interval={interval}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def step_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [r for r in read_metrics(path) if "event" not in r] if path.exists() else []


def probe(work: Path, steps: int = 120, interval: int = 30) -> tuple[float, float]:
    """(seconds per step, seconds a periodic save adds to its step), from one uninterrupted run."""
    run_dir = work / "probe"
    assert launch(run_dir, steps, interval, []).wait() == 0, "the probe run failed"
    rows = step_rows(run_dir)
    gaps = {b["step"]: b["time"] - a["time"] for a, b in zip(rows, rows[1:]) if b["step"] == a["step"] + 1}
    plain = statistics.median(g for s, g in gaps.items() if (s - 1) % interval)
    saving = [g for s, g in gaps.items() if (s - 1) % interval == 0 and s > 1]  # the step after a save
    return plain, statistics.median(saving) - plain if saving else 0.0


def through_schedule(run_dir: Path, steps: int, interval, extra: list[str], kills: list[float]) -> dict:
    """Runs one configuration until its steps are done, SIGKILLing it at the schedule's times."""
    start = time.time()
    pending = list(kills)
    proc, killed = launch(run_dir, steps, interval, extra), 0
    while True:
        now = time.time() - start
        if proc.poll() is not None:
            if proc.returncode != 0:
                raise RuntimeError(f"{run_dir.name}: the recipe exited with {proc.returncode}")
            break
        if pending and now >= pending[0]:
            pending.pop(0)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed += 1
            proc = launch(run_dir, steps, interval, extra)
            continue
        time.sleep(0.02)
    wall = time.time() - start
    rows = read_metrics(run_dir / "metrics.jsonl")
    redone = sum(r.get("redone", 0) for r in rows if r.get("event") == "killed")
    chosen = sorted({r["interval_steps"] for r in rows if r.get("event") == "interval"})
    return {"wall": wall, "kills": killed, "redone": redone, "chosen": chosen}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=float, default=60.0, help="mean seconds between SIGKILLs")
    ap.add_argument("--minutes", type=float, default=3.0, help="uninterrupted minutes of work per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--factors", default="0.25,0.5,1,2,4",
                    help="the fixed intervals, as multiples of Daly's interval for the probe's costs")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="interval-sweep-", dir=os.getcwd()) as tmp:
        work = Path(tmp)
        step, cost = probe(work)
        tau = daly(cost, args.every)
        steps = int(args.minutes * 60 / step)
        base = max(1, round(tau / step))
        configs = {f"fixed {f:g}x ({max(1, round(base * f))} steps)": (max(1, round(base * f)), [])
                   for f in (float(x) for x in args.factors.split(","))}
        configs["auto"] = ("auto", [])
        configs["auto, told"] = ("auto", [f"checkpoint.interrupt_every={args.every:g}"])
        print(f"machine: {os.uname().machine} {os.cpu_count()} cpus | recipe, one process | {' '.join(MODEL)}")
        print(f"probe: {step * 1000:.1f} ms/step, a save adds {cost:.3f} s; Daly's interval for a SIGKILL every "
              f"{args.every:g} s: {tau:.1f} s = {base} steps | {steps} steps per round, {args.rounds} rounds\n")
        results: dict[str, list[dict]] = {name: [] for name in configs}
        rng = random.Random(args.seed)
        for r in range(args.rounds):
            horizon, kills = 0.0, []
            while horizon < 20 * args.minutes * 60:  # more kill times than any configuration needs
                horizon += rng.expovariate(1 / args.every)
                kills.append(horizon)
            for name in rng.sample(list(configs), len(configs)):
                interval, extra = configs[name]
                run_dir = work / f"round{r}-config{list(configs).index(name)}"
                out = through_schedule(run_dir, steps, interval, extra, kills)
                results[name].append(out)
                print(f"  round {r + 1}: {name:28s} {out['wall']:7.1f} s, {out['kills']} kills, "
                      f"{out['redone']} steps redone{', chose ' + str(out['chosen']) if out['chosen'] else ''}",
                      flush=True)
        report(results, steps, step)


def report(results: dict, steps: int, step: float) -> None:
    goodput = {name: len(runs) * steps * step / sum(o["wall"] for o in runs) for name, runs in results.items()}
    best = max(v for k, v in goodput.items() if k.startswith("fixed"))
    print(f"\n{'configuration':30s} {'wall (s)':>9s} {'kills':>6s} {'redone':>7s} {'goodput':>8s} {'/ best fixed':>13s}")
    for name, runs in results.items():
        print(f"{name:30s} {sum(o['wall'] for o in runs):9.1f} {sum(o['kills'] for o in runs):6d} "
              f"{sum(o['redone'] for o in runs):7d} {goodput[name]:8.3f} {goodput[name] / best:13.3f}")
    print("goodput: steps x the probe's step time / wall time, summed over rounds. Target: auto / best fixed >= 0.98.")


if __name__ == "__main__":
    main()
