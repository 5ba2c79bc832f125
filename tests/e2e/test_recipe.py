"""The reference recipe end to end: real processes, real signals, real checkpoints on disk."""

import json
import os
import re
import shutil
import signal
import time

import pytest

from pathlib import Path

from distributed_helpers import free_port
from preemptible.checkpoint.layout import why_invalid
from conftest import REFERENCE_STEPS
from recipe_helpers import events, exit_codes, head, interrupt_at, losses, lrs, run, start, wait_for_step, worker_pids_by_rank

pytestmark = pytest.mark.slow
STEPS = REFERENCE_STEPS  # the shared uninterrupted runs (conftest.py: `reference`)


def assert_same_run(resumed, reference):
    done, ref = events(resumed, "done"), events(reference, "done")
    assert done and done[-1]["params_sha256"] == ref[-1]["params_sha256"]
    assert losses(resumed) == losses(reference)  # every step, exact floats
    assert lrs(resumed) == lrs(reference) and len(lrs(reference)) == STEPS  # the LR too, at every step
    assert sorted(losses(resumed)) == list(range(1, STEPS + 1))


# 2 ranks with synchronous saves: test_signal_to_one_torchrun_worker_stops_every_rank_at_the_same_step.
@pytest.mark.parametrize("nproc, extra", [(1, "checkpoint.async_save=false"), (2, "checkpoint.async_save=true"),
                                          (2, "stopping.stop_check=gradients")])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, reference, nproc, extra):
    code, log = interrupt_at(tmp_path, 17, f"trainer.max_steps={STEPS}", "checkpoint.interval=10", extra, nproc=nproc)
    preempted = events(tmp_path, "preempted")
    assert preempted and preempted[0]["signal"] == "SIGTERM", log
    assert 17 <= preempted[0]["step"] < STEPS
    # TERM to torchrun's agent: it forwards it, then reports its own SignalException (status 1)
    assert (code == 143) if nproc == 1 else (code == 1 and "got signal: 15" in log), log[-3000:]
    assert why_invalid(Path(preempted[0]["checkpoint"]), verify=True) is None
    code, log = run(tmp_path, f"trainer.max_steps={STEPS}", "checkpoint.interval=10", extra, nproc=nproc)
    assert code == 0, log
    resumed = events(tmp_path, "resumed")
    assert resumed and resumed[0]["step"] == preempted[0]["step"]
    assert_same_run(tmp_path, reference[nproc])


def test_signal_to_one_torchrun_worker_stops_every_rank_at_the_same_step(tmp_path, reference):
    code, log = interrupt_at(tmp_path, 12, f"trainer.max_steps={STEPS}", nproc=2, rank=1)
    stops = re.findall(r"\[rank (\d)\].*stop agreed at step (\d+)", log)
    assert {r for r, _ in stops} == {"0", "1"}, log
    assert len({s for _, s in stops}) == 1, stops
    preempted = events(tmp_path, "preempted")[0]
    assert preempted["ranks"] == {"1": "SIGTERM"} and str(preempted["step"]) == stops[0][1]
    code, log = run(tmp_path, f"trainer.max_steps={STEPS}", nproc=2)
    assert code == 0, log
    assert_same_run(tmp_path, reference[2])


def test_default_adaptive_check_agrees_on_a_step(tmp_path):
    """check_every=auto: the interval grows with short steps; every rank still stops at one step."""
    code, log = interrupt_at(tmp_path, 150, "trainer.max_steps=100000", "signal_handler.check_every=auto",
                             nproc=2, rank=1)
    stops = re.findall(r"\[rank (\d)\].*stop agreed at step (\d+).*agreeing every (\d+) steps", log)
    assert {r for r, _, _ in stops} == {"0", "1"}, log
    assert len({s for _, s, _ in stops}) == 1 and len({e for _, _, e in stops}) == 1
    assert int(stops[0][2]) > 1  # millisecond steps: it reduces far less often than every step
    assert why_invalid(Path(events(tmp_path, "preempted")[0]["checkpoint"]), verify=True) is None


def test_sigusr2_from_the_command_line(tmp_path):
    code, log = interrupt_at(tmp_path, 5, "trainer.max_steps=400", "signal_handler.sig=SIGUSR2", sig=signal.SIGUSR2)
    assert code == 128 + signal.SIGUSR2, log
    assert events(tmp_path, "preempted")[0]["signal"] == "SIGUSR2"
    assert "stopped at step" in log


def test_handler_disabled_with_null(tmp_path):
    code, log = interrupt_at(tmp_path, 5, "trainer.max_steps=400", "signal_handler=none")
    assert code == -signal.SIGTERM
    assert not events(tmp_path, "preempted")


