"""One owner per run directory: real processes hold, lose and fight over the lease."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from preemptible.errors import CheckpointError, ConfigError
from preemptible.ownership.lease import LEASE, RunLease

import preemptible

# The lease needs nothing from torch: the helper processes load only preemptible.ownership (and
# preemptible.errors), not the package's __init__, so each starts in a fraction of a second.
LEAN = textwrap.dedent(f"""
    import sys, types
    package = types.ModuleType("preemptible")
    package.__path__ = [{os.path.dirname(preemptible.__file__)!r}]
    sys.modules["preemptible"] = package
""")

HOLDER = LEAN + textwrap.dedent("""
    import sys, time
    from preemptible.ownership.lease import RunLease
    lease = RunLease(sys.argv[1], wait=0, stale_after=float(sys.argv[2])).acquire()
    print("owned", flush=True)
    time.sleep(float(sys.argv[3]))
    lease.release()
""")


def hold(directory, stale_after=3.0, seconds=60.0):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), str(stale_after), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "owned"
    return proc


def test_a_second_run_fails_naming_the_owner(tmp_path):
    owner = hold(tmp_path)
    try:
        started = time.monotonic()
        with pytest.raises(ConfigError) as e:
            RunLease(tmp_path, wait=1.0, stale_after=3.0).acquire()
        assert 1.0 <= time.monotonic() - started < 5
        text = str(e.value)
        assert f"pid {owner.pid}" in text and "host" in text and "since" in text and "waited 1s" in text
        assert json.loads((tmp_path / LEASE).read_text())["pid"] == owner.pid  # untouched
    finally:
        owner.kill()
        owner.wait()


def test_a_second_run_waits_for_the_owner_to_finish(tmp_path):
    owner = hold(tmp_path, seconds=1.5)
    lease = RunLease(tmp_path, wait=30, stale_after=3.0).acquire()  # the requeue case: the old job still saves
    assert owner.wait(timeout=10) == 0
    assert json.loads((tmp_path / LEASE).read_text())["pid"] == os.getpid()
    lease.release()
    assert not (tmp_path / LEASE).exists()


def test_a_killed_owner_never_blocks_the_next_run(tmp_path):
    owner = hold(tmp_path, stale_after=600)
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    started = time.monotonic()
    lease = RunLease(tmp_path, wait=0, stale_after=600).acquire()  # same host, pid gone: at once
    assert time.monotonic() - started < 1
    lease.release()


def test_a_dead_owner_on_another_host_expires_after_stale_after(tmp_path):
    (tmp_path / LEASE).write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "since": time.time(), "beat": 7}))
    started = time.monotonic()
    lease = RunLease(tmp_path, wait=10, stale_after=1.0).acquire()
    assert 1.0 <= time.monotonic() - started < 5
    lease.release()


def test_a_live_owner_on_another_host_is_waited_for(tmp_path):
    path = tmp_path / LEASE
    path.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "beat": 0}))
    stop = threading.Event()

    def renew():  # that host's renewals (its clock need not match ours)
        beat = 0
        while not stop.wait(0.2):
            beat += 1
            path.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "beat": beat}))

    t = threading.Thread(target=renew)
    t.start()
    try:
        with pytest.raises(ConfigError, match="node-elsewhere"):
            RunLease(tmp_path, wait=2.0, stale_after=1.0).acquire()
    finally:
        stop.set()
        t.join()


def test_the_owner_renews_and_notices_a_takeover(tmp_path):
    lease = RunLease(tmp_path, wait=0, stale_after=0.6).acquire()
    first = json.loads((tmp_path / LEASE).read_text())
    time.sleep(0.5)
    assert json.loads((tmp_path / LEASE).read_text())["beat"] > first["beat"]
    lease.check()
    (tmp_path / LEASE).write_text(json.dumps({"host": "intruder", "pid": 5, "token": "x"}))
    with pytest.raises(CheckpointError, match="intruder"):
        lease.check()
    lease.release()
    assert "intruder" in (tmp_path / LEASE).read_text()  # not ours: left alone


def test_racing_newcomers_take_a_stale_lease_once(tmp_path):
    (tmp_path / LEASE).write_text(json.dumps({"host": "node-elsewhere", "pid": 1}))
    racer = LEAN + textwrap.dedent("""
        import sys, time
        from preemptible.ownership.lease import RunLease
        from preemptible.errors import ConfigError
        try:
            lease = RunLease(sys.argv[1], wait=3, stale_after=0.5).acquire()
        except ConfigError:
            print("refused", flush=True)
        else:
            print("owned", flush=True)
            time.sleep(6)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", racer, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outcomes = sorted(p.stdout.readline().strip() for p in procs)
    for p in procs:
        p.kill()
        p.wait()
    assert outcomes == ["owned", "refused", "refused"]


@pytest.mark.parametrize("kwargs, words", [({"wait": -1}, "wait=-1"), ({"stale_after": 0}, "stale_after=0"),
                                           ({"wait": "x"}, "wait='x'"), ({"heartbeat": 50}, "heartbeat=50")])
def test_bad_lease_settings_name_the_argument(tmp_path, kwargs, words):
    with pytest.raises(ConfigError, match=words):
        RunLease(tmp_path, **kwargs)


