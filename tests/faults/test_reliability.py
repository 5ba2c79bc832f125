"""Nothing lost, nothing trusted: what people actually do to a run, with real processes and signals.

Ctrl-C and the other signals launchers forward, a repeated signal during the stop's save, every
torchrun worker's exit status, a second run on the same directory, going back to an older
checkpoint, a flipped byte, a crafted checkpoint, 3 and 4 ranks, a changed configuration.
"""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REFERENCE_STEPS
from recipe_helpers import (REPO, events, exit_codes, interrupt_at, losses, lrs, run, start, wait_for_step,
                            worker_pids_by_rank)
from preemptible.checkpoint import storage
from preemptible.checkpoint.writer import COMMIT, marker_checksum, why_invalid
from preemptible.observe.metrics import read_metrics

pytestmark = pytest.mark.slow
STEPS = REFERENCE_STEPS  # `reference[nproc]` (conftest.py): uninterrupted, checkpoints every 10, all kept


def digest(run_dir):
    return events(run_dir, "done")[-1]["params_sha256"]


# ----------------------------------------------------------------------------- 1. signals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_ctrl_c_and_hangup_save_and_resume_exactly(tmp_path, reference, sig):
    proc = start(tmp_path, f"trainer.max_steps={STEPS}", "checkpoint.interval=10", "checkpoint.keep=4")
    wait_for_step(tmp_path, 13, proc)
    os.killpg(proc.pid, sig)  # what a terminal does: the whole foreground process group
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out
    stop = events(tmp_path, "preempted")[-1]
    assert stop["signal"] == signal.Signals(sig).name and stop["checkpoint"] and "Traceback" not in out
    if sig == signal.SIGHUP:
        return  # the resume after a stop is the same whatever the signal (SIGINT's case below)
    code, log = run(tmp_path, f"trainer.max_steps={STEPS}", "checkpoint.interval=10", "checkpoint.keep=4")
    assert code == 0, log
    assert events(tmp_path, "resumed")[-1]["step"] == stop["step"]
    assert digest(tmp_path) == digest(reference[1]) and losses(tmp_path) == losses(reference[1])


