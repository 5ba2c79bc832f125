"""The watchdog in one process: its options, what counts as a lost peer, and a real hang in a real
process (stacks written, status 86, the run directory released, the same command resumes). The
runs of several ranks (a frozen peer, a killed one, no false alarms) are in tests/multiprocess."""

import json
import re
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import preemptible
from preemptible import ConfigError, Run, Watchdog
from preemptible.stopping.watchdog import HANG_EXIT, peer_lost
from zygote import run_python

LOOP = Path(__file__).resolve().parents[1] / "scripts" / "watchdog_loop.py"


def loop(run_dir, limit=120, **opts):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = run_python([str(LOOP), str(run_dir), json.dumps(opts)], timeout=limit, env=env)
    return p.returncode, p.stdout + p.stderr


def events(run_dir, name):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if r.get("event") == name]


@pytest.mark.parametrize("kwargs, words", [
    (dict(timeout=0), "timeout=0; expected seconds > 0 and <= 1e+06 (or 'auto')"),
    (dict(timeout=1e15), "timeout=1000000000000000.0; expected seconds > 0 and <= 1e+06"),  # was an OverflowError at the group's start
    (dict(floor=1e7), "floor=10000000.0; expected seconds > 0 and <= 1e+06"),
    (dict(timeout="soon"), "timeout='soon'"),
    (dict(timeout=float("nan")), "timeout=nan"),
    (dict(timeout=True), "timeout=True"),
    (dict(floor=0), "floor=0"),
    (dict(factor=0.5), "factor=0.5; expected a number >= 1"),
])
def test_options_are_checked_when_made(kwargs, words):
    with pytest.raises(ConfigError, match="^" + re.escape(words)):
        Watchdog(**kwargs)


def test_run_refuses_a_watchdog_that_is_not_one(tmp_path):
    with pytest.raises(ConfigError, match=r"^watchdog=dict; expected a preemptible.Watchdog or None"):
        Run(tmp_path / "r", watchdog={"timeout": 5})
    assert not (tmp_path / "r").exists()


def test_the_process_groups_timeout_follows_the_setting():
    assert Watchdog(timeout=15).group_timeout == 45.0  # at least 30 s more than the watchdog's
    assert Watchdog(timeout=100).group_timeout == 200.0
    assert Watchdog().group_timeout == 600.0
    assert preemptible.HANG_EXIT == HANG_EXIT == 86
    assert HANG_EXIT not in (0, 1, 2, 75, 124) and HANG_EXIT < 128


@pytest.mark.parametrize("error, lost", [
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1"), True),
    (RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv operation"), True),
    (RuntimeError("NCCL communicator was aborted on rank 1"), True),
    (RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1941: Connection reset by peer"), True),
    (ConnectionResetError("Connection reset by peer"), False),  # a download's, not a collective's
    (RuntimeError("the download failed: Connection reset by peer"), False),
    (RuntimeError("CUDA out of memory"), False),
    (ValueError("the data loader timed out"), False),  # a timeout, but not a collective's
    (KeyboardInterrupt(), False),
])
def test_a_lost_peer_is_told_from_other_errors(error, lost):
    assert peer_lost(error) is lost
    try:
        raise RuntimeError("wrapped") from error
    except RuntimeError as wrapped:
        assert peer_lost(wrapped) is lost


def test_no_thread_without_a_watchdog_and_one_with(tmp_path):
    model = torch.nn.Linear(2, 2)
    for watchdog, threads in ((None, 0), (Watchdog(timeout=30), 1)):
        with Run(tmp_path / str(threads), model=model, max_steps=1, watchdog=watchdog) as run:
            run.step_done()
            assert sum(t.name == "preemptible-watchdog" for t in threading.enumerate()) == threads
        assert not any(t.name == "preemptible-watchdog" for t in threading.enumerate())


def test_a_hang_writes_stacks_ends_86_and_the_same_command_resumes(tmp_path):
    """auto with a 1 s floor: a 2.5 s first step (compilation) and a 2.5 s evaluation that calls
    should_stop() between batches are no false alarm; a freeze at step 14 is, within seconds."""
    opts = dict(timeout="auto", floor=1.0, first_step_sleep=2.5, eval_at=5, eval_seconds=2.5, interval=10, steps=30)
    code, out = loop(tmp_path, hang_at=14, **opts)
    assert code == HANG_EXIT, out
    hung = events(tmp_path, "hung")
    assert len(hung) == 1 and hung[0]["step"] == 14 and hung[0]["signal"] == "hung", hung
    assert "step 15: the loop's own code" in hung[0]["phase"]
    stacks = tmp_path / hung[0]["stacks"]
    text = stacks.read_text()
    assert text.startswith("preemptible watchdog: hung: no progress here for")
    assert text.split("\nthread ")[1].startswith("MainThread")  # the main thread first
    assert "watchdog_loop.py" in text and "time.sleep(3600)" in text  # where it hung
    lines = [line for line in out.splitlines() if "ending with status 86" in line]
    assert len(lines) == 1 and str(stacks) in lines[0] and "Traceback" not in out
    assert not (tmp_path / "OWNER").exists()  # released: the next run need not wait for it
    assert json.loads((tmp_path / "checkpoints" / "latest").read_text())["checkpoint"] == "step_00000010"

    code, out = loop(tmp_path, **opts)
    assert code == 0, out
    assert events(tmp_path, "resumed")[-1]["step"] == 10 and events(tmp_path, "done")[-1]["step"] == 30
    assert not events(tmp_path, "killed")  # the hang was recorded as such, not found as a kill
    status = subprocess.run([sys.executable, "-m", "preemptible", "status", str(tmp_path)], capture_output=True,
                            text=True).stdout
    assert "hung on rank 0 (no progress here for" in status and "ended with status 86" in status
