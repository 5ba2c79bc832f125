"""A suspended job is not a hung one: SIGSTOP, then SIGCONT later (as SLURM's `scontrol suspend`,
gang scheduling, a paused VM or container, a debugger do), for longer than the watchdog's timeout.
The watchdog's own thread was stopped too, so it knows the span was a suspension: the run carries
on and ends bit-identical to one never stopped (docs/hangs.md, "A suspension")."""

import json
import os
import signal
import time

import pytest

from conftest import REFERENCE_STEPS
from recipe_helpers import children, events, losses, lrs, start, wait_for_step

pytestmark = pytest.mark.slow
STEPS = REFERENCE_STEPS
# Steps of ~50 ms (a sleep: the numbers are the reference's), so the stop lands mid-run.
SLOW_STEPS = {"PREEMPTIBLE_FAULTS": json.dumps([{"at": "step", "sleep": 0.05}])}
TIMEOUT = 3  # the watchdog's; the suspension lasts 8 s


def tree(pid):
    """`pid` and every process below it (torchrun's workers run in sessions of their own, so a
    process group does not reach them; SLURM stops a job's processes by tracking them too)."""
    found = [pid]
    for child in children(pid):
        found += tree(child)
    return found


def suspend(pid, seconds):
    pids = tree(pid)
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    time.sleep(seconds)
    for p in pids:
        os.kill(p, signal.SIGCONT)
    return pids


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_process_or_a_whole_torchrun_job_stopped_past_the_timeout_carries_on(tmp_path, reference, nproc):
    """nproc=1: the one process is stopped; nproc=2: torchrun's agent and both workers (every
    process of the job, as SLURM stops a job)."""
    proc = start(tmp_path, f"trainer.max_steps={STEPS}", f"watchdog.timeout={TIMEOUT}", nproc=nproc, env=SLOW_STEPS)
    try:
        wait_for_step(tmp_path, 8, proc)
        stopped = suspend(proc.pid, 8.0)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert len(stopped) == (1 if nproc == 1 else 1 + nproc)  # the agent too
    assert not events(tmp_path, "hung"), out[-3000:]
    seen = [line for line in out.splitlines() if "this process was stopped for" in line]
    assert len(seen) == nproc and all(float(line.split("stopped for ")[1].split("s")[0]) >= 7 for line in seen), out
    done, ref = events(tmp_path, "done"), events(reference[nproc], "done")
    assert done[-1]["params_sha256"] == ref[-1]["params_sha256"]
    assert losses(tmp_path) == losses(reference[nproc]) and lrs(tmp_path) == lrs(reference[nproc])
    assert len(events(tmp_path, "resumed")) == 0  # one process from start to end: nothing was restarted
