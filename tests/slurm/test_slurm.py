"""The recipe under a real SLURM: signal, requeue, resume; partition preemption; time limit."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipe_helpers import REPO, TINY, events, losses, lrs, run, wait_for_step
from slurm_cluster import DONE

pytestmark = pytest.mark.slow
SBATCH = REPO / "examples" / "slurm" / "finetune.sbatch"
STEPS = 300


def submit(cluster, run_dir: Path, *sbatch_args, overrides=(), env=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    return cluster.sbatch("--ntasks=2", f"--output={run_dir}/slurm-%j.out", "--open-mode=append", f"--chdir={REPO}",
                          *sbatch_args, str(SBATCH), *TINY, "report.log_every=1", *overrides,
                          env={"PYTHON": sys.executable, "RUN_DIR": str(run_dir), "OMP_NUM_THREADS": "1",
                               "PYTHONUNBUFFERED": "1", **(env or {})})


def job_log(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in run_dir.glob("slurm-*.out"))


class _Job:  # what wait_for_step needs from a process
    def __init__(self, cluster, jid):
        self.cluster, self.jid, self.returncode = cluster, jid, None

    def poll(self):
        state = self.cluster.job(self.jid).get("JobState")
        return None if state in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED") else state

    @property
    def stdout(self):
        return type("S", (), {"read": staticmethod(lambda: str(self.cluster.job(self.jid)))})()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("slurm-ref")
    code, log = run(run_dir, f"trainer.max_steps={STEPS}", nproc=2)
    assert code == 0, log
    return run_dir


def assert_resumed_equal(run_dir, reference, restarts):
    done = events(run_dir, "done")
    assert done, job_log(run_dir)
    assert done[-1]["params_sha256"] == events(reference, "done")[-1]["params_sha256"]
    assert losses(run_dir) == losses(reference) and lrs(run_dir) == lrs(reference)
    assert len(events(run_dir, "resumed")) >= restarts


def test_usr2_checkpoint_requeue_resume_then_a_notice_requeues_alike(cluster, tmp_path, reference):
    """USR2 to the batch shell: both tasks stop at one step, rank 0 requeues, the job resumes; then
    the stop file (a notice) in the requeued job: the same (exit 75, requeued again), and the stop
    file is removed by the next start; the job completes equal to the uninterrupted run."""
    jid = submit(cluster, tmp_path, "--requeue", overrides=[f"trainer.max_steps={STEPS}", "notices.poll_seconds=0.2"])
    wait_for_step(tmp_path, 20, _Job(cluster, jid))
    cluster.run("scancel", "--signal=USR2", "--batch", jid)  # as --signal=B:USR2@N delivers it
    deadline = time.monotonic() + 180
    while not events(tmp_path, "resumed") and time.monotonic() < deadline:
        time.sleep(0.1)
    first = events(tmp_path, "preempted")[0]
    wait_for_step(tmp_path, first["step"] + 30, _Job(cluster, jid))
    (tmp_path / "STOP").touch()
    info = cluster.wait(jid, {"COMPLETED"}, timeout=240)
    assert int(info["Restarts"]) == 2
    preempted = events(tmp_path, "preempted")
    assert preempted[0]["signal"] == "SIGUSR2" and set(preempted[0]["ranks"]) == {"0", "1"}
    assert preempted[1]["signal"] == "notice (stop_file)" and preempted[1]["ranks"] == {"0": "notice (stop_file)"}
    log = job_log(tmp_path)
    assert "forwarding to the tasks" in log and "restart 1" in log and "restart 2" in log
    assert "tasks exited with status 140" in log  # USR2: 128 + 12, as the README's table says
    assert "tasks exited with status 75" in log and not (tmp_path / "STOP").exists()
    assert_resumed_equal(tmp_path, reference, restarts=2)


def test_partition_preemption(cluster, tmp_path, reference):
    jid = submit(cluster, tmp_path, "--requeue", "--partition=debug", "--signal=B:USR2@600",
                 overrides=[f"trainer.max_steps={STEPS}"])
    wait_for_step(tmp_path, 20, _Job(cluster, jid))
    high = cluster.sbatch("--partition=high", f"--ntasks={cluster.cpus}", f"--output={tmp_path}/high-%j.out",
                          "--wrap", "sleep 3")
    cluster.wait(high, {"COMPLETED"}, timeout=120)
    info = cluster.wait(jid, {"COMPLETED"}, timeout=180)
    assert int(info["Restarts"]) >= 1
    # preempt_send_user_signal: SLURM sends the job's --signal (USR2, to the batch shell, which forwards
    # it) first, TERM only after GraceTime; the stop must come from the USR2
    assert events(tmp_path, "preempted")[0]["signal"] == "SIGUSR2", job_log(tmp_path)
    assert "tasks exited with status 140" in job_log(tmp_path)
    assert_resumed_equal(tmp_path, reference, restarts=1)


def task_pid(run_dir: Path, rank: int, timeout: float = 60) -> int:
    """The pid of the srun task of `rank` running the recipe on `run_dir` (this node's /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                env = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if f"run_dir={run_dir}".encode() in cmd and f"RANK={rank}".encode() in env and b"bash" not in cmd[0]:
                return int(proc.name)
        time.sleep(0.2)
    raise TimeoutError(f"no task of rank {rank} for {run_dir}")


def test_a_frozen_task_is_found_by_the_watchdog_and_the_job_requeued(cluster, tmp_path, reference):
    """SIGSTOP to one srun task (no agent to notice): rank 0's watchdog ends it after 10 s with its
    stacks, requeues the job (--requeue), and the requeued job resumes and completes equal to the
    uninterrupted run."""
    jid = submit(cluster, tmp_path, "--requeue", overrides=[f"trainer.max_steps={STEPS}", "watchdog.timeout=10",
                                                          "checkpoint.interval=10"])
    wait_for_step(tmp_path, 20, _Job(cluster, jid))
    os.kill(task_pid(tmp_path, 1), signal.SIGSTOP)
    info = cluster.wait(jid, {"COMPLETED", "FAILED"}, timeout=300)
    log = job_log(tmp_path)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, log
    hung = [e for e in events(tmp_path, "hung") if e["signal"] == "hung"]
    assert hung and hung[0]["rank"] == 0 and (tmp_path / hung[0]["stacks"]).is_file(), log
    assert "requeued the SLURM job" in log
    assert_resumed_equal(tmp_path, reference, restarts=1)


def test_a_suspended_job_is_not_a_hung_one(cluster, tmp_path, reference):
    """`scontrol suspend` (SLURM's own SIGSTOP to every process of the job, as PreemptMode=SUSPEND
    and gang scheduling do) for three times the watchdog's timeout, then `scontrol resume`: the job
    carries on without a restart and completes equal to the uninterrupted run."""
    jid = submit(cluster, tmp_path, "--requeue", overrides=[f"trainer.max_steps={STEPS}", "watchdog.timeout=3"],
                 env={"PREEMPTIBLE_FAULTS": '[{"at": "step", "sleep": 0.02}]'})  # the stop lands mid-run
    wait_for_step(tmp_path, 50, _Job(cluster, jid))
    cluster.run("scontrol", "suspend", jid)
    assert cluster.wait(jid, {"SUSPENDED"}, timeout=30)
    time.sleep(10)
    cluster.run("scontrol", "resume", jid)
    info = cluster.wait(jid, {"COMPLETED", "FAILED"}, timeout=240)
    log = job_log(tmp_path)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 0, log
    assert not events(tmp_path, "hung") and "this process was stopped for" in log, log
    assert_resumed_equal(tmp_path, reference, restarts=0)


def test_time_limit_signal(cluster, tmp_path):
    """--time=1 --signal=B:USR2@30: SLURM itself sends USR2 when 30 s are left, or up to 60 s earlier
    (its event resolution), so by 30 s into the job. Step 20 of each run takes 30 s (a fault: a
    step that long, on every rank), so run 1 is inside it when USR2 comes, whatever this machine's
    speed; the stop checkpoints and requeues, and the requeued run does the rest (a USR2 that comes
    before it is done requeues it once more, as SLURM would)."""
    started, steps = time.monotonic(), 40  # the requeued run's 20 steps fit before its own USR2 on a busy machine
    jid = submit(cluster, tmp_path, "--requeue", "--time=1", "--signal=B:USR2@30",
                 overrides=[f"trainer.max_steps={steps}", "stopping.slurm_time_limit=false"],
                 env={"PREEMPTIBLE_FAULTS": '[{"at": "step", "step": 20, "sleep": 30}]'})
    info = cluster.wait(jid, {"COMPLETED", "TIMEOUT", "FAILED"}, timeout=400)
    log = job_log(tmp_path)
    assert info["JobState"] == "COMPLETED", log
    preempted = events(tmp_path, "preempted")
    assert preempted and preempted[0]["signal"] == "SIGUSR2", log
    assert events(tmp_path, "done") and len(events(tmp_path, "resumed")) >= 1
    assert sorted(losses(tmp_path)) == list(range(1, steps + 1))
    assert time.monotonic() - started < 400


def test_the_jobs_end_time_stops_the_run_with_124(cluster, tmp_path):
    """--time=1 and no signal from SLURM: the run reads the job's end time itself and stops while a
    step, a save and the 5 s margin still fit, with a committed checkpoint and status 124, before
    SLURM's own kill (the job ends FAILED with 124, not TIMEOUT)."""
    # The sbatch file asks USR2 180 s before the end (that would come at once): ask a signal its batch
    # shell ignores instead (URG), so the job's end time is the only warning.
    jid = submit(cluster, tmp_path, "--no-requeue", "--time=1", "--signal=B:URG@1",
                 overrides=["trainer.max_steps=100000"],
                 env={"PREEMPTIBLE_FAULTS": '[{"at": "step", "sleep": 0.05}]'})
    info = cluster.wait(jid, DONE, timeout=180)
    log = job_log(tmp_path)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "124:0", (info, log)
    assert "tasks exited with status 124" in log, log
    preempted = events(tmp_path, "preempted")
    assert preempted and preempted[0]["signal"] == "time limit" and preempted[0]["checkpoint"], log
    assert (Path(preempted[0]["checkpoint"]) / "COMMITTED").exists()


def _in_job(cluster, tmp_path, code: str, *args) -> str:
    out = tmp_path / "out.txt"
    jid = cluster.sbatch("--ntasks=1", f"--output={out}", *args, "--wrap", f"{sys.executable} -c '{code}'",
                         env={"PYTHONPATH": str(REPO / "src")})
    cluster.wait(jid, {"COMPLETED", "FAILED"}, timeout=60)
    return out.read_text().strip()


def test_end_time_and_requeue_allowed_from_inside_a_job(cluster, tmp_path):
    code = "from preemptible.stopping import slurm; import time; print(round(slurm.job_end_time() - time.time()), slurm.requeue_allowed())"
    left, allowed = _in_job(cluster, tmp_path, code, "--time=5", "--requeue").split()
    assert 240 <= int(left) <= 300 and allowed == "True"
    left, allowed = _in_job(cluster, tmp_path, code, "--time=5", "--no-requeue").split()
    assert allowed == "False"
