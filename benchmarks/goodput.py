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
The floor, measured in the same run between our exit and our relaunch (alternating with ours):
  floor relaunch      torchrun starting a script that imports torch, joins the process group and
                      does one all_reduce (launch -> the all_reduce done on every rank; its
                      worker: that worker's process start -> its all_reduce done)
  floor exit          TERM to that torchrun -> its exit (a bare process exit under torchrun)
  floor + deps        the same script, plus what the recipe pays that is not ours: it imports torch's
                      checkpoint package, makes a torch optimizer (which imports torch._dynamo) and
                      composes the recipe's configuration through hydra.main with the same overrides;
                      ours / this is the share of a relaunch that is the library's and the recipe's own
Printed: ours / floor for relaunch -> first resumed step, and signal -> exit against one step + the
stop's save (the `preempted` event's `save_seconds`) + the floor exit (TERM only: a KILL saves nothing),
split into signal -> the `preempted` event (the agreed stop and the save) and the teardown after it.
"""

from __future__ import annotations

import argparse
import json
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


def recipe_args(run_dir: Path, steps: int, interval: int) -> list[str]:
    return [f"run_dir={run_dir}", *MODEL, f"trainer.max_steps={steps}", f"checkpoint.interval={interval}", *EXTRA]


def launch(run_dir: Path, steps: int, interval: int, nproc: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "recipes" / "finetune.py"), *recipe_args(run_dir, steps, interval)]
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
    """Our run, interrupted every `period` s until it is done; between each exit and relaunch, one
    round of the floor (its wall time is left out of ours)."""
    run_dir = work / kind
    start, floor_wall = time.time(), 0.0
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
        if not interrupt(proc, kind):
            continue
        proc.wait()
        exited = time.time()
        floor = floor_once(work, nproc)
        deps = floor_once(work, nproc, deps=True, overrides=recipe_args(run_dir, steps, interval))
        floor = {**floor, "deps_relaunch": deps["relaunch"], "deps_worker": deps["worker"]}
        floor_wall += floor["wall"] + deps["wall"]
        before = len(rows(run_dir))
        launched = time.time()
        proc = launch(run_dir, steps, interval, nproc)
        records.append(measure_relaunch(run_dir, proc, before, launched, last_step, (sent, exited), floor))
    wall = time.time() - start - floor_wall
    done = [r for r in rows(run_dir) if r.get("event") == "done"]
    return {"wall": wall, "records": records, "done": bool(done)}


def interrupt(proc: subprocess.Popen, kind: str) -> bool:
    """TERM to the agent, or SIGKILL to one worker; False when no worker was there to kill."""
    if kind == "term":
        os.kill(proc.pid, signal.SIGTERM)
        return True
    for _ in range(100):  # the agent may still be starting them
        workers = worker_pids(proc.pid)
        if workers:
            os.kill(workers[-1], signal.SIGKILL)
            return True
        time.sleep(0.05)
    return False


def measure_relaunch(run_dir: Path, proc: subprocess.Popen, before: int, launched: float, last_step: int,
                     stopped: tuple[float, float], floor: dict) -> dict:
    """Waits for the relaunched run's resumed event and first step; one record of the interruption."""
    while True:
        new = rows(run_dir)[before:]
        resumed = next((r for r in new if r.get("event") == "resumed"), None)
        first = next((r for r in new if "event" not in r), None)
        if resumed and first or proc.poll() is not None:
            break
        time.sleep(0.05)
    old = rows(run_dir)[:before]
    stopped_at = max((r["step"] for r in old if "event" not in r), default=last_step)
    stop = next((r for r in reversed(old) if r.get("event") == "preempted"), None)
    started = resumed.get("process_started") if resumed else None
    sent, exited = stopped
    return {
        "signal_to_exit": exited - sent,
        "to_saved": stop["time"] - sent if stop else None,
        "save": stop.get("save_seconds") if stop else None,
        "teardown": exited - stop["time"] if stop else None,
        "floor_exit": floor["exit"],
        "agent": (started - launched) if started else None,
        "worker": (resumed["entered"] - started) if started else None,
        "resume": (resumed["verify_seconds"] + resumed["load_seconds"]) if resumed else None,
        "first_step": (first["time"] - resumed["time"]) if resumed and first else None,
        "relaunch_to_step": (first["time"] - launched) if first else None,
        "floor_relaunch": floor["relaunch"],
        "floor_worker": floor["worker"],
        "deps_relaunch": floor["deps_relaunch"],
        "deps_worker": floor["deps_worker"],
        "steps_lost": stopped_at - resumed["step"] if resumed else None,
    }


FLOOR = """
import json, os, sys, time
with open("/proc/self/stat") as f:  # when this process started (as the resumed event's process_started)
    ticks = int(f.read().rsplit(")", 1)[1].split()[19])
started = time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
import torch
import torch.distributed as dist
{deps}
def ready():
    dist.init_process_group("gloo")
    dist.all_reduce(torch.ones(1))
    with open(os.environ["FLOOR_OUT"], "a") as f:
        f.write(json.dumps({{"rank": dist.get_rank(), "started": started, "ready": time.time()}}) + "\\n")
    while True:
        time.sleep(0.01)
{call}
"""
# What any run of the recipe pays that is not ours: torch's checkpoint package (a resume needs it
# before its first step), the first torch optimizer (it imports torch._dynamo), and Hydra composing
# the recipe's configuration with the same overrides (through hydra.main, as the recipe does).
DEPS = """
import torch.distributed.checkpoint
import hydra
torch.optim.AdamW(torch.nn.Linear(4, 4).parameters())
"""
DEPS_CALL = """
@hydra.main(config_path={conf!r}, config_name="finetune", version_base="1.3")
def main(cfg):
    ready()
main()
"""


