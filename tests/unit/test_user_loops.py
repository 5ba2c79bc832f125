"""Loops as users write them, in one process with real signals: prefetching the next batch
(nanoGPT's idiom), a plain batch function drawing from torch's RNG, and a loop without `with`."""

import os
import signal

import pytest
import torch
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from preemptible import Checkpointer, ConfigError, Run, Stopping, params_sha256

STEPS, ACCUM = 10, 2


def loader():
    g = torch.Generator().manual_seed(1)
    return StatefulDataLoader(TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)),
                              batch_size=4, shuffle=True)  # shuffled from torch's global RNG, which Run restores


def rng_batches():
    """nanoGPT's get_batch as a generator: its only state is torch's global RNG."""
    data = torch.arange(400.0)
    while True:
        ix = torch.randint(len(data) - 5, (4,))
        x = torch.stack([data[i:i + 4] for i in ix]) / 400
        yield x, x.sum(1, keepdim=True)


def prefetching_loop(run_dir, make_data, ahead=1, term_at=None, declared=None, module_level=False):
    """nanoGPT's shape: the first batch before the loop; inside, grad accumulation that pulls the
    next batch right after each forward; dropout draws from the RNG; one step_done per step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    run = Run(run_dir, model=model, optimizer=opt, data=make_data(), max_steps=STEPS,
              checkpoint=Checkpointer(interval=3))
    losses = []
    if module_level:
        run.start()
    else:
        run.__enter__()
    try:
        batches = run.batches(ahead=ahead if declared is None else declared)
        x, y = next(batches)
        while run.step < STEPS and not run.stopping:
            for _ in range(ACCUM):
                loss = torch.nn.functional.mse_loss(model(x), y) / ACCUM
                x, y = next(batches)  # the next micro-batch (or the next step's first) while the GPU would work
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 6))
            if term_at is not None and run.step + 1 == term_at:
                os.kill(os.getpid(), signal.SIGTERM)
            run.step_done(loss=loss)
    except BaseException as e:  # what `with` would do (a module-level script just ends the process)
        run.__exit__(type(e), e, e.__traceback__)
        raise
    run.finish()
    return run, losses, params_sha256(model)


@pytest.mark.parametrize("data", [loader, rng_batches], ids=["StatefulDataLoader", "rng_generator"])
def test_a_prefetching_loop_resumes_bit_identically(tmp_path, data):
    ref, ref_losses, ref_digest = prefetching_loop(tmp_path / "ref", data)
    assert ref.exit_code == 0 and len(ref_losses) == STEPS
    stopped, first, _ = prefetching_loop(tmp_path / "run", data, term_at=5)
    assert stopped.exit_code == 143 and stopped.step == 5
    resumed, rest, digest = prefetching_loop(tmp_path / "run", data)
    assert resumed.resumed_from.name == "step_00000005" and resumed.exit_code == 0
    assert first + rest == ref_losses and digest == ref_digest


def test_an_undeclared_prefetch_is_refused_at_the_second_step_naming_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"holds 1 batch\(es\) ahead .* iterate run.batches\(ahead=1\)"):
        prefetching_loop(tmp_path / "run", loader, declared=0)
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))  # nothing saved with a wrong position


def test_a_loop_at_module_level_with_start_and_exit_is_exact_too(tmp_path):
    ref = prefetching_loop(tmp_path / "ref", loader, module_level=True)
    stopped = prefetching_loop(tmp_path / "run", loader, term_at=4, module_level=True)
    assert stopped[0].exit_code == 143
    resumed = prefetching_loop(tmp_path / "run", loader, module_level=True)
    assert stopped[1] + resumed[1] == ref[1] and resumed[2] == ref[2]


def test_a_plain_iterable_is_accepted_and_its_restart_is_said(tmp_path, caplog):
    import logging

    model = torch.nn.Linear(4, 1)
    data = [(torch.full((2, 4), float(i)), torch.ones(2, 1)) for i in range(3)]
    seen = []
    for steps in (2, 4):
        run = Run(tmp_path / "run", model=model, data=data, max_steps=steps, checkpoint=Checkpointer(interval=0),
                  stopping=Stopping(signals=None))
        with caplog.at_level(logging.WARNING, logger="preemptible.run"), run:
            for x, y in run.batches():
                seen.append(float(x[0, 0]))
                run.step_done()
    assert run.step == 4 and seen == [0.0, 1.0, 0.0, 1.0]  # the second run began the list again
    assert any("has no state_dict(): it starts again from its beginning" in r.getMessage() for r in caplog.records)


def test_start_exit_and_batches_misuse_are_named(tmp_path):
    run = Run(tmp_path / "run", model=torch.nn.Linear(1, 1), data=[1, 2], stopping=Stopping(signals=None))
    with pytest.raises(RuntimeError, match="between run.start"):
        run.step_done()
    run.start()
    with pytest.raises(ConfigError, match=r"batches\(ahead=-1\)"):
        next(run.batches(ahead=-1))
    run.finish()
    run.finish()  # once; a no-op after
    assert run.exit_code == 0


KILLED_LOOP = """
import os, signal, sys, torch
from preemptible import Checkpointer, Report, Run
run = Run(sys.argv[1], model=torch.nn.Linear(1, 1), max_steps=100, checkpoint=Checkpointer(interval=20),
          report=Report(log_every=10))
