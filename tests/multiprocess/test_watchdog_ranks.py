"""The watchdog with two ranks started as `srun` starts tasks: no agent, each process with RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT and LOCAL_RANK. A peer that is killed or frozen ends the other
rank within seconds with status 86 and nothing half written; a busy peer is never a false alarm."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed_helpers import free_port
from preemptible.checkpoint.layout import why_invalid
from preemptible.stopping.watchdog import HANG_EXIT

pytestmark = pytest.mark.slow  # several seconds of deliberate waiting each
LOOP = Path(__file__).resolve().parents[1] / "scripts" / "watchdog_loop.py"


def tasks(run_dir, opts, faults=None):
    port, procs = free_port(), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop("PREEMPTIBLE_FAULTS", None)
        if faults:
            env["PREEMPTIBLE_FAULTS"] = json.dumps(faults)
        procs.append(subprocess.Popen([sys.executable, str(LOOP), str(run_dir), json.dumps(opts)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def wait_for_step(run_dir, step, procs, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads((Path(run_dir) / "progress.json").read_text())["step"] >= step:
                return
        except (OSError, ValueError, KeyError):
            pass
        assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_nothing_half_written(run_dir):
    """Every checkpoint directory is a committed, verified one; the head is one of them."""
    cdir = Path(run_dir) / "checkpoints"
    steps = sorted(p for p in cdir.glob("step_*"))
    assert steps, "expected the periodic checkpoint"
    for p in steps:
        assert why_invalid(p, verify=True) is None, p
    assert json.loads((cdir / "latest").read_text())["checkpoint"] == steps[-1].name


@pytest.mark.parametrize("lost, how", [(1, signal.SIGKILL), (0, signal.SIGKILL), (1, signal.SIGSTOP)])
def test_a_killed_or_frozen_peer_ends_the_other_rank_with_86(tmp_path, lost, how):
    procs = tasks(tmp_path, {"timeout": 5, "steps": 400, "step_sleep": 0.03, "interval": 5})
    try:
        wait_for_step(tmp_path, 12, procs)
        os.kill(procs[lost].pid, how)
        started = time.monotonic()
        out, _ = procs[1 - lost].communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        for p in procs:
            p.kill()
            p.wait()
    survivor = 1 - lost
    assert procs[survivor].returncode == HANG_EXIT, out
    assert took < (15 if how == signal.SIGSTOP else 5), took  # the 5 s timeout, or at once
    kind = "hung" if how == signal.SIGSTOP else "peer lost"
    assert sum("ending with status 86" in line for line in out.splitlines()) == 1, out
    assert f"rank {survivor}: {kind}: " in out and "Traceback" not in out, out
    hung = [r for r in rows(tmp_path) if r.get("event") == "hung"]
    assert len(hung) == 1 and hung[0]["rank"] == survivor and hung[0]["signal"] == kind, hung
    stacks = (tmp_path / hung[0]["stacks"]).read_text()
    assert f"rank {survivor}, step " in stacks and "thread MainThread" in stacks
    if kind == "peer lost":
        assert "by peer" in stacks.split("thread ")[0]  # the collective's error (closed or reset), in the file
    assert_nothing_half_written(tmp_path)


def test_a_busy_peer_is_no_false_alarm(tmp_path):
    """timeout 3 s: rank 0 alone spends 6 s in a save (writing: fault injection) while rank 1 waits
    in the save's collective, then 5 s in an evaluation of its own (run.heartbeat()) while rank 1
    waits at a barrier; then both ranks evaluate for 5 s calling should_stop() between batches."""
    opts = {"timeout": 3, "steps": 24, "interval": 10, "eval_at": 15, "eval_seconds": 5, "eval_rank0_only": True}
    faults = [{"at": "save", "rank": 0, "step": 10, "sleep": 6, "progress": True}]
    procs = tasks(tmp_path, opts, faults)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert not list((tmp_path / "watchdog").glob("stacks-*"))
    opts.update(eval_rank0_only=False, steps=40, eval_at=30)
    procs = tasks(tmp_path, opts)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert not list((tmp_path / "watchdog").glob("stacks-*"))
    assert not [r for r in rows(tmp_path) if r.get("event") == "hung"]


def test_without_the_thread_the_process_groups_timeout_bounds_a_hang(tmp_path):
    """watchdog off, init_distributed(timeout=3): rank 1 freezes in its own code; rank 0's next
    collective fails after the process group's 3 s, and the rank ends as on a lost peer (86)."""
    procs = tasks(tmp_path, {"watchdog": False, "group_timeout": 3, "steps": 400, "hang_at": 8, "hang_rank": 1,
                             "interval": 5})
    try:
        out, _ = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == HANG_EXIT, out
    hung = [r for r in rows(tmp_path) if r.get("event") == "hung"]
    assert [(h["rank"], h["signal"]) for h in hung] == [(0, "peer lost")], out
    assert "timed out" in hung[0]["cause"].lower() or "timeout" in hung[0]["cause"].lower(), hung
    assert not (tmp_path / "watchdog").exists() or not list((tmp_path / "watchdog").glob("rank*"))  # no thread
    assert_nothing_half_written(tmp_path)


def test_interval_auto_saves_at_the_same_steps_on_every_rank(tmp_path):
    """checkpoint interval='auto' at 2 ranks: rank 0 chooses, both save at its steps (a rank saving
    alone would hang its collective), every checkpoint is committed and verified."""
    procs = tasks(tmp_path, {"interval": "auto", "interrupt_every": 0.5, "steps": 60, "step_sleep": 0.01,
                             "timeout": 20})
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    chosen = [r for r in rows(tmp_path) if r.get("event") == "interval"]
    assert chosen and chosen[0]["step"] == 3, chosen
    steps = sorted(int(p.name[5:]) for p in (tmp_path / "checkpoints").glob("step_*"))
    assert steps[-1] == 60
    assert_nothing_half_written(tmp_path)


def test_a_rank_woken_after_its_job_was_replaced_writes_nothing_there(tmp_path):
    """Rank 1 frozen (SIGSTOP); rank 0's watchdog ends the job (86) and releases the directory; a
    successor takes it (a real lease, as a requeued job's rank 0 would); then rank 1 wakes (SIGCONT):
    it sees its peer gone and ends with 86 too, but appends no event, writes no stacks file and no
    beat into the successor's directory (its stacks go to stderr)."""
    from preemptible.ownership.lease import RunLease

    procs = tasks(tmp_path, {"timeout": 3, "steps": 400, "step_sleep": 0.03, "interval": 5})
    successor = None
    try:
        wait_for_step(tmp_path, 12, procs)
        os.kill(procs[1].pid, signal.SIGSTOP)
        out0, _ = procs[0].communicate(timeout=60)
        assert procs[0].returncode == HANG_EXIT, out0
        successor = RunLease(tmp_path, wait=10, stale_after=30).acquire()
        before = {p.name: p.read_bytes() for p in (tmp_path / "watchdog").iterdir()}
        metrics = (tmp_path / "metrics.jsonl").read_bytes()
        os.kill(procs[1].pid, signal.SIGCONT)
        out1, _ = procs[1].communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if successor is not None:
            successor.release()
    assert procs[1].returncode == HANG_EXIT, out1
    assert "the run directory is no longer this run's: nothing was written there" in out1, out1
    assert "thread MainThread" in out1  # the stacks, on stderr instead
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics  # one hung event: rank 0's
    assert [(r["rank"], r["signal"]) for r in rows(tmp_path) if r.get("event") == "hung"] == [(0, "hung")]
    assert {p.name: p.read_bytes() for p in (tmp_path / "watchdog").iterdir()} == before