def test_ctrl_c_under_torchrun_saves_once_and_every_worker_reports_130(tmp_path, reference):
    proc = start(tmp_path, f"trainer.max_steps={STEPS}", "checkpoint.interval=10", "checkpoint.keep=4", nproc=2)
    wait_for_step(tmp_path, 13, proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: agent and workers; the agent forwards it again
    out, _ = proc.communicate(timeout=120)
    stop = events(tmp_path, "preempted")[-1]
    assert stop["checkpoint"] and why_invalid(Path(stop["checkpoint"]), verify=True) is None, out
    assert "received again" not in out
    # The agent itself got Ctrl-C (it prints no per-worker report then): each worker says how it ends.
    assert sorted(re.findall(r"\[rank (\d)\].*exiting with status 130", out)) == ["0", "1"], out
    code, log = run(tmp_path, f"trainer.max_steps={STEPS}", "checkpoint.interval=10", "checkpoint.keep=4", nproc=2)
    assert code == 0, log
    assert digest(tmp_path) == digest(reference[2]) and losses(tmp_path) == losses(reference[2])


def test_a_repeated_signal_never_kills_a_save_that_makes_progress(tmp_path):
    """Second TERM 1.5 s after the first, while the stop's checkpoint is being written (slowly)."""
    slow_disk = json.dumps([{"at": "write", "sleep": 1.0, "progress": True}])  # each file: 1 s, writing
    proc = start(tmp_path, "trainer.max_steps=400", env={"PREEMPTIBLE_FAULTS": slow_disk})
    wait_for_step(tmp_path, 10, proc)
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    stop = events(tmp_path, "preempted")[-1]
    assert stop["checkpoint"] and why_invalid(Path(stop["checkpoint"]), verify=True) is None
    assert "received again" not in out and not list((tmp_path / "checkpoints").glob("*.partial"))


BIG = ("model.n_layer=4", "model.n_embd=384", "model.n_head=4")  # ~90 MiB with AdamW: about 11 chunks of 8 MiB


@pytest.mark.parametrize("chunk_seconds, cut", [(0.5, False), (3.0, True)])
def test_the_writers_own_progress_keeps_a_repeated_signal_from_cutting_a_save(tmp_path, chunk_seconds, cut):
    """The same, with the writer's own progress: each 8 MiB it writes takes `chunk_seconds` (a slow
    disk; the writer beats after each, as always). 0.5 s between beats: the second TERM never cuts
    the save (exit 143, committed). 3 s without a beat: the escalation fires (the control: the
    test can fail), and nothing half-written is ever committed."""
    slow_disk = json.dumps([{"at": "chunk", "sleep": chunk_seconds}])
    proc = start(tmp_path, "trainer.max_steps=400", *BIG, env={"PREEMPTIBLE_FAULTS": slow_disk})
    wait_for_step(tmp_path, 5, proc)
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert not list((tmp_path / "checkpoints").glob("step_*[0-9]")) or all(
        why_invalid(p, verify=True) is None for p in (tmp_path / "checkpoints").glob("step_*[0-9]"))
    if cut:
        assert proc.returncode == -signal.SIGTERM and "received again" in out, out[-3000:]
        return
    assert proc.returncode == 143, out[-3000:]
    stop = events(tmp_path, "preempted")[-1]
    assert stop["save_seconds"] > 2.0, stop  # the second TERM came while it was writing
    assert why_invalid(Path(stop["checkpoint"]), verify=True) is None and "received again" not in out


def test_every_torchrun_worker_reports_the_stop_status(tmp_path):
    """The recipe and a user's loop in the documented order, 3 ranks, a signal to one: all say 143.
    (The mechanism -- late signals ignored before a barrier -- is deterministic; before it, 3 of 8
    stops of such a loop had a worker report -15.)"""
    code, out = interrupt_at(tmp_path / "recipe", 6, "trainer.max_steps=400", nproc=3, rank=2)
    assert exit_codes(out) == [143, 143, 143], out
    for attempt in range(2):
        out_dir = tmp_path / f"loop{attempt}"
        out_dir.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
               str(REPO / "tests" / "scripts" / "documented_loop.py"), str(out_dir)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        workers = worker_pids_by_rank(proc.pid, 3)
        deadline = time.monotonic() + 60
        while not (out_dir / "running").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(workers[attempt], signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert exit_codes(out) == [143, 143, 143], out
        assert sorted(p.name for p in out_dir.glob("rank*.pt")) == ["rank0.pt", "rank1.pt", "rank2.pt"]


# ----------------------------------------------------------------------------- 2. ownership


def test_a_second_run_on_the_directory_fails_naming_the_owner_and_touches_nothing(tmp_path):
    first = start(tmp_path, "trainer.max_steps=100000", "checkpoint.interval=20")
    wait_for_step(tmp_path, 25, first)
    code, out = run(tmp_path, "trainer.max_steps=100000", "ownership.wait=1", "seed=7")
    errors = [l for l in out.splitlines() if l.startswith("error:")]
    assert code == 2 and len(errors) == 1, out
    assert f"pid {first.pid}" in errors[0] and "in use by another run" in errors[0]
    os.kill(first.pid, signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 143, out
    steps = [r["step"] for r in read_metrics(tmp_path, strict=True) if "event" not in r]
    assert steps == list(range(1, steps[-1] + 1))  # one run's metrics, never interleaved
    assert not events(tmp_path, "resumed")
    stop = events(tmp_path, "preempted")[-1]
    assert why_invalid(Path(stop["checkpoint"]), verify=True) is None


def test_a_requeued_run_waits_for_the_old_one_to_save_then_resumes_it(tmp_path):
    slow_disk = json.dumps([{"at": "final_save", "sleep": 10}])  # the old job is still saving
    old = start(tmp_path, "trainer.max_steps=100000", env={"PREEMPTIBLE_FAULTS": slow_disk})
    wait_for_step(tmp_path, 10, old)
    os.kill(old.pid, signal.SIGTERM)
    new = start(tmp_path, "trainer.max_steps=100000", "ownership.wait=60", "stopping.max_time=3")
    assert old.wait(timeout=120) == 143
    out, _ = new.communicate(timeout=120)
    stop = events(tmp_path, "preempted")[0]
    assert events(tmp_path, "resumed")[-1]["step"] == stop["step"], out
    assert "waiting up to 60s" in out
    assert new.returncode == 124, out  # the new run's own end: its max_time, with a checkpoint
    mine = events(tmp_path, "preempted")[-1]
    assert mine["signal"] == "time limit" and mine["step"] > stop["step"] and mine["checkpoint"], out


def test_a_killed_run_never_blocks_the_next(tmp_path):
    first = start(tmp_path, "trainer.max_steps=100000", "checkpoint.interval=5")
    wait_for_step(tmp_path, 12, first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    started = time.monotonic()
    code, out = run(tmp_path, "trainer.max_steps=15", "checkpoint.interval=5", "ownership.wait=0")
    assert code == 0, out
    assert "took over the lease" in out and events(tmp_path, "resumed")[-1]["step"] >= 10
    assert time.monotonic() - started < 60


# ----------------------------------------------------------------------------- 3. lineage


def test_going_back_then_preempted_continues_the_branch(tmp_path, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[1], run_dir)
    (run_dir / "metrics.jsonl").unlink()  # so that the steps waited for are this run's
    back = run_dir / "checkpoints" / "step_00000020"
    args = (f"trainer.max_steps={STEPS}", "checkpoint.interval=10", "checkpoint.keep=4", f"checkpoint.resume={back}")
    code, out = interrupt_at(run_dir, 26, *args)
    assert code == 143, out
    assert events(run_dir, "resumed")[-1]["branched"] and events(run_dir, "resumed")[-1]["step"] == 20
    stop = events(run_dir, "preempted")[-1]["step"]
    abandoned = sorted(p.name for p in (run_dir / "checkpoints" / "abandoned").rglob("step_*"))
    assert abandoned == ["step_00000030", "step_00000040"]  # kept apart, not deleted, not followed
    code, out = run(run_dir, *args)  # the same command again, as a requeue runs it
    assert code == 0, out
    assert events(run_dir, "resumed")[-1]["step"] == stop and not events(run_dir, "resumed")[-1]["branched"]
    assert digest(run_dir) == digest(reference[1])  # 20 -> 40 again is the same training


def test_resume_never_refuses_a_directory_with_checkpoints(tmp_path, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[1], run_dir)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    code, out = run(run_dir, "checkpoint.resume=never")
    assert code == 2 and "checkpoint.resume=never" in out and "step_00000040" in out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


# ----------------------------------------------------------------------------- 4. integrity


class Payload:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[1], run_dir)
    newest = run_dir / "checkpoints" / "step_00000040"
    target = tmp_path / "pwned"
    (newest / ".metadata").write_bytes(pickle.dumps(Payload(target)))
    marker = json.loads((newest / COMMIT).read_text())
    marker["files"][".metadata"] = list(storage.file_crc32c(newest / ".metadata"))  # consistent: only safety stops it
    marker["marker_crc32c"] = marker_checksum(marker)
    (newest / COMMIT).write_text(json.dumps(marker))
    for args in ([], [f"checkpoint.resume={newest}"], [f"model.init_from={newest}"]):
        code, out = run(tmp_path / "other" if args and "init_from" in args[0] else run_dir, "trainer.max_steps=50", *args)
        errors = [l for l in out.splitlines() if l.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "system" in errors[0] and "not loaded" in errors[0], out
        assert not target.exists()


# ----------------------------------------------------------------------------- 5. 3 ranks (4: FSDP, below)


# FSDP at 4 ranks: tests/e2e/test_fsdp.py::test_fsdp_interrupted_then_resumed_is_bit_identical.
@pytest.mark.parametrize("nproc, parallelism", [(3, "ddp")])
def test_stop_and_resume_is_exact_at_3_ranks(tmp_path, nproc, parallelism):
    args = ("trainer.max_steps=16", f"trainer.parallelism={parallelism}")
    full = tmp_path / "full"
    code, out = run(full, *args, nproc=nproc)
    assert code == 0, out
    cut = tmp_path / "cut"
    interrupt_at(cut, 6, *args, nproc=nproc, rank=nproc - 1)
    assert events(cut, "preempted")[-1]["checkpoint"]
    code, out = run(cut, *args, nproc=nproc)
    assert code == 0, out
    assert losses(cut) == losses(full) and digest(cut) == digest(full)
    assert lrs(cut) == lrs(full) and len(lrs(full)) == 16


# ----------------------------------------------------------------------------- 6. configuration


def test_a_changed_configuration_at_resume_is_refused_or_applied_and_said(tmp_path, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[1], run_dir)
    code, out = run(run_dir, f"trainer.max_steps={STEPS + 5}", "model.n_embd=64")
    assert code == 2 and "cannot honour" in out and "model.n_embd: 32 -> 64" in out, out
    code, out = run(run_dir, f"trainer.max_steps={STEPS + 5}", "seed=1")
    assert code == 2 and "seed: 1337 -> 1" in out, out
    code, out = run(run_dir, f"trainer.max_steps={STEPS + 5}", "optim.lr=0.0005")
    assert code == 0, out
    assert "optim.lr: 0.001 -> 0.0005" in out and f"trainer.max_steps: {STEPS} -> {STEPS + 5}" in out
    logged = {r["step"]: r["lr"] for r in read_metrics(run_dir, strict=True) if "event" not in r}
    assert logged[STEPS + 1] < 0.0005 + 1e-12  # the new base LR applies from the first resumed step


# Bad values: the one bad-input batch in test_faults.py.


def test_data_paths_given_as_one_file_is_that_file(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("hello preemptible world\n" * 2000)
    code, out = run(tmp_path / "run", f"data.paths={text}", "trainer.max_steps=3")
    assert code == 0, out
