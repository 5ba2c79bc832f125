"""What the SLURM helpers read from a job's environment (no SLURM needed for these)."""

import pytest

from preemptible.stopping import slurm
from preemptible.stopping.vote import Deadline


def test_job_id_is_array_task_aware(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    assert slurm.job_id() is None and slurm.requeue() is False
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    assert slurm.job_id() == "1234"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert slurm.job_id() == "1200_7"


def test_end_time_from_the_environment(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_END_TIME", "1900000000")
    assert slurm.job_end_time() == 1900000000.0


def test_deadline_keeps_a_step_and_a_save_in_hand(monkeypatch):
    import time
    now = time.time()
    assert not Deadline(None).expired()
    d = Deadline(now + 100, margin=5)
    d.step_seconds = 10
    assert not d.expired(save_seconds=30)   # 100 s left > 10 + 30 + 5
    assert d.expired(save_seconds=90)       # a save of 90 s no longer fits
    assert Deadline(now + 40, margin=5).expired(30) is False
    assert Deadline(now + 30, margin=5).expired(30) is True
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="margin="):
            Deadline(now, margin=bad)