def test_exit_code_is_configurable(tmp_path):
    code, _ = interrupt_at(tmp_path, 5, "trainer.max_steps=400", "stopping.exit_code_on_stop=0")
    assert code == 0 and events(tmp_path, "preempted")


def test_uncommitted_and_partial_directories_are_never_loaded(tmp_path):
    code, log = run(tmp_path, "trainer.max_steps=20", "checkpoint.interval=10")
    assert code == 0, log
    ckpts = tmp_path / "checkpoints"
    torn = ckpts / "step_00000030"
    shutil.copytree(ckpts / "step_00000020", torn)
    (torn / "COMMITTED").unlink()  # a save that died before its commit
    shutil.copytree(ckpts / "step_00000020", ckpts / "step_00000040.partial")
    record = json.loads((ckpts / "latest").read_text())
    (ckpts / "latest").write_text(json.dumps({**record, "checkpoint": "step_00000030", "step": 30}))  # a torn head
    code, log = run(tmp_path, "trainer.max_steps=25", "checkpoint.interval=10")
    assert code == 0, log
    assert events(tmp_path, "resumed")[-1]["step"] == 20
    assert "skipping" in log and "step_00000030" in log and "COMMITTED marker" in log
    assert head(tmp_path) == "step_00000025"


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_keep_last_k(tmp_path, async_save):
    code, log = run(tmp_path, "trainer.max_steps=50", "checkpoint.interval=10", "checkpoint.keep=2",
                    f"checkpoint.async_save={async_save}")
    assert code == 0, log
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000040", "step_00000050"]


def test_two_nodes_on_localhost(tmp_path, reference):
    """torchrun rendezvous across two 'nodes': LOCAL_RANK 0 on both, RANK 0 and 1, one run dir."""
    port = free_port()
    procs = [start(tmp_path, f"trainer.max_steps={STEPS}", nproc=1, nnodes=2, node_rank=n, port=port) for n in (0, 1)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert_same_run(tmp_path, reference[2])


def test_fine_tune_from_weights(tmp_path, reference):
    src = reference[1] / "checkpoints" / f"step_{STEPS:08d}"
    code, log = run(tmp_path, "trainer.max_steps=5", f"model.init_from={src}")
    assert code == 0, log
    first = losses(tmp_path)[1]
    assert first < losses(reference[1])[1] - 0.5  # starts from trained weights, not from scratch


# Bad input (fresh and on a finished run): the one batch in tests/faults/test_faults.py.


def test_max_time_stops_with_a_checkpoint_and_resumes(tmp_path, reference):
    """No signal at all (clusters that send TERM then KILL): stop while a step and a save fit."""
    limit = ["stopping.max_time=7", "stopping.save_guess=1", "stopping.margin=1", f"trainer.max_steps={STEPS * 50}"]
    code, log = run(tmp_path, *limit)
    assert code == 124, log
    stop = events(tmp_path, "preempted")[0]
    assert stop["signal"] == "time limit" and stop["ranks"] == {"0": "time limit"}
    code, log = run(tmp_path, f"trainer.max_steps={stop['step'] + 5}")
    assert code == 0 and events(tmp_path, "resumed")[0]["step"] == stop["step"]


def test_a_frozen_torchrun_worker_ends_the_job_with_stacks_and_the_same_command_resumes(tmp_path, reference):
    """watchdog.timeout=15, SIGSTOP to one worker mid-run: the other's watchdog ends it (status 86,
    its stacks in the run directory), torchrun's agent ends the frozen one; the job is over within
    60 s, and the same command resumes and finishes bit-identical to an uninterrupted run."""
    slow = {"PREEMPTIBLE_FAULTS": json.dumps([{"at": "step", "sleep": 0.05}])}  # 40 steps take seconds
    args = (f"trainer.max_steps={STEPS}", "checkpoint.interval=10", "watchdog.timeout=15")
    proc = start(tmp_path, *args, nproc=2, env=slow)
    frozen = worker_pids_by_rank(proc.pid, 2)[1]
    wait_for_step(tmp_path, 14, proc)
    os.kill(frozen, signal.SIGSTOP)
    started = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    assert time.monotonic() - started < 60 and proc.returncode == 1, out  # torchrun's own status
    assert 86 in exit_codes(out), out[-3000:]  # rank 0's, as torchrun reports it
    hung = events(tmp_path, "hung")
    assert [(e["rank"], e["signal"]) for e in hung] == [(0, "hung")], out
    assert (tmp_path / hung[0]["stacks"]).is_file() and "ending with status 86" in out
    assert int(head(tmp_path)[5:]) <= hung[0]["step"]  # the head: the last committed checkpoint
    code, out = run(tmp_path, *args, nproc=2)
    assert code == 0, out
    assert_same_run(tmp_path, reference[2])
