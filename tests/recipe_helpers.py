"""Drive the real recipe in real processes (python or torchrun) and read what it leaves behind."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from distributed_helpers import free_port
from zygote import Forked

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "finetune.py"
# Small enough that a step is milliseconds on 2 oversubscribed cores.
TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "data.batch_size=4",
        "data.max_bytes=200000", "report.log_every=1", "lr_schedule.warmup_steps=5",
        # Millisecond steps: agree every step so tests can aim signals at steps (the default,
        # check_every=auto, is tested on its own: a stop within max_latency seconds).
        "signal_handler.check_every=1"]


def command(run_dir, *overrides, nproc=1, nnodes=1, node_rank=0, port=None, launcher_args=(), launcher=False):
    """The recipe's command line: plain python for one process, torchrun otherwise (or if asked)."""
    tiny = TINY if "signal_handler=none" not in overrides else [o for o in TINY if not o.startswith("signal_handler.")]
    args = [str(RECIPE), f"run_dir={run_dir}", *tiny, *overrides]
    if nproc == 1 and nnodes == 1 and not launcher:
        return [sys.executable, *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *launcher_args]
    if nnodes == 1:
        launcher += ["--standalone"]
    else:
        launcher += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--rdzv_backend=c10d",
                     f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test"]
    return launcher + args


def start(run_dir, *overrides, nproc=1, env=None, fresh=False, **kw):
    """The recipe in a process of its own. One process (plain python) is forked from the tests'
    pre-imported zygote unless `fresh` (a test of the start itself: signals during the imports)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    started = time.time()
    cmd = command(run_dir, *overrides, nproc=nproc, **kw)
    if cmd[0] == sys.executable and cmd[1] == str(RECIPE) and not fresh:
        proc = Forked(cmd[1:], env, str(REPO))
    else:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    proc.started_at = started  # wait_for_step: a progress record older than this is an earlier run's
    return proc


def run(run_dir, *overrides, nproc=1, timeout=240, **kw):
    proc = start(run_dir, *overrides, nproc=nproc, **kw)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def head(run_dir):
    """The checkpoint `checkpoints/latest` names as the run's head."""
    return json.loads((Path(run_dir) / "checkpoints" / "latest").read_text())["checkpoint"]


def rows(run_dir):
    """metrics.jsonl's rows; safe while the run writes (a line without its newline yet is left out)."""
    from preemptible.observe.metrics import read_metrics

    return read_metrics(Path(run_dir) / "metrics.jsonl")


def losses(run_dir):
    """step -> loss; after a crash a step may appear twice: the later line is the one that counts."""
    return {r["step"]: r["loss"] for r in rows(run_dir) if "event" not in r}


def lrs(run_dir):
    """step -> the learning rate logged at that step (the later line of a repeated step counts)."""
    return {r["step"]: r["lr"] for r in rows(run_dir) if "event" not in r and "lr" in r}


def events(run_dir, name=None):
    return [r for r in rows(run_dir) if "event" in r and (name is None or r["event"] == name)]


def reached(run_dir, since=0.0):
    """The step the run has reached: its progress record (rewritten every step) if written since
    `since` (a left-over one from an earlier run does not count), else its rows."""
    import json

    progress = Path(run_dir) / "progress.json"
    try:
        if progress.stat().st_mtime >= since:
            return json.loads(progress.read_text().strip())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    done = losses(run_dir)
    return max(done) if done else 0


def wait_for_step(run_dir, step, proc, timeout=120):
    deadline = time.monotonic() + timeout
    since = getattr(proc, "started_at", time.time())
    while time.monotonic() < deadline:
        now = reached(run_dir, since)
        if now >= step:
            return now
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before step {step}:\n{proc.stdout.read()}")
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached in {timeout}s")


def children(pid):
    """Direct child PIDs (torchrun's workers), from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def worker_pids_by_rank(agent_pid, world, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = {}
        for child in children(agent_pid):
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in environ:
                if item.startswith(b"RANK="):
                    ranks[int(item[5:])] = child
        if len(ranks) == world:
            return ranks
        time.sleep(0.1)
    raise TimeoutError("workers not found")


def interrupt_at(run_dir, step, *overrides, sig=signal.SIGTERM, nproc=1, rank=None, timeout=240):
    """Start a run, send `sig` once it has logged `step` (to one worker if `rank` is given)."""
    proc = start(run_dir, *overrides, nproc=nproc)
    target = proc.pid if rank is None else worker_pids_by_rank(proc.pid, nproc)[rank]
    wait_for_step(run_dir, step, proc)
    os.kill(target, sig)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def exit_codes(torchrun_output):
    """Every worker's exit status, from torchrun's failure report (torchrun itself exits 1 then)."""
    import re

    return [int(c) for c in re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", torchrun_output, re.M)]


def run_many(cases, timeout=600):
    """[(run_dir, [overrides], {env})] -> [(exit status, output)], every case run by the real recipe's
    main() in ONE process (tests/scripts/recipe_batch.py): for cases that fail at start, whose point
    is the one error line and the exit status, not a process of their own each (seconds of imports)."""
    payload = [{"argv": command(run_dir, *overrides)[2:], "env": dict(env or {})} for run_dir, overrides, env in cases]
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "recipe_batch.py")], cwd=REPO,
                          input=json.dumps(payload), capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases), f"the batch ended early ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return [(r["code"], r["stdout"] + r["stderr"]) for r in results]
