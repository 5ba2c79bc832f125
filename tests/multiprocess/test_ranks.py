"""Real ranks (spawned processes, gloo), real signals: the claims about agreement across ranks."""

import functools
import json
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_helpers import free_port, run_ranks
from preemptible import DistributedSignalHandler, all_gather_item, get_device


def _train_like(rank, world, signal_rank, signal_step, every, pipelined, group_spec=None):
    """A loop with a per-step collective (like DDP's all-reduce) and the per-step stop check."""
    if group_spec == "partial":
        group_spec = functools.partial(dist.new_group, backend="gloo")
    handler = DistributedSignalHandler("SIGUSR2", group=group_spec, check_every=every, pipelined=pipelined)
    with handler:
        step = 0
        while True:
            dist.all_reduce(torch.ones(4))
            if rank == signal_rank and step == signal_step:
                os.kill(os.getpid(), signal.SIGUSR2)
            if handler.should_stop():
                break
            step += 1
            assert step < 200, "never stopped"
        return {"stop_step": step, "received": handler.signals_received(), "by_rank": handler.signals_by_rank(),
                "device": str(get_device(group=handler.group)), "side_group": handler.group is not None}


# 4 ranks oversubscribe a 2-core machine: the slow tier (CI runs it; `-m "not slow"` keeps 2 ranks).
FOUR_RANKS = pytest.mark.slow


@pytest.mark.parametrize("world, signal_rank, every, pipelined, latency", [
    (2, 1, 1, True, 1),
    (2, 0, 1, False, 0),
    pytest.param(4, 3, 1, True, 1, marks=FOUR_RANKS),
    pytest.param(4, 2, 3, True, None, marks=FOUR_RANKS),
])
def test_signal_at_one_rank_stops_every_rank_at_the_same_step(tmp_path, world, signal_rank, every, pipelined, latency):
    signal_step = 5
    results = run_ranks(_train_like, world, tmp_path, signal_rank, signal_step, every, pipelined)
    steps = {r["stop_step"] for r in results}
    assert len(steps) == 1, results
    stop = steps.pop()
    if latency is not None:
        assert stop == signal_step + latency
    else:  # every N steps, pipelined: at most 2N steps late
        assert signal_step <= stop <= signal_step + 2 * every
    expected = [r == signal_rank for r in range(world)]
    for r in results:
        assert r["received"] == expected
        assert r["by_rank"] == [int(signal.SIGUSR2) if e else 0 for e in expected]
        assert r["device"] == "cpu"


@pytest.mark.parametrize("group_spec", ["gloo", "partial"])
def test_gloo_side_group(tmp_path, group_spec):
    results = run_ranks(_train_like, 2, tmp_path, 0, 3, 1, True, group_spec)
    assert {r["stop_step"] for r in results} == {4}
    assert all(r["side_group"] and r["received"] == [True, False] for r in results)


def _subgroup(rank, world):
    sub = dist.new_group([0, 1])  # every rank creates it; only 0 and 1 use it
    if rank > 1:
        return {}
    with DistributedSignalHandler("SIGUSR1", group=sub) as handler:
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
        dist.barrier(group=sub)
        return {"received": handler.signals_received()}


@FOUR_RANKS
def test_subgroup(tmp_path):
    results = run_ranks(_subgroup, 4, tmp_path)
    assert results[0]["received"] == results[1]["received"] == [False, True]


def _gather(rank, world):
    sync_b = all_gather_item(rank % 2 == 1, torch.int32)
    sync_f = all_gather_item(rank + 0.5, torch.float64)
    fut = all_gather_item(rank * 10, torch.int64, async_op=True)
    dist.all_reduce(torch.ones(1))  # other work while it runs
    values = fut.wait()
    return {"bools": sync_b, "types": [type(v).__name__ for v in sync_b], "floats": sync_f,
            "async": values, "async_again": list(fut), "device": str(get_device())}


@FOUR_RANKS
def test_all_gather_item_sync_and_async(tmp_path):
    for r in run_ranks(_gather, 4, tmp_path):
        assert r["bools"] == [False, True, False, True] and r["types"] == ["bool"] * 4
        assert r["floats"] == [0.5, 1.5, 2.5, 3.5]
        assert r["async"] == r["async_again"] == [0, 10, 20, 30]
        assert r["device"] == "cpu"


def _until_stopped(rank, world, progress_dir):
    with DistributedSignalHandler(["SIGUSR2", "SIGTERM"]) as handler:
        step = 0
        while not handler.should_stop():
            dist.all_reduce(torch.ones(1))
            with open(os.path.join(progress_dir, f"rank{rank}"), "w") as f:
                f.write(str(step))
            time.sleep(0.01)
            step += 1
        return {"stop_step": step, "received": handler.signals_received()}