with run:
    while run.step < 100:
        run.step_done(loss=torch.tensor(1.0))
        if run.step == 47:
            os.kill(os.getpid(), signal.SIGKILL)  # between two flushes of the metrics rows
"""


def test_a_kill_between_metrics_flushes_is_reported_at_the_step_it_happened(tmp_path):
    """SIGKILL at step 47 (rows are flushed every 10): the next start finds no record of the end,
    says killed at 47 from the progress record, and that 7 steps (from the checkpoint at 40) are redone;
    status and plot say so too."""
    import subprocess
    import sys

    from preemptible.observe.export import format_status, status
    from preemptible.observe.metrics import read_metrics
    from preemptible.observe.plot import interruptions

    proc = subprocess.run([sys.executable, "-c", KILLED_LOOP, str(tmp_path / "run")], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert max(r["step"] for r in read_metrics(tmp_path / "run") if "event" not in r) == 40  # rows lag the kill
    run = Run(tmp_path / "run", model=torch.nn.Linear(1, 1), max_steps=50, checkpoint=Checkpointer(interval=0),
              stopping=Stopping(signals=None))
    with run:
        while run.step < 50:
            run.step_done()
    killed = [r for r in read_metrics(tmp_path / "run") if r.get("event") == "killed"]
    assert [(k["reached"], k["step"], k["redone"]) for k in killed] == [(47, 40, 7)]
    # When the killed process was alive (its start, its step 47), for interval='auto''s estimate.
    steps = [r["time"] for r in read_metrics(tmp_path / "run") if "event" not in r]
    assert killed[0]["alive_from"] < steps[0] and steps[39] < killed[0]["alive_until"] < killed[0]["time"]
    assert "7 step(s) trained again from step 40" in format_status(status(tmp_path / "run"))
    assert [(i.reason, i.stop_step, i.resume_step) for i in interruptions(tmp_path / "run")] == [("killed", 47, 40)]


def test_a_loader_with_a_generator_of_its_own_is_exact_across_the_next_epoch(tmp_path):
    """StatefulDataLoader(shuffle=True, generator=g): the resumed iterator's creation draws a base
    seed from g that the uninterrupted run never drew; the run puts g back as it was at the step
    boundary, so the epoch after the resumed one is shuffled the same. 16 batches per epoch, 20 steps."""
    def make():
        g = torch.Generator().manual_seed(1)
        return StatefulDataLoader(TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)),
                                  batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2))

    def train(run_dir, term_at=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        run = Run(run_dir, model=model, optimizer=opt, data=make(), max_steps=20,
                  checkpoint=Checkpointer(interval=3))
        seen = []
        with run:
            for x, y in run.batches():
                seen.append(round(float(x[0, 0]), 5))
                if term_at is not None and run.step + 1 == term_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                run.step_done()
        return seen

    ref = train(tmp_path / "ref")
    assert train(tmp_path / "run", term_at=5) + train(tmp_path / "run") == ref


WITHOUT_HYDRA = """
import importlib.abc, os, signal, sys
class Refuse(importlib.abc.MetaPathFinder):  # as if Hydra, OmegaConf and torchdata were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("hydra", "omegaconf", "torchdata"):
            raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)")
sys.meta_path.insert(0, Refuse())
import torch
from preemptible import Run
def batches():
    while True:
        x = torch.randn(4, 4)
        yield x, x.sum(1, keepdim=True)
for attempt in ("stop", "go"):  # stopped by TERM at step 3, then resumed to the end
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = Run(sys.argv[1], model=model, optimizer=opt, data=batches(), max_steps=6)
    with run:
        for x, y in run.batches():
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            if run.step == 2 and attempt == "stop":
                os.kill(os.getpid(), signal.SIGTERM)
            run.step_done(loss=loss)
    print(attempt, "step", run.step, "status", run.exit_code, "resumed", run.resumed_from is not None)
assert not any(m.split(".")[0] in ("hydra", "omegaconf", "torchdata") for m in sys.modules)
"""


def test_a_run_loop_works_with_hydra_omegaconf_and_torchdata_unimportable(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", WITHOUT_HYDRA, str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["stop step 3 status 143 resumed False", "go step 6 status 0 resumed True"], \
        proc.stdout + proc.stderr
