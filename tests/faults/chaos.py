"""Random preemptions: a seeded driver that interrupts the recipe (2-4 ranks under torchrun) again
and again -- handled signals to the launcher or to one rank, SIGKILL of everything, during steps
and inside checkpoint writes, going back to an older checkpoint, a second run started on the same
directory meanwhile -- and checks after every restart and at the end that nothing was lost that
should not be, and that the result equals an uninterrupted run.

    python tests/faults/chaos.py --interruptions 24 --seed 1 [--nproc 3]   # the full run (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recipe_helpers import events, losses, rows, run, start, worker_pids_by_rank  # noqa: E402

from preemptible.checkpoint.writer import step_of, why_invalid  # noqa: E402

KINDS = ("term_launcher", "term_one_rank", "usr2_one_rank", "kill_all", "kill_in_save", "term_in_save", "go_back",
         "second_run")


def valid_steps(run_dir: Path) -> list[int]:
    ckpts = run_dir / "checkpoints"
    return sorted(step_of(p) for p in ckpts.glob("step_*") if step_of(p) is not None and why_invalid(p) is None)


def newest_valid_step(run_dir: Path) -> int:
    return max(valid_steps(run_dir), default=0)


def _last_step(run_dir: Path) -> int:
    done = losses(run_dir)
    return max(done) if done else 0


def _send(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # it finished (or died) just before: nothing left to interrupt
        pass


def _kill_tree(proc, workers) -> None:
    for pid in [proc.pid, *workers.values()]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def chaos(workdir: Path, interruptions: int, seed: int, steps: int = 150, log=print, nproc: int = 2,
          kinds: tuple = ()) -> dict:
    """`kinds`: the interruptions in this order (else drawn at random from KINDS)."""
    rng = random.Random(seed)
    common = [f"trainer.max_steps={steps}", "checkpoint.interval=7", "checkpoint.keep=3",
              "signal_handler.sig=[SIGTERM,SIGUSR2]"]
    launcher = ["--signals-to-handle=SIGTERM,SIGINT,SIGUSR2"]
    reference = workdir / "reference"
    code, out = run(reference, *common, nproc=nproc, launcher_args=launcher)
    assert code == 0, out
    target = workdir / "chaos"
    # Every save sleeps 0.3 s between writing its files and committing: a window for faults to land in.
    save_window = {"PREEMPTIBLE_FAULTS": json.dumps([{"at": "save", "sleep": 0.3}])}
    history = []
    refused = 0  # second runs refused while the first one was held alive
    while True:
        resume_expected = newest_valid_step(target) if target.exists() else 0
        started_events = len(events(target, "resumed")) if target.exists() else 0
        kind = None
        if len(history) < interruptions:
            kind = kinds[len(history)] if len(history) < len(kinds) else rng.choice(KINDS)
        extra = []
        if kind == "go_back":  # back to an older committed checkpoint (a loss spike), then interrupted
            older = valid_steps(target)[:-1] if target.exists() else []
            if older:
                resume_expected = rng.choice(older)
                extra = [f"checkpoint.resume={target / 'checkpoints' / f'step_{resume_expected:08d}'}"]
        proc = start(target, *common, *extra, nproc=nproc, env=save_window, launcher_args=launcher)
        if kind is not None:
            workers = worker_pids_by_rank(proc.pid, nproc)
            begun = _last_step(target)
            goal = begun + rng.randint(1, 25)
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                in_save = any((target / "checkpoints").glob("step_*.partial"))
                if (kind.endswith("in_save") and in_save and _last_step(target) > begun) or \
                        (not kind.endswith("in_save") and _last_step(target) >= goal):
                    break
                time.sleep(0.005)
            at_step = _last_step(target)
            if kind == "second_run" and proc.poll() is None:  # the same command again meanwhile: refused
                for pid in workers.values():  # held still, so it cannot finish while the second one starts
                    _send(pid, signal.SIGSTOP)
                code, second = run(target, *common, "ownership.wait=0", nproc=nproc, launcher_args=launcher)
                for pid in workers.values():
                    _send(pid, signal.SIGCONT)
                assert code != 0 and "in use by another run" in second, second  # the first run was held alive
                refused += 1
            kind_sent = "term_launcher" if kind == "second_run" else kind
            if kind_sent in ("kill_all", "kill_in_save"):
                _kill_tree(proc, workers)
            elif kind_sent == "term_launcher":
                _send(proc.pid, signal.SIGTERM)
            elif kind_sent in ("term_one_rank", "term_in_save", "go_back"):
                _send(workers[rng.randrange(nproc)], signal.SIGTERM)
            else:
                _send(workers[rng.randrange(nproc)], signal.SIGUSR2)
            out, _ = proc.communicate(timeout=120)
            finished = bool(events(target, "done"))
            entry = {"kind": kind, "near_step": at_step, "exit": proc.returncode, "finished": finished}
            new_stops = [e for e in events(target, "preempted") if e["time"] > history[-1]["t"]] if history else \
                events(target, "preempted")
            if kind.startswith(("term", "usr2", "go_back", "second_run")) and not finished:
                assert new_stops, f"handled {kind} near step {at_step} did not stop with a checkpoint:\n{out}"
                entry["stopped_at"] = new_stops[-1]["step"]
                assert new_stops[-1]["checkpoint"], out
            entry["t"] = time.time()
            history.append(entry)
            log(f"interruption {len(history):2d}: {kind:14s} near step {at_step:3d} -> exit {proc.returncode}"
                f"{', stopped at step %d' % entry['stopped_at'] if 'stopped_at' in entry else ''}"
                f"; newest valid checkpoint now step {newest_valid_step(target)}")
        else:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out
        resumed = events(target, "resumed")[started_events:]
        if resumed:  # the run that just ended started from the newest valid checkpoint, never a torn one
            assert resumed[0]["step"] == resume_expected, (resumed[0], resume_expected)
            assert why_invalid(Path(resumed[0]["from"])) is None or resumed[0]["step"] < newest_valid_step(target)
        if history and "stopped_at" in history[-1]:  # a handled signal loses no step
            assert newest_valid_step(target) >= history[-1]["stopped_at"]
        if events(target, "done") and len(history) >= interruptions:
            break
    done, ref = events(target, "done")[-1], events(reference, "done")[-1]
    assert done["params_sha256"] == ref["params_sha256"], (done, ref)
    assert losses(target) == losses(reference)
    kinds = {k: sum(h["kind"] == k for h in history) for k in KINDS}
    return {"interruptions": len(history), "kinds": kinds, "refused": refused, "params_sha256": done["params_sha256"],
            "restarts": len(events(target, "resumed"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interruptions", type=int, default=24)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--nproc", type=int, default=2, help="ranks (torchrun --nproc_per_node)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        summary = chaos(Path(tmp), args.interruptions, args.seed, args.steps, nproc=args.nproc)
    print(f"OK: {summary['interruptions']} interruptions {summary['kinds']}, {summary['restarts']} resumes; "
          f"final params_sha256 equals the uninterrupted run's ({summary['params_sha256'][:16]}...)")


if __name__ == "__main__":
    main()
