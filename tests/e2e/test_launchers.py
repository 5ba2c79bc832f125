"""How torchrun and Kubernetes deliver the signal, reproduced locally with real processes."""

import os
import signal
import time

import pytest

from pathlib import Path

from preemptible.checkpoint.layout import why_invalid
from recipe_helpers import events, losses, run, start, wait_for_step, worker_pids_by_rank

pytestmark = pytest.mark.slow
STEPS = "trainer.max_steps=400"


def _stop(proc, timeout=60):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def assert_every_worker_exits(log, status):
    """Each rank's own last line: the status the README promises (torchrun's own exit is its own)."""
    for rank in (0, 1):
        assert f"[rank {rank}][preemptible][INFO] - exiting with status {status}" in log, log[-3000:]


def test_sigterm_to_the_torchrun_agent(tmp_path):
    """torchrun forwards TERM to its workers, then SIGKILLs after --shutdown-timeout: save inside it."""
    proc = start(tmp_path, STEPS, nproc=2)
    wait_for_step(tmp_path, 15, proc)
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    code, log = _stop(proc)
    assert time.monotonic() - sent < 30, "workers outlived torchrun's default shutdown timeout"
    stop = events(tmp_path, "preempted")[0]
    assert stop["signal"] == "SIGTERM" and stop["checkpoint"], log
    assert set(stop["ranks"]) == {"0", "1"}
    assert_every_worker_exits(log, 143)
    code, log = run(tmp_path, STEPS, nproc=2)
    assert code == 0 and events(tmp_path, "resumed")[0]["step"] == stop["step"], log


def test_usr2_through_torchrun_signals_to_handle(tmp_path):
    proc = start(tmp_path, STEPS, "signal_handler.sig=SIGUSR2", nproc=2,
                 launcher_args=["--signals-to-handle=SIGTERM,SIGINT,SIGUSR2"])
    wait_for_step(tmp_path, 15, proc)
    os.kill(proc.pid, signal.SIGUSR2)
    code, log = _stop(proc)
    stop = events(tmp_path, "preempted")
    assert stop and stop[0]["signal"] == "SIGUSR2", log
    assert set(stop[0]["ranks"]) == {"0", "1"} and why_invalid(Path(stop[0]["checkpoint"]), verify=True) is None, log
    assert_every_worker_exits(log, 140)


def test_kubernetes_style_term_to_every_process_at_once(tmp_path):
    """Agent and workers all get TERM at once, then each worker gets torchrun's forwarded TERM
    too: the twin delivery must not count as a second signal (no escalation, a clean save)."""
    proc = start(tmp_path, STEPS, nproc=2)
    workers = list(worker_pids_by_rank(proc.pid, 2).values())
    wait_for_step(tmp_path, 15, proc)
    for pid in [proc.pid, *workers]:
        os.kill(pid, signal.SIGTERM)
    code, log = _stop(proc)
    assert "received again" not in log, log
    stop = events(tmp_path, "preempted")[0]
    assert set(stop["ranks"]) == {"0", "1"} and why_invalid(Path(stop["checkpoint"]), verify=True) is None, log
    assert_every_worker_exits(log, 143)


def test_grace_period_too_short_for_a_save_that_a_requeue_must_follow_skips_it_and_says_so(tmp_path):
    """A save that may not fit is tried anyway (a cut-off one commits nothing), except where a
    requeue must follow it: a job killed mid-save would not be requeued."""
    code, log = run(tmp_path, "trainer.max_steps=20", "checkpoint.interval=10")
    assert code == 0
    proc = start(tmp_path, STEPS, "checkpoint.interval=0", "stopping.grace_period=0.5", "stopping.save_guess=30",
                 "stopping.requeue=true")
    wait_for_step(tmp_path, 30, proc)  # resumed at 20
    os.kill(proc.pid, signal.SIGTERM)
    code, log = _stop(proc)
    stop = events(tmp_path, "preempted")[0]
    assert code == 143 and stop["checkpoint"] is None and "grace period" in stop["save_skipped"], log
    assert "a SLURM requeue must follow the save" in stop["save_skipped"], log
    assert "without saving" in log and "the resume starts from step_00000020" in log
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000010", "step_00000020"]
