import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from preemptible import DistributedSignalHandler, all_gather_item, get_device, parse_signals
from preemptible.stopping import signal_handler as sh

S = signal.Signals


@pytest.mark.parametrize("spec, expected", [
    (signal.SIGTERM, (S.SIGTERM,)),
    (15, (S.SIGTERM,)),
    ("SIGUSR2", (S.SIGUSR2,)),
    ("usr2", (S.SIGUSR2,)),
    (" sigterm ", (S.SIGTERM,)),
    ("12", (S.SIGUSR2,)),
    (["SIGUSR2", signal.SIGTERM, 10], (S.SIGUSR2, S.SIGTERM, S.SIGUSR1)),
    (("int",), (S.SIGINT,)),
])
def test_accepted_signal_forms(spec, expected):
    assert parse_signals(spec) == expected
    assert DistributedSignalHandler(spec).signals == expected


@pytest.mark.parametrize("spec, words", [
    ("SIGFOO", ["Unknown signal name: 'SIGFOO'", "SIGUSR2"]),
    (9999, ["Invalid signal number: 9999", "not a signal"]),
    (signal.SIGKILL, ["SIGKILL", "cannot be caught"]),
    ("stop", ["SIGSTOP", "cannot be caught"]),
    (["SIGTERM", 15], ["Duplicate signals provided", "SIGTERM"]),
    ([], ["At least one signal must be provided"]),
    ("SIGCHLD", ["SIGCHLD is not a stop request"]),
    (True, ["bool"]),
    (1.5, ["1.5", "float"]),
    (None, ["NoneType"]),
])
def test_rejected_signal_forms_name_the_value_and_install_nothing(spec, words):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ValueError) as err:
        DistributedSignalHandler(spec)
    for w in words:
        assert w in str(err.value)
    assert signal.getsignal(signal.SIGTERM) is before


def test_release_semantics_and_original_restored():
    seen = []
    previous = lambda s, f: seen.append(s)  # noqa: E731
    signal.signal(signal.SIGUSR1, previous)
    try:
        handler = DistributedSignalHandler(signal.SIGUSR1)
        assert handler.release() is False  # never entered
        with handler as entered:
            assert entered is handler
            assert signal.getsignal(signal.SIGUSR1) == handler._handle
            assert handler.release() is True
            assert handler.release() is False
            assert signal.getsignal(signal.SIGUSR1) is previous
        with handler:  # re-entering after release works and starts clean
            assert handler.received == []
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert seen == []
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_os_kill_sets_the_flag_and_the_stop_decision():
    with DistributedSignalHandler(["SIGUSR1", "SIGUSR2"]) as handler:
        assert handler.signals_received() == [False]
        assert handler.should_stop() is False
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert handler.signals_received() == [True]
        assert handler.signals_by_rank() == [int(signal.SIGUSR2)]
        assert handler.should_stop() is True
        assert handler.received[0][0] == signal.SIGUSR2


def test_chain_calls_previous_python_handler():
    seen = []
    signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with DistributedSignalHandler(signal.SIGUSR1, chain=True) as handler:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
        assert seen == [signal.SIGUSR1] and handler.local_signal() == signal.SIGUSR1
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_failed_install_is_rolled_back(monkeypatch):
    real = signal.signal
    calls = []

    def flaky(signum, handler):
        calls.append(signum)
        if len(calls) == 2:
            raise OSError("simulated failure installing the second handler")
        return real(signum, handler)

    before = signal.getsignal(signal.SIGUSR1)
    monkeypatch.setattr(sh.signal, "signal", flaky)
    handler = DistributedSignalHandler(["SIGUSR1", "SIGUSR2"], escalate=False)
    with pytest.raises(OSError, match="second handler"):
        handler.__enter__()
    monkeypatch.setattr(sh.signal, "signal", real)
    assert signal.getsignal(signal.SIGUSR1) is before
    assert handler.release() is False