@pytest.mark.skipif(os.geteuid() != 0 or not __import__("shutil").which("unshare"),
                    reason="a second PID namespace needs root and unshare(1)")
def test_an_owner_in_another_pid_namespace_on_the_same_host_is_judged_by_its_renewals(tmp_path):
    """Containers share a hostname but not pid numbers: the owner, pid 1 of its own PID namespace
    (`unshare --pid --fork --mount-proc`), is alive and renewing; the newcomer here sees pid 1 as
    another process (init), which must not count as the owner's death. Once the owner is killed,
    its lease goes stale after stale_after seconds without renewals, and is taken over."""
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-c", HOLDER,
                             str(tmp_path), "2", "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "owned"
        owner = json.loads((tmp_path / LEASE).read_text())
        assert owner["pid"] == 1 and owner["pidns"] != os.readlink("/proc/self/ns/pid")
        with pytest.raises(ConfigError, match="is in use by another run"):
            RunLease(tmp_path, wait=3.0, stale_after=2.0).acquire()  # 1.5x stale_after: renewals seen
        assert json.loads((tmp_path / LEASE).read_text())["token"] == owner["token"]
    finally:
        proc.kill()  # --kill-child: the owner (pid 1 there) dies with unshare
        proc.wait()
    started = time.monotonic()
    lease = RunLease(tmp_path, wait=10.0, stale_after=2.0).acquire()
    try:
        assert 1.5 <= time.monotonic() - started < 8  # judged by its renewals stopping, not by a pid
    finally:
        lease.release()


@pytest.mark.skipif(os.geteuid() != 0 or not __import__("shutil").which("unshare"),
                    reason="a private mount needs root and unshare(1)")
def test_a_read_only_remount_keeps_the_runs_one_line_error(tmp_path):
    """The run directory's filesystem goes read-only mid-run: the final save fails with one line,
    and the lease (which cannot be removed now) does not replace that error with its own."""
    script = tmp_path / "ro.py"
    script.write_text(textwrap.dedent("""
        import os, subprocess, sys, torch
        from preemptible import Checkpointer, Run
        mnt = sys.argv[1]
        run = Run(os.path.join(mnt, "run"), model=torch.nn.Linear(1, 1), max_steps=3, checkpoint=Checkpointer(interval=0))
        try:
            with run:
                for _ in range(3):
                    run.step_done()
                    if run.step == 2:
                        subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
        except Exception as e:
            print("ERROR", type(e).__name__, str(e).splitlines()[0])
    """))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", f"mount -t tmpfs tmpfs {mnt} && "
                           f"{sys.executable} {script} {mnt}"], capture_output=True, text=True, timeout=120)
    assert "ERROR CheckpointError checkpoint step_00000003 could not be written" in proc.stdout, proc.stdout + proc.stderr
    assert "Read-only file system" in proc.stdout and "could not be removed" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


WAITER = textwrap.dedent("""
    import sys, torch, preemptible
    run = preemptible.Run(sys.argv[1], model=torch.nn.Linear(1, 1), ownership=preemptible.Ownership(wait=60))
    with run:
        print("started", flush=True)
""")


def test_a_stop_signal_while_waiting_for_the_owner_ends_the_wait_with_one_line(tmp_path):
    """TERM while a run waits for another run's lease: the wait ends at once, one line says why,
    then the signal acts as it would have (the process ends on it); nothing was created."""
    owner = hold(tmp_path, stale_after=600)
    try:
        waiter = subprocess.Popen([sys.executable, "-c", WAITER, str(tmp_path)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        seen = []
        while not seen or "in use by" not in seen[-1]:
            seen.append(waiter.stdout.readline())
            assert seen[-1], f"the waiter ended before it waited: {seen}"
        waiter.send_signal(signal.SIGTERM)
        started = time.monotonic()
        out = "".join(seen) + waiter.communicate(timeout=30)[0]
        assert waiter.returncode == -signal.SIGTERM and time.monotonic() - started < 5
        lines = [line for line in out.splitlines() if "SIGTERM while waiting for the run directory's owner" in line]
        assert len(lines) == 1 and f"pid {owner.pid}" in lines[0] and "nothing was started or saved" in lines[0], out
        assert json.loads((tmp_path / LEASE).read_text())["pid"] == owner.pid  # untouched
    finally:
        owner.kill()
        owner.wait()


def test_the_holder_tells_a_released_or_taken_lease_and_cannot_tell_an_unseen_one(tmp_path):
    """Holder (every rank's "does this run still own its directory"): yes while the token is the
    lease's; no once it is released or another run's; yes where the lease was never visible (a
    run directory not shared with rank 0's machine: nothing to compare with)."""
    from preemptible.ownership.lease import Holder

    lease = RunLease(tmp_path, wait=0, stale_after=3.0).acquire()
    holder, elsewhere = Holder(tmp_path, lease.token), Holder(tmp_path / "not-shared", lease.token)
    assert holder() and holder.recent() and elsewhere()
    lease.release()
    assert not holder() and elsewhere()
    successor = RunLease(tmp_path, wait=0, stale_after=3.0).acquire()
    assert not holder() and Holder(tmp_path, successor.token)()
    successor.release()