def floor_once(work: Path, nproc: int, deps: bool = False, overrides: tuple = ()) -> dict:
    """One relaunch and exit of the floor script under torchrun: {"relaunch": s, "worker": s, "exit": s,
    "wall": s}. `deps`: the floor plus what the recipe needs that is not ours (DEPS), composing the
    recipe's configuration with `overrides`."""
    script, out = work / f"floor{'-deps' if deps else ''}.py", work / "floor-ready.jsonl"
    script.write_text(FLOOR.format(deps=DEPS if deps else "",
                                   call=DEPS_CALL.format(conf=str(REPO / "conf")) if deps else "ready()"))
    out.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", FLOOR_OUT=str(out))
    launched = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", str(script), *(overrides if deps else ())], env=env,
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while proc.poll() is None and (not out.exists() or len(out.read_text().splitlines()) < nproc):
        time.sleep(0.01)
    if proc.poll() is not None:
        raise RuntimeError(f"the floor script {script.name} exited with {proc.returncode}")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    ready = max(line["ready"] for line in lines)
    worker = statistics.median(line["ready"] - line["started"] for line in lines)
    sent = time.time()
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait()
    exited = time.time()
    return {"relaunch": ready - launched, "worker": worker, "exit": exited - sent, "wall": exited - launched}


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
        print(f"machine: {os.uname().machine} {os.cpu_count()} cpus | torch {torch.__version__} | {args.nproc} ranks "
              f"| {' '.join(MODEL + EXTRA)} checkpoint.interval={args.interval}")
        print(f"uninterrupted: {steps} steps, {step_time * 1000:.1f} ms/step (median), {base_wall:.1f} s wall "
              f"(start-up and the final save included: goodput {steps * step_time / base_wall:.3f})\n")
        for kind in args.kinds.split(","):
            result = preempted(work, kind, steps, args.interval, args.nproc, args.period)
            print(f"{kind.upper()} every {args.period:g} s: {len(result['records'])} interruptions, "
                  f"{result['wall']:.1f} s wall (the floor's rounds left out), finished: {result['done']}; "
                  f"goodput {steps * step_time / result['wall']:.3f}")
            report(result["records"], kind, step_time)


def report(recs: list[dict], kind: str, step_time: float) -> None:
    """The two side-by-side tables of one kind of interruption, and their medians."""
    if not recs:
        return
    for r in recs:
        r["relaunch_ratio"] = r["relaunch_to_step"] / r["floor_relaunch"] if r["relaunch_to_step"] else None
        r["deps_ratio"] = r["relaunch_to_step"] / r["deps_relaunch"] if r["relaunch_to_step"] else None
        r["exit_floor"] = step_time + (r["save"] or 0.0) + r["floor_exit"]
        r["beyond_step_save"] = r["signal_to_exit"] - step_time - (r["save"] or 0.0)
    table(recs, ("agent", "worker", "resume", "first_step", "relaunch_to_step", "floor_worker", "floor_relaunch",
                 "relaunch_ratio", "steps_lost"), "relaunch -> first resumed step, against the floor's relaunch -> all_reduce done")
    if kind == "term":
        table(recs, ("signal_to_exit", "to_saved", "save", "teardown", "floor_exit", "exit_floor", "beyond_step_save"),
              f"signal -> exit, against one step ({step_time:.3f} s) + the save + the floor's exit")
    table(recs, ("relaunch_to_step", "deps_worker", "deps_relaunch", "deps_ratio"),
          "relaunch -> first resumed step, against the floor + the recipe's dependencies (DCP, an optimizer, Hydra)")
    ratios = [r["relaunch_ratio"] for r in recs if r["relaunch_ratio"]]
    print(f"  relaunch -> first step, ours / floor: median {statistics.median(ratios):.2f} "
          f"({min(ratios):.2f}-{max(ratios):.2f}; target <= 1.3)")
    ratios = [r["deps_ratio"] for r in recs if r["deps_ratio"]]
    print(f"  relaunch -> first step, ours / (floor + the recipe's dependencies): median "
          f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
    if kind == "term":
        over = [r["beyond_step_save"] for r in recs]
        ratio = [r["signal_to_exit"] / r["exit_floor"] for r in recs]
        print(f"  signal -> exit beyond one step + the save: median {statistics.median(over):.2f} s "
              f"({min(over):.2f}-{max(over):.2f}; target <= 0.5 s), of which a bare exit under torchrun takes "
              f"{statistics.median(r['floor_exit'] for r in recs):.2f} s; ours / (step + save + bare exit): "
              f"median {statistics.median(ratio):.2f}")
    lost = statistics.median([r["steps_lost"] for r in recs if r["steps_lost"] is not None] or [0])
    print(f"  steps lost per interruption: median {lost:g} ({lost * step_time:.2f} s)\n")


def table(recs: list[dict], cols: tuple, title: str) -> None:
    print(f"  {title}:")
    print("  " + " ".join(f"{c:>16}" for c in cols))
    for r in recs:
        print("  " + " ".join(f"{cell(r[c], c):>16}" for c in cols))


def cell(value, column: str) -> str:
    if value is None:
        return "-"
    return f"{value:d}" if column == "steps_lost" else f"{value:.2f}"


if __name__ == "__main__":
    main()
