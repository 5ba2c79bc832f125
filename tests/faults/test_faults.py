"""The fault-injection suite: what a cluster can do to a run, and what the run must do about it."""

import json
import os
import tempfile
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REFERENCE_STEPS
from recipe_helpers import run_many, command, events, head, losses, run, start, wait_for_step, worker_pids_by_rank
from preemptible.checkpoint.writer import why_invalid

pytestmark = pytest.mark.slow
STEPS = 40


@pytest.fixture
def finished(reference):
    """A finished single-process run with checkpoints at 10, 20, 30, 40 (keep 4), to damage (copy it first)."""
    assert STEPS == REFERENCE_STEPS
    return reference[1]


def _truncate_shard(d):
    shard = sorted(d.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _flip_a_byte(d):
    shard = sorted(d.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, why", [
    (lambda d: _truncate_shard(d), "bytes, the commit says"),
    (lambda d: _flip_a_byte(d), "does not match its checksum"),
    (lambda d: (d / ".metadata").unlink(), ".metadata is missing"),
    (lambda d: (d / "COMMITTED").unlink(), "no COMMITTED marker"),
    (lambda d: (d / "COMMITTED").write_text("{not json"), "unreadable COMMITTED marker"),
])
def test_corrupt_newest_checkpoint_falls_back_to_the_newest_valid(tmp_path, finished, damage, why):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    newest = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    damage(newest)
    (run_dir / "checkpoints" / "latest").write_bytes(os.urandom(40))  # garbage `latest` too
    code, log = run(tmp_path / "explicit", f"checkpoint.resume={newest}")
    assert code == 2 and "not a valid checkpoint" in log and why in log  # never a silent fresh start
    code, log = run(run_dir, f"trainer.max_steps={STEPS}", "checkpoint.interval=10", "checkpoint.keep=4")
    assert code == 0, log
    assert events(run_dir, "resumed")[-1]["step"] == STEPS - 10
    assert f"skipping {newest}" in log and why in log and "ignoring" in log
    assert events(run_dir, "done")[-1]["params_sha256"] == events(finished, "done")[-1]["params_sha256"]


def test_full_disk_during_a_save_is_an_error_and_keeps_the_last_checkpoint(tmp_path, finished):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    limit = 64 * 1024  # files may not grow past 64 KiB: the next checkpoint's shard cannot be written

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = command(run_dir, f"trainer.max_steps={STEPS + 20}", "checkpoint.interval=10", "checkpoint.keep=4")
    proc = subprocess.run(cmd, preexec_fn=small_disk, capture_output=True, text=True, timeout=240)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    assert "step_00000050 could not be written" in errors[0] and f"step_{STEPS:08d}" in errors[0]
    ckpts = run_dir / "checkpoints"
    assert head(run_dir) == f"step_{STEPS:08d}"
    assert why_invalid(ckpts / f"step_{STEPS:08d}") is None
    assert not (ckpts / "step_00000050").exists()


def test_hung_rank_and_a_second_signal_dump_stacks_and_exit_within_seconds(tmp_path):
    """Rank 1 hangs before its collective; rank 0 waits inside it. TERM twice: both dump, both die."""
    hang = json.dumps([{"at": "step", "step": 10, "rank": 1, "sleep": 3600}])
    proc = start(tmp_path, "trainer.max_steps=400", nproc=2, env={"PREEMPTIBLE_FAULTS": hang})
    workers = worker_pids_by_rank(proc.pid, 2)
    wait_for_step(tmp_path, 10, proc)
    time.sleep(1.0)
    for pid in workers.values():
        os.kill(pid, signal.SIGTERM)
    time.sleep(1.5)
    sent = time.monotonic()
    for pid in workers.values():
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10, "not stopped within seconds"
    assert out.count("received again") == 2, out
    assert "faults.py" in out  # rank 1's stack: where it hangs
    assert "backward" in out   # rank 0's stack: waiting for rank 1 in DDP's gradient all-reduce


