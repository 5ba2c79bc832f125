"""A real single-node SLURM (slurmctld + slurmd + munge from Debian's packages), started and
stopped by the tests themselves; see ../shared/notes/slurm.md for the choices."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "munged", "munge")
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
        "DEADLINE"}

CONF = """ClusterName=citest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
CredType=cred/munge
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
StateSaveLocation={root}/state/ctld
SlurmdSpoolDir={root}/state/d
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
InactiveLimit=0
OverTimeLimit=0
Waittime=0
MessageTimeout=10
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
SlurmctldParameters=preempt_send_user_signal
MailProg=/bin/true
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=10
PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


def missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _cpus() -> int:
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True).stdout
    for token in out.split():
        if token.startswith("CPUs="):
            return int(token[5:])
    return os.cpu_count() or 1


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "etc" / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs: list[subprocess.Popen] = []
        self.cpus = _cpus()

    def run(self, *cmd: str, check: bool = True) -> str:
        out = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
        return out.stdout

    def start(self) -> "Cluster":
        for d in ("etc", "state/ctld", "state/d", "run", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONF.format(root=self.root, cpus=self.cpus, ctld_port=6817, d_port=6818))
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode != 0:
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
            for _ in range(50):
                if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(self.conf)], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)
        self.procs.append(subprocess.Popen(["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a SLURM daemon died; logs in {self.root / 'log'}")
            state = self.run("sinfo", "-h", "-n", "localhost", "-o", "%T", check=False).strip()
            if state == "idle":
                return self
            time.sleep(0.2)
        raise RuntimeError(f"node never became idle (last state {state!r}); logs in {self.root / 'log'}")

    def stop(self) -> None:
        self.run("scancel", "--full", "--user=root", check=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.run("squeue", "-h", "-t", "R,CG", "-o", "%i", check=False).strip():
            time.sleep(0.3)
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True,
                             env={**self.env, **(env or {})}, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        fields: dict[str, str] = {}
        for token in out.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {self.job(job_id)}")
