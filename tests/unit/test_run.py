"""preemptible.Run in one process: its promises with real signals sent to this process.
(Under torchrun with several ranks: tests/e2e/test_examples.py and the recipe's tests.)"""

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import preemptible
from preemptible import Checkpointer, ConfigError, Notices, Ownership, Report, Run, Stopping, params_sha256


def parts(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    data = StatefulDataLoader(TensorDataset(torch.randn(40, 4), torch.randn(40, 1)), batch_size=4, shuffle=True)
    return model, opt, sched, data


def train(run_dir, steps=12, signal_at=None, eval_stop_at=None, sig=signal.SIGTERM, stop_file_at=None, interval=5,
          **stopping):
    """One run of a small loop; a real signal to this process after step `signal_at`; with
    `eval_stop_at`, the signal arrives during an eval phase after that step."""
    model, opt, sched, data = parts()
    scaler_like = torch.amp.GradScaler("cpu")
    run = Run(run_dir, model=model, optimizer=opt, scheduler=sched, data=data, state={"scaler": scaler_like},
              values={"best": 1e9, "seen": []}, max_steps=steps, checkpoint=Checkpointer(interval=interval),
              stopping=Stopping(**stopping))
    with run:
        for x, y in run.batches():
            if eval_stop_at is not None and run.step == eval_stop_at:
                torch.rand(3)  # an eval that draws random numbers: a resume must not see them
                os.kill(os.getpid(), sig)
                if run.should_stop():
                    break
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            run.values["best"] = min(run.values["best"], loss.item())
            run.values["seen"].append(run.step + 1)
            if signal_at is not None and run.step + 1 == signal_at:
                os.kill(os.getpid(), sig)
            if stop_file_at is not None and run.step + 1 == stop_file_at:
                (Path(run_dir) / "STOP").touch()
                while run.notices.notice is None:  # the poller's thread sees it within poll_seconds
                    time.sleep(0.005)
            run.step_done(loss=loss)
    return run, params_sha256(model)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run, digest = train(tmp_path_factory.mktemp("ref") / "run", signals=None)
    assert run.exit_code == 0 and run.step == 12
    return digest, dict(run.values)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_a_signal_stops_saves_and_the_same_call_resumes_exactly(tmp_path, reference, sig, code):
    run, _ = train(tmp_path / "run", signal_at=7, sig=sig)
    assert (run.exit_code, run.step, run.stop.reason) == (code, 7, sig.name)
    assert run.last_checkpoint.name == "step_00000007"
    run, digest = train(tmp_path / "run")
    assert run.resumed_from.name == "step_00000007" and run.exit_code == 0
    assert digest == reference[0]
    assert run.values == reference[1]  # plain values came back (and kept being updated)


def test_a_stop_during_an_eval_saves_the_step_boundary_and_resumes_exactly(tmp_path, reference):
    run, _ = train(tmp_path / "run", eval_stop_at=6)
    assert run.stop is not None and run.step == 6 and run.exit_code == 143
    run, digest = train(tmp_path / "run")
    assert run.resumed_from.name == "step_00000006" and digest == reference[0]


def test_a_stop_file_stops_like_a_signal_and_is_cleared_at_the_resume(tmp_path, reference):
    from preemptible import Notices

    run, _ = train(tmp_path / "run", stop_file_at=7, notices=Notices(poll_seconds=0.01))
    assert (run.exit_code, run.step, run.stop.reason) == (75, 7, "notice (stop_file)")
    assert run.last_checkpoint.name == "step_00000007" and (tmp_path / "run" / "STOP").exists()
    run, digest = train(tmp_path / "run", notices=Notices(poll_seconds=0.01))
    assert run.resumed_from.name == "step_00000007" and run.exit_code == 0 and digest == reference[0]
    assert not (tmp_path / "run" / "STOP").exists()


def test_notices_default_on_and_off(tmp_path):
    from preemptible import Notices

    model = torch.nn.Linear(1, 1)
    assert isinstance(Run(tmp_path / "a", model=model).notices, Notices)  # the stop file, by default
    assert Run(tmp_path / "b", model=model, stopping=Stopping(notices=None)).notices is None
    assert Run(tmp_path / "c", model=model, stopping=Stopping(signals=None)).notices is None  # nothing could agree on it


def test_no_signal_handling_when_asked(tmp_path):
    run, _ = train(tmp_path / "run", steps=3, signals=None)
    assert run.handler is None and run.exit_code == 0


def test_an_exception_in_the_loop_saves_nothing_and_releases(tmp_path):
    model, opt, sched, data = parts()
    run = Run(tmp_path / "run", model=model, optimizer=opt, data=data, max_steps=10,
              checkpoint=Checkpointer(interval=2))
    with pytest.raises(ZeroDivisionError):
        with run:
            for _ in run.batches():
                opt.step()
                run.step_done()
                if run.step == 3:
                    1 / 0
    assert run.exit_code == 1
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert not (tmp_path / "run" / "OWNER").exists()  # the lease is released
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are restored


def test_a_failed_start_leaves_nothing_behind(tmp_path):
    model, opt, _, _ = parts()
    run = Run(tmp_path / "new" / "run", model=model, optimizer=opt,
              checkpoint=Checkpointer(resume=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="resume="):
        with run:
            pass
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("arguments, words", [  # made inside pytest.raises: a part checks itself when made
    (lambda: dict(checkpoint=Checkpointer(interval=-1)), "interval=-1"),
    (lambda: dict(checkpoint=Checkpointer(keep=0)), "keep=0"),
    (lambda: dict(checkpoint=Checkpointer(resume="")), "resume=''"),
    (lambda: dict(checkpoint=Checkpointer(dir="")), "dir=''"),
    (lambda: dict(max_steps=-1), "max_steps=-1"),
    (lambda: dict(stopping=Stopping(stop_check="vote")), "stop_check='vote'"),
    (lambda: dict(stopping=Stopping(grace_period=0)), "grace_period=0"),
    (lambda: dict(stopping=Stopping(exit_code_on_stop=300)), "exit_code_on_stop=300"),
    (lambda: dict(report=Report(log_every=0)), "log_every=0"),
    (lambda: dict(report=Report(log_file="OWNER")), "log_file='OWNER' is a name the run directory uses itself"),
    (lambda: dict(report=Report(log_file="metrics.jsonl")), "log_file='metrics.jsonl' is a name the run directory"),
    (lambda: dict(report=Report(log_file="OWNER.takeover")), "log_file='OWNER.takeover' is a name"),
    (lambda: dict(stopping=Stopping(max_time=-5)), "max_time=-5"),
    (lambda: dict(stopping=Stopping(requeue="maybe")), "requeue='maybe'"),
    (lambda: dict(ownership=Ownership(wait=-1)), "wait=-1"),
    (lambda: dict(ownership=Ownership(stale_after=0)), "stale_after=0"),
    (lambda: dict(stopping=Stopping(signals="SIGNOPE")), "signals='SIGNOPE'"),
    (lambda: dict(stopping=Stopping(signals="SIGKILL")), "SIGKILL cannot be caught"),
    (lambda: dict(state={"ema": 3}), "state['ema']=int"),
    (lambda: dict(state={"model_optim": torch.nn.Linear(1, 1)}), "state key 'model_optim'"),
    (lambda: dict(values=[1]), "values=[1]"),
    (lambda: dict(data=5), "data=int"),
    (lambda: dict(scheduler=object()), "scheduler=object"),
    (lambda: dict(report=Report(param_digests="sometimes")), "param_digests='sometimes'"),
    (lambda: dict(stopping=Stopping(max_time=10, signals=None)), "need signal handling"),
    (lambda: dict(stopping=Stopping(notices="aws")), "notices='aws'; expected a preemptible.Notices, 'default' or None"),
    (lambda: dict(stopping=Stopping(notices=Notices(cloud="aws"), signals=None)), "need signal handling to agree on the stop step"),
    # values that would pass silently: nan never fires a limit, a string is not a bool
    (lambda: dict(stopping=Stopping(max_time=float("nan"))), "max_time=nan; expected seconds > 0 or null (a finite value)"),
    (lambda: dict(stopping=Stopping(save_guess=float("nan"))), "save_guess=nan"),
    (lambda: dict(stopping=Stopping(margin=float("inf"))), "margin=inf"),
    (lambda: dict(stopping=Stopping(grace_period=float("nan"))), "grace_period=nan"),
    (lambda: dict(ownership=Ownership(wait=float("nan"))), "wait=nan"),
    (lambda: dict(ownership=Ownership(stale_after=float("inf"))), "stale_after=inf"),
    (lambda: dict(stopping=Stopping(slurm_time_limit="no")), "slurm_time_limit='no'; expected true or false"),
    (lambda: dict(checkpoint=Checkpointer(dir=123)), "dir=123; expected a directory path"),
    (lambda: dict(stopping=Stopping(signals="SIGCHLD")), "SIGCHLD is not a stop request"),
    (lambda: dict(stopping=Stopping(signals=["SIGTERM", "SIGWINCH"])), "SIGWINCH is not a stop request"),
    # one line, not a traceback later
    (lambda: dict(stopping=Stopping(signals=object())), "signals=<object object at"),
    (lambda: dict(checkpoint=object()), "checkpoint=object; expected a preemptible.Checkpointer"),
    (lambda: dict(stopping=Stopping(max_latency="x")), "max_latency='x'; expected seconds > 0"),
    (lambda: dict(stopping=Stopping(stop_check="gradients")), "stop_check=gradients needs a DDP model"),
    (lambda: dict(checkpoint=Checkpointer(meta={"when": __import__("datetime").datetime(2026, 1, 1)})), "meta['when'] is not JSON data"),
    (lambda: dict(checkpoint=Checkpointer(meta={"files": 1})), "meta key 'files'"),
    (lambda: dict(values={"best": __import__("numpy").float32(1.5)}), "run.values['best']=np.float32(1.5) (float32) is not plain data"),
    (lambda: dict(values={"when": __import__("fractions").Fraction(1, 3)}), "run.values['when']=Fraction(1, 3)"),
    (lambda: dict(optimizer=torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1)), "optimizer= holds 2 parameter(s)"),
    # an argument that became part of a part names where it lives now
    (lambda: dict(interval=3), "Run(interval=...) moved to a part of Run: pass checkpoint=Checkpointer(interval=...)"),
    (lambda: dict(handler=None), "pass stopping=Stopping(signals=<the handler>)"),
    (lambda: dict(lease_wait=5), "pass ownership=Ownership(wait=...)"),
    (lambda: dict(seed=7), "Run(seed=...) is no longer an argument: after a resume on another world size the RNG "
                           "streams are reseeded from the checkpoint's lineage, step and rank"),
    (lambda: dict(bogus=1), "Run() got an unknown argument bogus="),
])
def test_bad_arguments_name_the_argument_and_write_nothing(tmp_path, arguments, words):
    with pytest.raises(ConfigError) as e:
        Run(tmp_path / "run", model=torch.nn.Linear(1, 1), **arguments())
    assert words in str(e.value)
    assert not (tmp_path / "run").exists()


def test_a_value_no_resume_could_load_is_refused_at_the_assignment_and_at_the_save(tmp_path):
    """np.float32 saves fine but no resume loads it: refused where it is assigned, and (changed in
    place inside a list) at the save; the checkpoints that exist stay resumable."""
    import numpy as np

    model = torch.nn.Linear(1, 1)
    run = Run(tmp_path / "run", model=model, values={"seen": []}, max_steps=3,
              checkpoint=Checkpointer(interval=1), stopping=Stopping(signals=None))
    with pytest.raises(ConfigError, match=r"run.values\['best'\]=np.float32\(1.5\) \(float32\)"):
        with run:
            run.values["best"] = np.float32(1.5)
    assert "best" not in run.values
    run = Run(tmp_path / "run2", model=model, values={"seen": []}, max_steps=3,
              checkpoint=Checkpointer(interval=1), stopping=Stopping(signals=None))
    with pytest.raises(ConfigError, match=r"run.values\['seen'\]"):
        with run:
            run.step_done()
            run.values["seen"].append(np.float64(2.0) * np.ones(1)[0].astype(np.float16))
            run.step_done()
    run = Run(tmp_path / "run2", model=model, values={"seen": []}, max_steps=3,
              checkpoint=Checkpointer(interval=1), stopping=Stopping(signals=None))
    with run:  # resumes from step 1, the last checkpoint that holds only plain values
        assert run.step == 1 and run.values["seen"] == []


def test_optimizer_without_model_and_bad_dir_are_refused():
    with pytest.raises(ConfigError, match="optimizer= needs model="):
        Run("x", optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1))
    with pytest.raises(ConfigError, match="dir=None"):
        Run(None)


