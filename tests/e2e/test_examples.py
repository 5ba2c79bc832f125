"""The examples/ loops, each written only against the public API: under torchrun, a real signal to
one rank, the same command again, and the result bit-identical to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipe_helpers import events, rows, wait_for_step, worker_pids_by_rank

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def launch(script, run_dir, *args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(EXAMPLES / script), str(run_dir), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    proc.started_at = started
    return proc


def finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def interrupt(script, run_dir, step, *args, rank=1, sig=signal.SIGTERM):
    proc = launch(script, run_dir, *args)
    target = worker_pids_by_rank(proc.pid, 2)[rank]
    wait_for_step(run_dir, step, proc)
    os.kill(target, sig)
    return finish(proc)


def worker_statuses(out):
    """What torchrun reports for each worker that ended non-zero (it exits 1 itself then)."""
    from recipe_helpers import exit_codes

    return exit_codes(out)


def evals(run_dir):
    return {e["step"]: e["val_loss"] for e in events(run_dir, "eval")}


def test_accumulation_amp_and_eval_a_stop_during_eval_resumes_bit_identically(tmp_path):
    common = ["--steps", "30", "--eval-every", "10", "--interval", "100", "--log-every", "1"]
    code, out = finish(launch("accumulate_amp_eval.py", tmp_path / "ref", *common))
    assert code == 0, out
    reference = events(tmp_path / "ref", "done")[0]

    # The eval after step 10 takes ~4 s here: TERM to rank 1 lands in it; the stop does not wait for it.
    run_dir = tmp_path / "run"
    code, out = interrupt("accumulate_amp_eval.py", run_dir, 10, *common, "--eval-seconds", "1")
    assert code == 1 and set(worker_statuses(out)) == {143}, out  # every worker: 128 + SIGTERM
    stop = events(run_dir, "preempted")[0]
    assert stop["step"] == 10 and stop["mid_step"] is True and stop["ranks"] == {"1": "SIGTERM"}, stop
    assert 10 not in evals(run_dir)  # interrupted before it finished
    assert max(r["time"] for r in rows(run_dir)) - stop["time"] < 5

    code, out = finish(launch("accumulate_amp_eval.py", run_dir, *common))
    assert code == 0, out
    assert events(run_dir, "resumed")[0]["step"] == 10
    assert events(run_dir, "done")[0]["params_sha256"] == reference["params_sha256"]
    assert evals(run_dir) == evals(tmp_path / "ref")  # the interrupted evaluation was done again, the same
    best = [e["best_val"] for e in events(run_dir, "eval")]
    assert best == [e["best_val"] for e in events(tmp_path / "ref", "eval")]  # values= survived the stop


def test_ema_loop_killed_and_stopped_resumes_with_the_same_ema(tmp_path):
    common = ["--steps", "60", "--interval", "20", "--log-every", "1"]
    code, out = finish(launch("ema.py", tmp_path / "ref", *common))
    assert code == 0, out
    reference = events(tmp_path / "ref", "ema_accuracy")[0]

    run_dir = tmp_path / "run"
    # SIGKILL to rank 1 after step 25: nothing saved since step 20; torchrun ends the job
    code, out = interrupt("ema.py", run_dir, 25, *common, "--step-seconds", "0.02", sig=signal.SIGKILL)
    assert code == 1 and -signal.SIGKILL in worker_statuses(out), out[-3000:]
    # USR2 is not one of the Run's signals: only TERM/INT/HUP are; INT to rank 0 after step 33
    code, out = interrupt("ema.py", run_dir, 33, *common, "--step-seconds", "0.02", rank=0, sig=signal.SIGINT)
    assert code == 1 and set(worker_statuses(out)) == {130}, out
    assert [e["step"] for e in events(run_dir, "resumed")] == [20]
    code, out = finish(launch("ema.py", run_dir, *common))
    assert code == 0, out
    final = events(run_dir, "ema_accuracy")[0]
    assert final["ema_sha256"] == reference["ema_sha256"] and final["accuracy"] == reference["accuracy"]
    assert events(run_dir, "done")[0]["params_sha256"] == events(tmp_path / "ref", "done")[0]["params_sha256"]


def test_export_and_status_cli(tmp_path):
    """A one-process run of an example (plain python, no torchrun), then its weights out: the CLI for
    safetensors and the status listing, the Python API for a .pt and for a path that is not there."""
    import torch
    from safetensors.torch import load_file

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "ema.py"), str(tmp_path / "run"), "--steps", "5",
                           "--interval", "0"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    done = events(tmp_path / "run", "done")[0]
    cli = [sys.executable, "-m", "preemptible"]
    proc = subprocess.run([*cli, "export", str(tmp_path / "run"), str(tmp_path / "w.safetensors")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    weights = load_file(str(tmp_path / "w.safetensors"))
    assert set(weights) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    assert preemptible_digest(weights) == done["params_sha256"]  # the trained weights, exactly

    import preemptible

    out = preemptible.export_weights(tmp_path / "run" / "checkpoints" / "step_00000005", tmp_path / "w.pt")
    assert preemptible_digest(torch.load(out, weights_only=True)) == done["params_sha256"]
    with pytest.raises(preemptible.ConfigError, match="does not exist"):
        preemptible.export_weights(tmp_path / "nowhere", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()

    status = subprocess.run([*cli, "status", str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO)
    assert status.returncode == 0, status.stderr
    assert "step_00000005" in status.stdout and "valid (head)" in status.stdout and "done" in status.stdout


def preemptible_digest(weights):
    """params_sha256's digest of a plain state dict (names sorted, raw bytes)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].contiguous().view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def test_nanogpt_loop_term_ctrl_c_and_sigkill_under_torchrun_resume_bit_identically(tmp_path):
    """examples/nanogpt.py (module-level loop, prefetch, RNG-driven batches, grad accumulation,
    eval, its own ckpt.pt), 2 ranks under torchrun: TERM to one worker, then Ctrl-C to the whole
    process group, then SIGKILL to one worker; each time the same command resumes, and the end is
    bit-identical to an uninterrupted run, every step's loss and every eval included."""
    common = ["--max_iters=40", "--interval=10", "--eval_interval=10", "--step_seconds=0.05"]
    code, out = finish(launch("nanogpt.py", tmp_path / "ref", *common))
    assert code == 0, out
    ref = tmp_path / "ref"
    run_dir = tmp_path / "run"

    code, out = interrupt("nanogpt.py", run_dir, 7, *common, sig=signal.SIGTERM)
    assert set(worker_statuses(out)) == {143}, out
    term = events(run_dir, "preempted")[-1]
    assert term["signal"] == "SIGTERM" and term["checkpoint"], out

    proc = launch("nanogpt.py", run_dir, *common)
    wait_for_step(run_dir, term["step"] + 6, proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the agent and both workers
    code, out = finish(proc)
    ctrl_c = events(run_dir, "preempted")[-1]
    assert ctrl_c["signal"] == "SIGINT" and ctrl_c["checkpoint"] and ctrl_c["step"] > term["step"], out

    proc = launch("nanogpt.py", run_dir, *common)
    wait_for_step(run_dir, 33, proc)  # past the periodic checkpoint at 30
    os.kill(worker_pids_by_rank(proc.pid, 2)[1], signal.SIGKILL)
    finish(proc)
    code, out = finish(launch("nanogpt.py", run_dir, *common))
    assert code == 0, out
    assert [e["step"] for e in events(run_dir, "resumed")] == [term["step"], ctrl_c["step"], 30]
    assert events(run_dir, "killed")[0]["step"] == 30

    def by_step(d, key):
        return {r["step"]: r[key] for r in rows(d) if key in r}
    assert by_step(run_dir, "loss") == by_step(ref, "loss")
    assert by_step(run_dir, "val_loss") == by_step(ref, "val_loss")
    assert events(run_dir, "done")[-1]["params_sha256"] == events(ref, "done")[-1]["params_sha256"]
    assert (run_dir / "ckpt.pt").is_file()