def test_enter_from_non_main_thread_is_a_clear_error():
    errors = []

    def enter():
        try:
            DistributedSignalHandler().__enter__()
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=enter)
    t.start()
    t.join()
    assert errors and "main thread" in errors[0]


def test_enter_twice_is_a_clear_error():
    with DistributedSignalHandler(signal.SIGUSR1) as handler:
        with pytest.raises(RuntimeError, match="entered twice"):
            handler.__enter__()


def test_bad_keyword_values():
    with pytest.raises(ValueError, match="check_every=0"):
        DistributedSignalHandler(check_every=0)
    with pytest.raises(ValueError, match="local_rank=-1"):
        DistributedSignalHandler(local_rank=-1)
    with pytest.raises(ValueError, match="group 3"):
        DistributedSignalHandler(group=3)
    with pytest.raises(ValueError, match="group 'glue'.*gloo"):
        DistributedSignalHandler(group="glue")


def test_all_gather_item_without_dist():
    assert all_gather_item(True, torch.int32) == [True]
    assert all_gather_item(3, torch.int64, async_op=True).wait() == [3]
    assert get_device() == torch.device("cpu")


ESCALATION = textwrap.dedent("""
    import os, signal, sys, time
    from preemptible import DistributedSignalHandler
    with DistributedSignalHandler("SIGUSR2", escalate_after=0.2) as h:
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert h.received, "first delivery not recorded"
        print("first recorded", flush=True)
        os.kill(os.getpid(), signal.SIGUSR2)   # a twin delivery inside the window: no escalation
        time.sleep(0.5)
        print("twin ignored", flush=True)
        os.kill(os.getpid(), signal.SIGUSR2)   # a real repeat: escalate
        time.sleep(10)
    print("survived", flush=True)
""")


