"""The exit guard for gloo's worker threads (see preemptible.distributed.let_gloo_workers_finish).

The abort it prevents is a race (a gloo worker releasing a collective's tensors after the caller
moved on, while the interpreter finalizes: SIGABRT at exit in ~7 % of 2-rank DDP runs here);
these tests pin what the guard relies on: the worker threads are found by name, and the guard
runs at exit in any process that imported preemptible.
"""

import subprocess
import sys
import textwrap

import pytest

from distributed_helpers import free_port
from preemptible.names import LEASE
from zygote import run_python

_GLOO_WORLD_OF_ONE = """
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}")
dist.init_process_group("gloo", rank=0, world_size=1)
out = [torch.zeros(1)]
dist.all_gather(out, torch.ones(1))
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_gloo_worker_threads_are_found_by_name():
    code = "from preemptible.distributed.env import _gloo_workers_alive\nprint('before', _gloo_workers_alive())\n"
    code += _GLOO_WORLD_OF_ONE.format(port=free_port())
    code += "print('during', _gloo_workers_alive())\ndist.destroy_process_group()\nprint('after', _gloo_workers_alive())\n"
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    # without DDP holding it, destroy_process_group joins the workers
    assert proc.stdout.split() == ["before", "False", "during", "True", "after", "False"]


def test_importing_preemptible_changes_nothing_process_wide():
    """Importing every module of the library: no atexit hooks, signal handlers, warning filters, serialization globals, hooks or log handlers."""
    code = textwrap.dedent("""
        import atexit, faulthandler, logging, signal, sys, threading, warnings
        # torch's own modules (they register safe globals and warning filters of their own on import)
        import torch, torch.distributed.checkpoint, torch.distributed.tensor, torchdata.stateful_dataloader
        def snapshot():
            return (atexit._ncallbacks(), [signal.getsignal(s) for s in signal.valid_signals()
                                           if s not in (signal.SIGKILL, signal.SIGSTOP)],
                    list(warnings.filters), list(torch.serialization.get_safe_globals()), sys.excepthook,
                    threading.excepthook, faulthandler.is_enabled(), list(logging.getLogger().handlers),
                    logging.getLogger().level, signal.set_wakeup_fd(-1))
        before = snapshot()
        import importlib, pkgutil, preemptible
        for m in pkgutil.walk_packages(preemptible.__path__, "preemptible."):  # every module of the library
            importlib.import_module(m.name)
        after = snapshot()
        print("same" if before == after else f"changed: {before} -> {after}")
    """)
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "same"


def test_a_run_lets_gloo_workers_finish_when_it_ends(tmp_path):
    """The guard the import used to register: a Run calls it itself, after its last collective."""
    code = "import preemptible, preemptible.distributed.env as pd, torch\n"
    code += _GLOO_WORLD_OF_ONE.format(port=free_port())
    code += textwrap.dedent(f"""
        sleep = pd.time.sleep
        def noted(seconds):
            print('guard released the GIL for', seconds, flush=True)
            sleep(seconds)
        pd.time.sleep = noted
        model = torch.nn.Linear(2, 2)
        run = preemptible.Run({str(tmp_path / "run")!r}, model=model, stopping=preemptible.Stopping(signals=None), max_steps=1)
        with run:
            run.step_done()
        print('exit code', run.exit_code)
    """)
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert "guard released the GIL for 0.1" in proc.stdout and "exit code 0" in proc.stdout


def test_late_term_and_int_after_a_finished_run_end_it_with_its_own_status(tmp_path):
    """TERM and INT arriving while the `with run:` block ends (the handler released, the lease not
    yet: the window is hit by sending them from inside it), after it (the run is done and committed),
    and during run.exit(): the process ends with the run's status 0, not a signal death (-15), and
    the run ended whole (its lease released: the next run starts at once)."""
    for when in ("while_leaving", "before_exit", "during_exit"):
        code = textwrap.dedent(f"""
            import atexit, os, signal, time, torch, preemptible
            import preemptible.run.ending as ending
            if {when!r} == "while_leaving":  # inside _leave, after the handler's release
                ending.let_gloo_workers_finish = lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.1))
            run = preemptible.Run({str(tmp_path / when)!r}, model=torch.nn.Linear(1, 1), max_steps=2)
            with run:
                while run.step < 2:
                    run.step_done()
            late = lambda: (os.kill(os.getpid(), signal.SIGTERM), os.kill(os.getpid(), signal.SIGINT), time.sleep(0.1))
            if {when!r} == "during_exit":
                atexit.register(late)
            else:
                late()
            run.exit()
        """)
        proc = run_python(["-c", code], timeout=120)  # behaviour, not a fresh interpreter's finalization
        assert proc.returncode == 0, (when, proc.returncode, proc.stderr[-2000:])
        assert not (tmp_path / when / LEASE).exists(), when  # released, not cut short


LIFECYCLE_LOOP = """
import os, signal, sys, torch, preemptible
{setup}
run = preemptible.Run(sys.argv[1], model=torch.nn.Linear(1, 1), max_steps=int(sys.argv[2]),
                      checkpoint=preemptible.Checkpointer(interval=0))