def test_signal_from_outside_to_one_process(tmp_path):
    """The parent sends SIGTERM to rank 1's PID while the loop runs, at no chosen step."""
    progress = tmp_path / "progress"
    progress.mkdir()
    ctx = mp.start_processes(_run_in_group, args=(_until_stopped, 2, free_port(), str(tmp_path), (str(progress),)),
                             nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 60
    while not (progress / "rank1").exists() or int((progress / "rank1").read_text() or 0) < 10:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(ctx.pids()[1], signal.SIGTERM)
    while not ctx.join(timeout=1):
        assert time.monotonic() < deadline
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["stop_step"] == results[1]["stop_step"]
    assert results[0]["received"] == results[1]["received"] == [False, True]


def _run_in_group(rank, fn, world, port, outdir, args):
    from distributed_helpers import _entry
    _entry(rank, fn, world, port, outdir, args)


def _hung(rank, world, ready_file):
    if rank == 1:
        time.sleep(600)  # never reaches the collective
    with DistributedSignalHandler("SIGTERM"):
        open(ready_file, "w").close()
        dist.all_reduce(torch.ones(1))  # stuck in C++: no Python handler can run here
    return {}


def test_second_signal_stops_a_rank_stuck_in_a_collective(tmp_path, capfd):
    ready = tmp_path / "ready"
    ctx = mp.start_processes(_run_in_group, args=(_hung, 2, free_port(), str(tmp_path), (str(ready),)),
                             nprocs=2, join=False, start_method="spawn")
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # rank 0 is now blocked in all_reduce
        pid0 = ctx.pids()[0]
        os.kill(pid0, signal.SIGTERM)
        time.sleep(1.5)
        sent = time.monotonic()
        os.kill(pid0, signal.SIGTERM)
        ctx.processes[0].join(timeout=15)
        assert ctx.processes[0].exitcode == -signal.SIGTERM
        assert time.monotonic() - sent < 10  # seconds, not gloo's 30-minute timeout
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    err = capfd.readouterr().err
    assert "received again" in err and "all_reduce" in err


def _ddp_loop(rank, world, signal_rank, signal_step):
    from torch.nn.parallel import DistributedDataParallel
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Linear(64, 8)))
    torch.manual_seed(0)
    plain = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Linear(64, 8)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)
    torch.manual_seed(rank)
    with DistributedSignalHandler("SIGUSR2") as handler:
        handler.ride_on_gradients(model)
        step = 0
        while True:
            if rank == signal_rank and step == signal_step:
                os.kill(os.getpid(), signal.SIGUSR2)
            x = torch.randn(4, 8)
            for m, o in ((model, opt), (plain, plain_opt)):
                m(x).square().mean().backward()
                o.step()
                o.zero_grad()
            if handler.should_stop():
                break
            step += 1
            assert step < 100
        weights = [p.detach().sum().item() for p in model.parameters()]
        diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), plain.parameters()))
        return {"stop_step": step, "by_rank": handler.signals_by_rank(), "weights": weights, "diff": diff}


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=FOUR_RANKS)])
def test_stop_flag_rides_on_ddp_gradients(tmp_path, world):
    results = run_ranks(_ddp_loop, world, tmp_path, world - 1, 6)
    assert {r["stop_step"] for r in results} == {6}  # signalled before the backward: same step
    assert all(r["by_rank"] == [0] * (world - 1) + [int(signal.SIGUSR2)] for r in results)
    assert all(r["weights"] == results[0]["weights"] for r in results)
    assert all(r["diff"] < 1e-6 for r in results)  # gradients averaged as by DDP's own all-reduce


def _auto_interval(rank, world):
    handler = DistributedSignalHandler("SIGUSR2", check_every="auto", max_latency=0.2)
    with handler:
        step, signalled_at = 0, None
        while not handler.should_stop():
            time.sleep(0.005)  # a 5 ms step: at most 0.2 s latency allows ~20 steps between reductions
            step += 1
            if rank == 1 and step == 60:
                signalled_at = time.monotonic()
                os.kill(os.getpid(), signal.SIGUSR2)
            assert step < 1000
        return {"stop_step": step, "every": handler._vote.every, "calls": handler._vote.calls}


def test_auto_interval_is_agreed_and_bounded(tmp_path):
    results = run_ranks(_auto_interval, 2, tmp_path)
    assert results[0]["stop_step"] == results[1]["stop_step"] and results[0]["every"] == results[1]["every"]
    every = results[0]["every"]
    assert 2 <= every <= 25, every  # adapted to the step time, not every step
    assert 60 <= results[0]["stop_step"] <= 60 + 2 * every + 1