def test_dataloader_workers_survive_a_signal_to_the_process_group(tmp_path):
    full = tmp_path / "full"
    code, log = run(full, f"trainer.max_steps={STEPS}", "data.num_workers=2")
    assert code == 0, log
    cut = tmp_path / "cut"
    proc = start(cut, f"trainer.max_steps={STEPS}", "data.num_workers=2")
    wait_for_step(cut, 12, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # the recipe and its DataLoader workers, as Ctrl-C or a runtime does
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143 and events(cut, "preempted")[0]["checkpoint"], out
    code, log = run(cut, f"trainer.max_steps={STEPS}", "data.num_workers=2")
    assert code == 0, log
    assert events(cut, "done")[-1]["params_sha256"] == events(full, "done")[-1]["params_sha256"]
    assert losses(cut) == losses(full)


def test_signal_during_start_up_loses_nothing(tmp_path, finished):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = start(run_dir, f"trainer.max_steps={STEPS + 10}", "checkpoint.interval=10", "checkpoint.keep=4",
                 fresh=True)  # a new interpreter: the test is about its seconds of imports
    time.sleep(0.5)  # still importing torch: held (preemptible.early), honoured once the run is up
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    stop = events(run_dir, "preempted")[-1]
    assert proc.returncode == 143 and stop["step"] == STEPS + 1 and stop["checkpoint"], out
    assert "SIGTERM arrived while the process was starting" in out
    now = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert f"step_{STEPS:08d}" in before and f"step_{STEPS:08d}" in now  # the old head is kept (keep=4)
    code, log = run(run_dir, f"trainer.max_steps={STEPS + 10}", "checkpoint.interval=10", "checkpoint.keep=4")
    assert code == 0 and events(run_dir, "resumed")[-1]["step"] == STEPS + 1


def _signal_inside(run_dir, point, *overrides):
    """Hold `point` open for 3 s with a fault, send SIGTERM while the run is inside it."""
    slow = json.dumps([{"at": point, "sleep": 3}])
    proc = start(run_dir, *overrides, env={"PREEMPTIBLE_FAULTS": slow})
    out = ""
    deadline = time.monotonic() + 60
    while f"fault: {point}" not in out and time.monotonic() < deadline:
        out += proc.stdout.readline()
    os.kill(proc.pid, signal.SIGTERM)
    return proc, out + proc.communicate(timeout=60)[0]


def test_signal_during_resume_loading_stops_after_one_step(tmp_path, finished):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    proc, out = _signal_inside(run_dir, "load", f"trainer.max_steps={STEPS + 10}")
    stop = events(run_dir, "preempted")[-1]
    assert proc.returncode == 143 and stop["step"] == STEPS + 1 and stop["checkpoint"], out


def test_signal_during_the_final_save_completes_the_run(tmp_path):
    proc, out = _signal_inside(tmp_path, "final_save", "trainer.max_steps=20")
    assert proc.returncode == 0 and events(tmp_path, "done"), out
    assert "arrived after the last step" in out


def test_signal_after_training_finished_loses_nothing(tmp_path):
    proc = start(tmp_path, "trainer.max_steps=20")
    deadline = time.monotonic() + 60
    while not events(tmp_path, "done") and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 0  # the run's own status: a TERM while it ends is held, then ends it so
    assert why_invalid(tmp_path / "checkpoints" / "step_00000020") is None
    code, log = run(tmp_path, "trainer.max_steps=20")
    assert code == 0 and events(tmp_path, "resumed")[-1]["step"] == 20


# The one bad-input batch: every case run by the real recipe, all in one process (recipe_batch.py).
# (override, words in the one error line, environment, on a finished run?). A case on a fresh run
# directory must leave none behind; one on a finished run must leave its checkpoints as they were.
FRESH, FINISHED = False, True
MISTYPED = "trainer.max_stepz=3"  # docs/testing.md says what a user sees: Hydra's own refusal, exit 1
BAD_INPUT = [
    (MISTYPED, ["max_stepz"], {}, FRESH),
    # a key that moved when the configuration got a node per part of the run names its new home
    ("trainer.max_time=5", ["trainer.max_time= moved: use stopping.max_time="], {}, FRESH),
    ("scheduler.requeue=false", ["scheduler.requeue= moved", "stopping.requeue"], {}, FRESH),
    ("trainer.max_steps=abc", ["trainer.max_steps='abc'"], {}, FRESH),
    ("checkpoint.interval=-5", ["checkpoint.interval=-5"], {}, FRESH),
    ("checkpoint.keep=0", ["checkpoint.keep=0"], {}, FRESH),
    ("signal_handler.sig=SIGNOPE", ["'SIGNOPE'"], {}, FRESH),
    ("signal_handler.sig=SIGSTOP", ["SIGSTOP cannot be caught"], {}, FRESH),
    ("stopping.stop_check=sometimes", ["stopping.stop_check='sometimes'"], {}, FRESH),
    ("stopping.requeue=maybe", ["stopping.requeue='maybe'"], {}, FRESH),
    ("stopping.max_time=-1", ["stopping.max_time=-1"], {}, FRESH),
    # values that would pass silently, and tracebacks where one line belongs
    ("stopping.max_time=nan", ["stopping.max_time=nan"], {}, FRESH),
    ("optim.lr=inf", ["optim.lr=inf"], {}, FRESH),
    ("signal_handler.escalate=2", ["signal_handler.escalate=2; expected true or false"], {}, FRESH),
    ("signal_handler.chain=maybe", ["chain='maybe'"], {}, FRESH),
    ("signal_handler.escalate_after=abc", ["escalate_after='abc'"], {}, FRESH),
    ("signal_handler.sig=SIGCHLD", ["SIGCHLD is not a stop request"], {}, FRESH),
    ("stopping.slurm_time_limit=no", ["stopping.slurm_time_limit='no'"], {}, FRESH),
    ("checkpoint.dir=ftp://host/x", ["ftp:// is not supported"], {}, FRESH),
    ("checkpoint.dir=gs://bucket/x", ["gs:// is not supported"], {}, FRESH),
    ("data.block_size=256", ["data.block_size=256 is longer than model.block_size="], {}, FRESH),
    ("optim.betas=abc", ["optim.betas='abc'"], {}, FRESH),
    (f"hydra.run.dir={tempfile.gettempdir()}/preemptible-hydra-run-dir", ["use run_dir="], {}, FRESH),
    # one per place a value is checked (every value: tests/unit/test_settings.py)
    ("stopping.grace_period=abc", ["stopping.grace_period='abc'"], {}, FRESH),   # a part of the run
    ("model.vocab_size=100", ["model.vocab_size=100 is too small"], {}, FRESH),  # against the data
    ("data.paths=[]", ["data.paths=[] lists no files"], {}, FRESH),              # a building block
    ("lr_schedule.warmup_steps=-3", ["lr_schedule.warmup_steps=-3"], {}, FRESH),  # a factory the recipe calls
    ("trainer.device=tpu", ["trainer.device='tpu'"], {}, FRESH),                 # the process group's set-up
    ("ownership.stale_after=0", ["ownership.stale_after=0"], {}, FRESH),
    ("checkpoint.interval=sometimes", ["checkpoint.interval='sometimes'; expected an int >= 0"], {}, FRESH),
    ("checkpoint.interrupt_every=0", ["checkpoint.interrupt_every=0; expected seconds > 0"], {}, FRESH),
    ("watchdog.timeout=0", ["watchdog.timeout=0; expected seconds > 0 and <= 1e+06 (or 'auto')"], {}, FRESH),
    ("watchdog.timeout=soon", ["watchdog.timeout='soon'"], {}, FRESH),
    ("watchdog.timeout=1e15", ["watchdog.timeout=1000000000000000.0; expected seconds > 0 and <= 1e+06"], {}, FRESH),
    ("report.log_file=OWNER", ["report.log_file='OWNER' is a name the run directory uses itself"], {}, FRESH),
    ("watchdog.factor=0.5", ["watchdog.factor=0.5"], {}, FRESH),
    ("report.log_every=1", ["LOCAL_RANK='zero'"], {"LOCAL_RANK": "zero"}, FRESH),  # garbage from the launcher
    # on a finished run: refused in one line, and nothing of it deleted
    ("signal_handler.sig=SIGFOO", ["signal_handler", "'SIGFOO'"], {}, FINISHED),
    ("checkpoint.dir={tmp}/a_file/sub", ["checkpoint.dir", "not writable"], {}, FINISHED),
    ("checkpoint.interval=-1", ["checkpoint.interval=-1"], {}, FINISHED),
    ("model.init_from={tmp}/nope", ["model.init_from", "does not exist"], {}, FINISHED),
    ("model.init_from={other}", ["model.init_from", "does not fit", "Size mismatch"], {}, FINISHED),
    ("checkpoint.resume={tmp}/nope", ["checkpoint.resume", "not a valid checkpoint"], {}, FINISHED),
    ("checkpoint.resume={other}", ["cannot honour", "model.n_embd: 16 -> 32"], {}, FINISHED),
    ("data.paths=[{tmp}/empty.txt]", ["data.paths", "0 bytes"], {}, FINISHED),
    ("trainer.max_steps=0", ["trainer.max_steps=0"], {}, FINISHED),
]


@pytest.fixture(scope="module")
def bad_input_env(tmp_path_factory):
    """A finished run to protect, a checkpoint of another model shape, a file, an empty text file."""
    root = tmp_path_factory.mktemp("bad_input")
    code, log = run(root / "run", "trainer.max_steps=3")
    assert code == 0, log
    code, log = run(root / "other", "trainer.max_steps=2", "model.n_embd=16")
    assert code == 0, log
    (root / "a_file").write_text("x")
    (root / "empty.txt").write_text("")
    return root


@pytest.fixture(scope="module")
def bad_input_results(bad_input_env, tmp_path_factory):
    other = bad_input_env / "other" / "checkpoints" / "step_00000002"
    cases = []
    for i, (override, _, env, finished) in enumerate(BAD_INPUT):
        run_dir = tmp_path_factory.mktemp(f"bad{i}") / ("run" if finished else "new")
        if finished:
            shutil.copytree(bad_input_env / "run", run_dir)
        cases.append((run_dir, [override.format(tmp=bad_input_env, other=other)], env))
    return [(run_dir, *result) for (run_dir, _, _), result in zip(cases, run_many(cases))]


@pytest.mark.parametrize("index", range(len(BAD_INPUT)), ids=[o for o, *_ in BAD_INPUT])
def test_bad_input_is_one_line_and_leaves_everything_as_it_was(bad_input_env, bad_input_results, index):
    run_dir, code, log = bad_input_results[index]
    override, words, _, finished = BAD_INPUT[index]
    assert "Traceback" not in log, log
    if override == MISTYPED:  # Hydra refuses an unknown key before the recipe runs: its message, its status
        assert code == 1 and "Could not override 'trainer.max_stepz'" in log and "is not in struct" in log, log
    else:
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1, log
        assert finished or log.strip().splitlines()[-1] == errors[0], log  # a fresh run: nothing after it
    for w in words:
        assert w in log
    if finished:
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
            sorted(p.name for p in (bad_input_env / "run" / "checkpoints").iterdir())
    else:
        assert not run_dir.exists(), list(run_dir.rglob("*"))


def test_random_preemptions_lose_nothing(tmp_path):
    """The CI subset of tests/faults/chaos.py (the full run: 24 interruptions, one command): 2 ranks
    (3 and 4 are tested by test_reliability's exact stop and resume; a third torchrun worker here
    costs a minute on 2 cores), a concurrent second run and going back forced in."""
    sys.path.insert(0, os.path.dirname(__file__))
    from chaos import chaos
    summary = chaos(tmp_path, interruptions=3, seed=3, steps=60, nproc=2, kinds=("second_run", "go_back"))
    assert summary["interruptions"] == 3
    assert summary["refused"] == 1  # the second run was tried while the first lived, and refused