def test_methods_outside_the_block_say_so(tmp_path):
    run = Run(tmp_path / "run", model=torch.nn.Linear(1, 1))
    with pytest.raises(RuntimeError, match="inside `with run:`"):
        run.step_done()
    with pytest.raises(RuntimeError, match="before the run began"):
        run.exit()


def test_automodel_names_work_unchanged():
    """NeMo Automodel's step scheduler imports SignalLike and resolve_signal and reads `sigs`."""
    from preemptible.stopping.signal_handler import DistributedSignalHandler, SignalLike, resolve_signal

    assert SignalLike.__args__ == (int, str, signal.Signals)
    assert resolve_signal("usr2") is resolve_signal("SIGUSR2") is resolve_signal(12) is signal.SIGUSR2
    assert resolve_signal(signal.SIGTERM) is signal.SIGTERM and resolve_signal(" sigint ") is signal.SIGINT
    with pytest.raises(ValueError):
        resolve_signal("SIGNOPE")
    with pytest.raises(ValueError):
        resolve_signal(99999)
    with pytest.raises(TypeError):
        resolve_signal(1.5)
    handler = DistributedSignalHandler([signal.SIGUSR2, "term"])
    assert handler.sigs == [signal.SIGUSR2, signal.SIGTERM] and handler.sig is signal.SIGUSR2


