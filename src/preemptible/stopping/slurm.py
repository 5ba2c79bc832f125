"""SLURM: when the job ends, and requeueing it once its checkpoint is durable.

Everything here is read from the job's environment or asked of `scontrol`/`squeue`; outside
SLURM every function answers None/False and does nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from datetime import datetime
from typing import Optional

log = logging.getLogger("preemptible.slurm")  # the name users filter on (stable across moves)


def job_id() -> Optional[str]:
    """The id to requeue: `ARRAYJOB_TASK` for an array task, else the job id; None outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def _scontrol_job(jid: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip() or f"scontrol exited {out.returncode}")
    fields: dict[str, str] = {}
    for token in out.stdout.split():
        key, _, value = token.partition("=")
        fields.setdefault(key, value)
    return fields


def job_end_time() -> Optional[float]:
    """Unix time at which SLURM ends this job (its time limit), or None if unknown/unlimited."""
    env = os.environ.get("SLURM_JOB_END_TIME")
    if env and env.isdigit():
        return float(env)
    jid = job_id()
    if not jid or shutil.which("scontrol") is None:
        return None
    try:
        end = _scontrol_job(jid).get("EndTime", "")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("slurm: could not read the job's end time (%s); time-limit stops disabled", e)
        return None
    if not end or end in ("Unknown", "None"):
        return None
    return datetime.strptime(end, "%Y-%m-%dT%H:%M:%S").timestamp()


def requeue_allowed() -> bool:
    jid = job_id()
    if not jid or shutil.which("scontrol") is None:
        return False
    try:
        return _scontrol_job(jid).get("Requeue") == "1"
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("slurm: could not ask whether the job may be requeued (%s)", e)
        return False


def requeue() -> bool:
    """`scontrol requeue` this job (array-task aware); True if SLURM accepted it."""
    jid = job_id()
    if not jid:
        return False
    out = subprocess.run(["scontrol", "requeue", jid], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        log.warning("slurm: scontrol requeue %s failed: %s", jid, out.stderr.strip())
        return False
    log.info("slurm: requeued job %s", jid)
    return True