with run:
    while run.step < run.max_steps:
        run.step_done()
        if run.step == 3 and sys.argv[3] == "term":
            os.kill(os.getpid(), signal.SIGTERM)
            run.step_done()
            break
run.exit()
"""


def test_lifecycle_lines_on_stderr_with_no_logging_configured_and_silenced_on_request(tmp_path):
    """No logging set up: a stop, a resume, the end and running a finished run again each say so in
    a line on stderr; configuring logging (or a level for 'preemptible') is the way to silence them."""
    def go(steps, mode, setup=""):
        proc = run_python(["-c", LIFECYCLE_LOOP.format(setup=setup), str(tmp_path / "run"), str(steps), mode],
                          timeout=120)
        return proc.returncode, proc.stderr

    code, err = go(6, "term")
    assert code == 143 and "preemptible: stopped at step 4 on SIGTERM; checkpoint" in err, err
    code, err = go(6, "")
    assert code == 0 and "preemptible: resumed from" in err and "at step 4" in err, err
    assert "preemptible: done at step 6; checkpoint" in err and "step_00000006" in err, err
    code, err = go(6, "")
    assert code == 0 and "preemptible: already finished at step 6" in err, err
    code, err = go(6, "", setup="import logging; logging.getLogger('preemptible').setLevel(logging.WARNING)")
    assert code == 0 and "already finished" not in err and "resumed from" not in err, err


@pytest.mark.parametrize("signalled", [False, True])
def test_an_end_that_fails_after_the_handler_is_released_gives_the_signals_back(tmp_path, monkeypatch, signalled):
    """The final close fails (CheckpointError): the signals the end held act as before the run again,
    and a Ctrl-C that arrived while they were held is delivered (KeyboardInterrupt), not lost."""
    import os
    import signal

    import torch

    from preemptible import CheckpointError, Checkpointer, Run

    def failing_close(self):
        if signalled:
            os.kill(os.getpid(), signal.SIGINT)  # held: the end is under way
        raise CheckpointError("the save in flight failed")

    monkeypatch.setattr(Checkpointer, "close", failing_close)
    # The dispositions of a plain Python process (a test runner's worker, or a Run before this one in
    # the same process, may have left others: a finished Run keeps its late-signal handlers).
    outer = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
             signal.SIGTERM: signal.signal(signal.SIGTERM, signal.SIG_DFL)}
    try:
        before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        run = Run(tmp_path, model=torch.nn.Linear(1, 1), max_steps=2)
        with pytest.raises(KeyboardInterrupt if signalled else CheckpointError):
            with run:
                while run.step < 2:
                    run.step_done()
        assert {s: signal.getsignal(s) for s in before} == before
    finally:
        for s, disposition in outer.items():
            signal.signal(s, disposition)
    assert not (tmp_path / LEASE).exists()
