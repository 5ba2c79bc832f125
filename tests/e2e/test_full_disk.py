"""A full disk under the run directory never stops training: a real tmpfs of 1 MiB holds the run
directory (metrics, progress, the log, the lease, the watchdog's files), the checkpoints live on
another disk, and the tmpfs is filled to the last byte mid-run. Training goes on (one warning per
file); the rows kept meanwhile are written once there is room again; a stop's save commits either
way; the run resumes and ends bit-identical to one that never saw a full disk (docs/edges.md,
"A full disk under the run directory")."""

import json
import os
import signal
import subprocess

import pytest

from conftest import REFERENCE_STEPS
from recipe_helpers import events, losses, lrs, run, start, wait_for_step

pytestmark = pytest.mark.slow
STEPS = REFERENCE_STEPS
SLOW_STEPS = {"PREEMPTIBLE_FAULTS": json.dumps([{"at": "step", "sleep": 0.1}])}  # the numbers stay the reference's


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted at tmp_path/run (root: .ci/run runs as root, as CI does)."""
    mount = tmp_path / "run"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory):
    """Write zeros until the disk refuses (ENOSPC): no byte is left. First, the files the run appends
    to are padded with blank lines (which readers skip) to the end of their last page, so their
    next append needs a new one (tmpfs gives pages: a partly used one would take a few more rows)."""
    for name in ("metrics.jsonl", "finetune.log"):
        with open(directory / name, "ab") as f:
            f.write(b"\n" * (-f.tell() % 4096))
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    try:
        (directory / "probe").write_text("x")
    except OSError:
        return
    finally:
        (directory / "probe").unlink(missing_ok=True)
    raise AssertionError("the disk still takes a write")


@pytest.mark.parametrize("nproc, free_before_stop", [(2, True), (1, False)])
def test_a_full_run_directory_never_stops_training(small_disk, tmp_path, reference, nproc, free_before_stop):
    run_dir, ckpt = small_disk, tmp_path / "checkpoints"
    args = (f"trainer.max_steps={STEPS}", f"checkpoint.dir={ckpt}", "watchdog.timeout=5")
    proc = start(run_dir, *args, nproc=nproc, env=SLOW_STEPS)
    try:
        wait_for_step(run_dir, 6, proc)
        fill(run_dir)
        full_at = wait_for_step(run_dir, 1, proc)
        wait_for_step(run_dir, full_at + 8, proc)  # trains on while full (progress.json is rewritten in place)
        if free_before_stop:
            (run_dir / "filler").unlink()
            full_until = wait_for_step(run_dir, 1, proc)
            wait_for_step(run_dir, full_until + 4, proc)
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (proc.returncode == 143) if nproc == 1 else ("got signal: 15" in out), out[-3000:]
    assert out.count("metrics.jsonl cannot be written") == 1, out[-3000:]
    assert out.count("finetune.log cannot be written") == 1, out[-3000:]
    assert out.count("renewal failed") <= 1, out[-3000:]
    assert out.count("Traceback") == (0 if nproc == 1 else 1), out[-3000:]  # torchrun's own, on TERM
    stopped = [line for line in out.splitlines() if "stopped at step" in line]
    assert stopped, out[-3000:]
    step = int(stopped[0].split("stopped at step ")[1].split()[0])
    assert step >= full_at + 8 and (ckpt / f"step_{step:08d}" / "COMMITTED").exists()
    if free_before_stop:
        assert "written again" in out and events(run_dir, "preempted")[0]["step"] == step
        assert sorted(losses(run_dir)) == list(range(1, step + 1))  # the rows kept while full, written late
    else:
        (run_dir / "filler").unlink()
        assert "could not be written: its last events were" in out and '"event": "preempted"' in out
    code, out = run(run_dir, *args, nproc=nproc)
    assert code == 0, out[-3000:]
    assert events(run_dir, "resumed")[-1]["step"] == step
    done, ref = events(run_dir, "done"), events(reference[nproc], "done")
    assert done[-1]["params_sha256"] == ref[-1]["params_sha256"]
    for logged in (losses, lrs):  # every step that was written (rows of a full disk at the stop are not)
        written, ref = logged(run_dir), logged(reference[nproc])
        assert written and all(written[s] == ref[s] for s in written)