def test_second_signal_escalates_to_stack_dump_and_original_disposition():
    proc = subprocess.run([sys.executable, "-c", ESCALATION], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGUSR2, proc.stderr
    assert "first recorded" in proc.stdout and "twin ignored" in proc.stdout
    assert "survived" not in proc.stdout
    assert "received again" in proc.stderr
    assert "Current thread" in proc.stderr or "Thread 0x" in proc.stderr


def test_second_signal_with_ignored_original_only_dumps():
    code = ESCALATION.replace("import os, signal, sys, time",
                              "import os, signal, sys, time\nsignal.signal(signal.SIGUSR2, signal.SIG_IGN)")
    code = code.replace("time.sleep(10)", "time.sleep(0.5)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "survived" in proc.stdout and "received again" in proc.stderr


def test_get_device_backends(monkeypatch):
    # Mocks only for backends this machine lacks.
    from preemptible.distributed import collectives

    monkeypatch.setattr(collectives, "_dist_ready", lambda: True)
    # the documented behaviour (NeMo Automodel's): nccl -> cuda[:local_rank], gloo -> cpu, else RuntimeError
    for backend, local_rank, expected in [("gloo", None, "cpu"), ("nccl", None, "cuda"), ("nccl", 3, "cuda:3")]:
        monkeypatch.setattr(sh.dist, "get_backend", lambda group=None, b=backend: b)
        assert get_device(local_rank) == torch.device(expected)
    for backend in ("mpi", "cpu:gloo,cuda:nccl"):
        monkeypatch.setattr(sh.dist, "get_backend", lambda group=None, b=backend: b)
        with pytest.raises(RuntimeError, match=rf"'{backend}'.*'nccl'.*'gloo'"):
            get_device()
    # this module's own collectives take CPU tensors wherever the backend has a gloo part
    monkeypatch.setattr(sh.dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    assert sh._collective_device(1) == torch.device("cpu")


def test_automodels_own_mocks_are_answered_as_automodel_answers_them(monkeypatch):
    """Tests written against NeMo Automodel's module mock torch.distributed with its own call shapes:
    get_backend() alone says the backend (is_initialized not patched), get_world_size() and
    get_backend() take no positional group, and the flag is the attribute `_signal_received`."""
    calls = []
    monkeypatch.setattr(sh.dist, "get_backend", lambda: calls.append("get_backend") or "nccl")
    assert get_device(2) == torch.device("cuda:2") and calls == ["get_backend"]
    monkeypatch.setattr(sh.dist, "get_backend", lambda: "mpi")
    with pytest.raises(RuntimeError, match="'mpi'"):
        get_device()
    monkeypatch.setattr(sh.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(sh.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(sh.dist, "get_world_size", lambda: 3)  # no group argument at all

    def all_gather(out, tensor, group=None, async_op=False):
        for o in out:
            o.copy_(tensor)

    monkeypatch.setattr(sh.dist, "all_gather", all_gather)
    assert all_gather_item(True, torch.int32) == [True, True, True]
    handler = DistributedSignalHandler(signal.SIGUSR1)
    assert handler._signal_received is False
    handler._signal_received = True
    assert handler.signals_received() == [True, True, True] and handler.received[0][0] == signal.SIGUSR1
    handler._signal_received = False
    assert handler.signals_received() == [False, False, False]


PROGRESS = textwrap.dedent("""
    import os, signal, threading, time
    from preemptible import DistributedSignalHandler, heartbeat
    writing = threading.Event()
    writing.set()

    def save():  # a checkpoint being written: progress every 50 ms
        while writing.is_set():
            heartbeat.beat()
            time.sleep(0.05)

    with DistributedSignalHandler("SIGUSR2", escalate_after=0.2) as h:
        os.kill(os.getpid(), signal.SIGUSR2)
        t = threading.Thread(target=save)
        t.start()
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGUSR2)   # a real repeat, while the save makes progress
        time.sleep(1.5)
        print("the save survived the repeat", flush=True)
        writing.clear()
        t.join()
        time.sleep(5)                          # no progress any more: the armed escalation fires
    print("survived", flush=True)
""")


def test_a_repeat_during_progress_waits_and_fires_once_progress_stops():
    proc = subprocess.run([sys.executable, "-c", PROGRESS], capture_output=True, text=True, timeout=60)
    assert "the save survived the repeat" in proc.stdout, proc.stderr
    assert proc.returncode == -signal.SIGUSR2 and "survived\n" not in proc.stdout.replace("repeat\n", "")
    assert "received again" in proc.stderr and "no progress for" in proc.stderr


def test_stall_window_follows_the_step_time():
    h = DistributedSignalHandler("SIGUSR2", escalate_after=0.5)
    assert h.stall_seconds() == 0.5
    h._steps.seconds = 2.0  # 2-second steps: a step that is still computing is not a stall
    assert h.stall_seconds() == 6.0


def _early(code):
    import subprocess
    import sys
    import textwrap

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_signals_held_during_start_up_are_taken_over_by_the_handler():
    proc = _early("""
        from preemptible.stopping.early import hold_signals
        hold_signals()
        import os, signal, time
        os.kill(os.getpid(), signal.SIGTERM)   # while "importing torch"
        time.sleep(0.05)
        from preemptible import DistributedSignalHandler
        with DistributedSignalHandler("SIGTERM") as h:
            print("received", [s for s, _ in h.received], h.should_stop())
    """)
    assert proc.returncode == 0 and "received [15] True" in proc.stdout, proc.stderr


def test_a_held_signal_nobody_handles_acts_as_it_would_have():
    proc = _early("""
        from preemptible.stopping.early import hold_signals
        hold_signals()
        import os, signal, time
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        print("still alive", flush=True)
        from preemptible import DistributedSignalHandler
        with DistributedSignalHandler("SIGTERM"):   # USR2 is not its signal: delivered again now
            time.sleep(1)
        print("not reached")
    """)
    assert proc.returncode == -12 and "still alive" in proc.stdout and "not reached" not in proc.stdout
    proc = _early("""
        from preemptible.stopping.early import hold_signals, release_held
        hold_signals()
        import os, signal, time
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        release_held()                              # a run without signal handling
        time.sleep(1)
        print("not reached")
    """)
    assert proc.returncode == -15 and "not reached" not in proc.stdout