def test_public_names_are_documented():
    """Every public name has a row of its own in docs/api.md's table of public names."""
    text = open(os.path.dirname(__file__) + "/../../docs/api.md").read()
    rows = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `")]
    missing = [name for name in preemptible.__all__ if not any(f"`{name}`" in r or f"`{name}(" in r for r in rows)]
    assert not missing, f"docs/api.md does not document {missing}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def test_a_resume_says_what_it_cannot_know(tmp_path, caplog):
    """Legal but maybe unmeant: the loop's own data (data=None) starts over; a second run directory
    sharing another run's checkpoint_dir continues that run. Each says so in one warning."""
    import logging

    shared = str(tmp_path / "ckpts")
    for run_dir in ("first", "first", "second"):
        run = Run(tmp_path / run_dir, model=torch.nn.Linear(1, 1), max_steps=None,
                  checkpoint=Checkpointer(interval=0, dir=shared), stopping=Stopping(signals=None))
        with caplog.at_level(logging.WARNING, logger="preemptible.run"):
            caplog.clear()
            with run:
                run.step_done()
        said = " ".join(r.getMessage() for r in caplog.records)
        if run.resumed_from is None:
            assert "data= was not given" not in said
            continue
        assert "data= was not given: data the loop reads on its own starts from its beginning again" in said
        assert ("written by the run in" in said) == (run_dir == "second"), said


def test_one_stopping_serves_several_runs_in_turn(tmp_path):
    """A part made once (at the top of a script) and given to one Run after another: each Run gets a
    signal handler and notices of its own (a Notices polls for one run only)."""
    stopping = Stopping(max_time=3600)
    handlers = []
    for steps in (2, 4):
        run = Run(tmp_path / "run", model=torch.nn.Linear(1, 1), max_steps=steps, stopping=stopping,
                  checkpoint=Checkpointer(interval=0))
        with run:
            while run.step < steps:
                run.step_done()
        assert run.exit_code == 0 and run.step == steps
        handlers.append((run.handler, run.notices))
    assert handlers[0][0] is not handlers[1][0] and handlers[0][1] is not handlers[1][1]


def test_run_takes_the_training_objects_and_a_few_parts():
    import inspect

    named = [n for n, p in inspect.signature(Run).parameters.items() if p.kind is not p.VAR_KEYWORD]
    assert named == ["dir", "model", "optimizer", "scheduler", "data", "state", "values", "max_steps",
                     "checkpoint", "stopping", "ownership", "tracker", "report", "watchdog"]  # 14


def test_paths_are_taken_wherever_a_directory_is(tmp_path):
    """Checkpointer(dir=, resume=) take a Path as Run(dir) does."""
    model = torch.nn.Linear(1, 1)
    run = Run(tmp_path / "run", model=model, data=range(10), max_steps=2, stopping=Stopping(signals=None),
              checkpoint=Checkpointer(dir=tmp_path / "ckpt", interval=1))
    with run:
        for _ in run.batches():
            run.step_done()
    again = Run(tmp_path / "run2", model=model, data=range(10), max_steps=3, stopping=Stopping(signals=None),
                checkpoint=Checkpointer(resume=tmp_path / "ckpt" / "step_00000002"))
    with again:
        assert again.step == 2


def test_a_file_where_the_watchdog_keeps_its_beats_is_one_line(tmp_path):
    """<run dir>/watchdog being a file: one ConfigError naming it, not a FileExistsError (the
    beat files are kept there only with more than one rank; the Watcher is built alike)."""
    from preemptible.stopping.watchdog import Ender, Watcher, Watchdog

    (tmp_path / "watchdog").write_text("mine")
    ender = Ender(tmp_path, 0, lambda: 0, lambda: None, lambda: False, record=lambda row: None)
    with pytest.raises(ConfigError, match="watchdog is a file; the watchdog keeps each rank's beat file"):
        Watcher(Watchdog(timeout=5), ender, world_size=2, save_seconds=lambda: 0.0).start()
    assert (tmp_path / "watchdog").read_text() == "mine"
