"""Trackers across stop, resume, SIGKILL, resume: the real libraries, offline, read back afterwards.

One loop (tests/scripts/tracked_loop.py) feeds TensorBoard, W&B (offline) and MLflow (a local
file store) at once; each must end with exactly one tracker run holding every step once, with
the values metrics.jsonl has (the source of truth, later line winning)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from recipe_helpers import REPO, events, wait_for_step
from tracker_readers import (mlflow_runs, tensorboard_raw_steps, tensorboard_scalars, wandb_history,
                             wandb_records)

from preemptible import read_history

pytestmark = pytest.mark.slow
SCRIPT = REPO / "tests" / "scripts" / "tracked_loop.py"
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MLFLOW_ALLOW_FILE_STORE="true", WANDB_SILENT="true",
           WANDB_MODE="offline")
STEPS = 60


def _start(run_dir, *extra):
    return subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), f"--steps={STEPS}", "--interval=10", *extra],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_one_tracker_run_each_step_once_across_stops_a_kill_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a local file store only with it
    uri = "file://" + str(tmp_path / "mlruns")
    # 1: SIGTERM -> a stop with a checkpoint; the trackers say preempted
    proc = _start(tmp_path)
    wait_for_step(tmp_path, 13, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    stop = events(tmp_path, "preempted")[0]["step"]
    client, runs = mlflow_runs(uri, "tests")
    assert len(runs) == 1 and runs[0].info.status == "SCHEDULED", out
    assert runs[0].data.tags["preemptible.status"] == "preempted" and runs[0].data.tags["preemptible.stop_reason"] == "SIGTERM"
    assert [k for k, _ in wandb_records(tmp_path)[0][1] if k == "preempting"], "W&B was not told the run is preempted"
    # 2: resume, then SIGKILL 5 steps after a periodic checkpoint (30), once TensorBoard has flushed
    # them: those steps are computed again by the next run
    proc = _start(tmp_path, "--pause-at=35")
    wait_for_step(tmp_path, 35, proc)
    time.sleep(0.8)  # TensorBoard flushes every 0.2 s: the steps after the checkpoint reach its file
    proc.kill()
    proc.communicate(timeout=60)
    killed_at = max(r["step"] for r in read_history(tmp_path).rows)
    assert killed_at == 35
    # 3: resume, a second stop (SIGTERM); 4: resume to the end
    proc = _start(tmp_path)
    wait_for_step(tmp_path, 45, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    stop2 = events(tmp_path, "preempted")[1]["step"]
    proc = _start(tmp_path)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    resumed = [e["step"] for e in events(tmp_path, "resumed")]
    assert resumed == [stop, 30, stop2], resumed  # the kill lost steps 31-35: computed again
    kill = events(tmp_path, "killed")
    assert [(k["reached"], k["step"], k["redone"]) for k in kill] == [(35, 30, 5)], kill
    from preemptible.observe.export import format_status, status

    assert "killed (no stop recorded; found by the next start): 5 step(s) trained again from step 30" in \
        format_status(status(tmp_path))

    history = read_history(tmp_path)
    truth = {r["step"]: r["loss"] for r in history.rows}
    assert sorted(truth) == list(range(1, STEPS + 1))

    # TensorBoard: the killed run's extra steps are in the files, and purged by TensorBoard's reader
    raw = tensorboard_raw_steps(tmp_path / "tensorboard", "loss")
    assert len(raw) > STEPS and len(raw) - len(set(raw)) > 0, "the kill left no doubled steps: the purge was not tested"
    tb = tensorboard_scalars(tmp_path / "tensorboard", "loss")
    assert [s for s, _ in tb] == list(range(1, STEPS + 1))
    assert all(abs(v - truth[s]) <= 1e-6 * max(1.0, abs(truth[s])) for s, v in tb)  # float32 in TensorBoard

    # W&B: four offline segments of one run id; each step once, the exact values
    history_by_id = wandb_history(tmp_path)
    assert len(history_by_id) == 1 and len(wandb_records(tmp_path)) == 4
    wb = [(s, v["loss"]) for s, v in next(iter(history_by_id.values())) if "loss" in v]
    assert [s for s, _ in wb] == list(range(1, STEPS + 1)) and all(v == truth[s] for s, v in wb)

    # MLflow: one run, FINISHED, each step once, the exact values
    client, runs = mlflow_runs(uri, "tests")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["preemptible.status"] == "done"
    ml = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "loss"))
    assert [s for s, _ in ml] == list(range(1, STEPS + 1)) and all(v == truth[s] for s, v in ml)
    marks = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "events.preempted"))
    assert marks == [stop, stop2]
    _plot_and_check(tmp_path)


def _plot_and_check(run_dir):
    """`python -m preemptible plot` (its main(), in this process) on the run above (two stops, a kill):
    a PNG with each stop, resume and the time lost marked; one line printed per interruption."""
    import contextlib
    import io

    from preemptible.__main__ import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["plot", str(run_dir), "-o", str(run_dir / "p.png")]) == 0
    out = type("Out", (), {"stdout": printed.getvalue()})
    lines = [line for line in out.stdout.splitlines() if "resumed at step" in line]
    assert len(lines) == 3 and all("s lost" in line for line in lines), out.stdout
    assert lines[0].startswith("SIGTERM at step") and lines[1].startswith("killed at step 35 -> resumed at step 30")
    png = (run_dir / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    from matplotlib.image import imread

    image = imread(str(run_dir / "p.png"))
    assert image.shape[0] > 400 and image.shape[1] > 900
    # the red stop lines and green resume lines are drawn: pixels of those colours exist
    rgb = image[..., :3]
    red = ((rgb[..., 0] > 0.75) & (rgb[..., 1] < 0.35) & (rgb[..., 2] < 0.35)).sum()
    green = ((rgb[..., 1] > 0.5) & (rgb[..., 0] < 0.3) & (rgb[..., 2] < 0.3)).sum()
    assert red > 100 and green > 100, (red, green)


def test_plot_refuses_what_is_not_a_run(tmp_path):
    out = subprocess.run([sys.executable, "-m", "preemptible", "plot", str(tmp_path)], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2 and "has no metrics.jsonl" in out.stderr
