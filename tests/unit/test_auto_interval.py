"""checkpoint.interval='auto': Daly's rule, the history it learns from, and a real Run choosing,
saying and keeping its interval (every rank at the same steps: tests/multiprocess)."""

import json
import math
import time

import pytest
import torch

from preemptible import Checkpointer, ConfigError, Run
from preemptible.checkpoint import interval
from preemptible.checkpoint.interval import UNSEEN_SAVE_SHARE, AutoInterval, daly, learned_every, overhead


def test_dalys_rule_and_the_overhead_it_minimises():
    assert daly(1.0, 3600.0) == pytest.approx(math.sqrt(7200) - 1)
    assert daly(10.0, 4.0) == 4.0  # a save longer than 2 M: save once per M
    tau = daly(2.0, 1800.0)
    assert all(overhead(tau, 2.0, 1800.0) <= overhead(tau * f, 2.0, 1800.0) for f in (0.5, 0.8, 1.25, 2.0))


def test_the_time_between_interruptions_is_learned_from_the_run_directory():
    rows = [{"step": s, "time": 100.0 + s} for s in range(1, 11)]                      # fresh: 101 -> 111
    rows += [{"event": "preempted", "step": 10, "signal": "SIGTERM", "time": 111.0}]    # 10 s alive
    rows += [{"event": "resumed", "step": 10, "time": 200.0, "process_started": 195.0}]
    rows += [{"step": s, "time": 190.0 + s} for s in range(11, 22)]                    # 195 -> 211: 16 s
    rows += [{"event": "killed", "step": 20, "time": 300.0}]       # written by the next run at 300: not alive time
    rows += [{"event": "resumed", "step": 20, "time": 300.0, "process_started": 290.0}]
    rows += [{"step": s, "time": 280.0 + s} for s in range(21, 32)]                    # 290 -> 320: 30 s
    rows += [{"event": "preempted", "step": 31, "signal": "time limit", "time": 320.0}]  # planned: not counted
    every, basis = learned_every(rows)
    assert every == pytest.approx((10 + 16 + 30) / 2) and "2 interruption(s) in 56s alive" in basis
    assert learned_every([])[0] == pytest.approx(0.0, abs=0.01)  # nothing alive, nothing seen: see below
    long_quiet = [{"step": s, "time": float(s)} for s in range(0, 5000, 1000)] + [{"step": 9, "time": 9000.0}]
    assert learned_every(long_quiet)[0] == pytest.approx(9000.0)  # at least as long as it has run


def test_a_kill_during_a_start_up_counts_the_start_up_as_time_alive():
    """Found by the interval sweep: kills that land while runs start (before a step row) counted an
    interruption each and no time, so the learned rate collapsed and the run saved every step."""
    rows = [{"step": s, "time": float(s)} for s in range(0, 61, 10)]                    # 60 s of training
    for k in range(3):                                                                   # three runs killed while
        began = 100.0 + 20 * k                                                           # loading: 12 s alive each
        rows += [{"event": "killed", "step": 60, "time": began + 2},
                 {"event": "resumed", "step": 60, "time": began + 12, "process_started": began}]
    rows += [{"event": "killed", "step": 60, "time": 200.0}]
    every, basis = learned_every(rows)
    assert every == pytest.approx((60 + 3 * 12) / 4) and "4 interruption(s)" in basis
    # Numbers that are not numbers (a hand-edited file) are not times.
    assert learned_every([{"step": 1, "time": True}, {"event": "resumed", "process_started": "x", "time": 5.0},
                          {"step": 2, "time": 9.0}, {"event": "hung", "time": 10.0}])[0] == pytest.approx(5.0)


def test_a_killed_run_counts_from_its_process_start_to_its_last_step():
    """The `killed` event carries the killed run's span from its PROGRESS record: a fresh run killed
    before its first metrics flush left no row, and its time still counts; a record older than the
    last end (the killed run never reached a step) is an earlier run's and counts nothing again."""
    fresh_killed = [{"event": "killed", "step": 0, "time": 500.0, "alive_from": 100.0, "alive_until": 130.0},
                    {"event": "resumed", "step": 0, "time": 510.0, "process_started": 505.0},
                    {"step": 1, "time": 520.0}, {"event": "done", "step": 1, "time": 525.0}]
    assert learned_every(fresh_killed)[0] == pytest.approx(30.0 + 20.0)
    rows_then_killed = [{"step": 1, "time": 100.0}, {"step": 2, "time": 110.0},      # flushed rows; killed at
                        {"event": "killed", "step": 2, "time": 300.0, "alive_from": 90.0, "alive_until": 125.0}]
    assert learned_every(rows_then_killed)[0] == pytest.approx(35.0)                  # step 4, 125 s
    stale = [{"step": 1, "time": 100.0}, {"event": "preempted", "step": 1, "time": 110.0},
             {"event": "resumed", "step": 1, "time": 130.0, "process_started": 120.0},   # killed while loading:
             {"event": "killed", "step": 1, "time": 300.0, "alive_from": 95.0, "alive_until": 100.0}]  # no step
    assert learned_every(stale)[0] == pytest.approx((10.0 + 10.0) / 2)


def test_with_no_interruption_yet_one_is_assumed_as_far_ahead_as_the_run_has_lasted(tmp_path, monkeypatch):
    """No history: M is the time alive so far (it grows as the run survives), and the interval is
    kept to C / UNSEEN_SAVE_SHARE at least, so saves never take more than that share before the
    first interruption; once one is seen, Daly's interval alone."""
    from preemptible.checkpoint import interval
    from preemptible.observe.metrics import append_rows

    now = [1000.0]
    monkeypatch.setattr(interval.time, "time", lambda: now[0])
    monkeypatch.setattr(interval.time, "monotonic", lambda: now[0])  # this run's own time: the monotonic clock
    auto = AutoInterval(interrupt_every=None, run_dir=tmp_path / "fresh")
    for i in range(6):
        auto.step(i * 0.1)
    now[0] += 20.0
    first = auto.choose(estimate=1.0)
    assert first.seconds == pytest.approx(1.0 / UNSEEN_SAVE_SHARE) and "no interruption yet in 20s" in first.basis
    now[0] += 7200.0
    later = auto.choose(estimate=1.0)
    assert later.every == pytest.approx(7220.0) and later.seconds == pytest.approx(daly(1.0, 7220.0))
    append_rows(str(tmp_path / "metrics.jsonl"), [{"step": 1, "time": 0.0}, {"step": 2, "time": 20.0},
                                                  {"event": "killed", "step": 0, "time": 100.0}])
    seen = AutoInterval(interrupt_every=None, run_dir=tmp_path).choose(estimate=1.0)
    assert seen.seconds == pytest.approx(daly(1.0, 20.0)) and seen.seconds < 1.0 / UNSEEN_SAVE_SHARE  # 5.3 s


def test_the_estimate_counts_this_runs_time_as_it_goes(tmp_path, monkeypatch):
    """Total time alive over the interruptions: the run's own time joins the history as it runs, so
    a run that outlives its history's rate saves less often, as the rate it has seen falls."""
    from preemptible.checkpoint import interval
    from preemptible.observe.metrics import append_rows

    append_rows(str(tmp_path / "metrics.jsonl"), [{"step": 1, "time": 0.0}, {"step": 2, "time": 60.0},
                                                  {"event": "killed", "step": 0, "time": 100.0}])
    now = [1000.0]
    monkeypatch.setattr(interval.time, "time", lambda: now[0])
    monkeypatch.setattr(interval.time, "monotonic", lambda: now[0])  # this run's own time: the monotonic clock
    auto = AutoInterval(interrupt_every=None, run_dir=tmp_path)
    assert auto.every() == (pytest.approx(60.0), "1 interruption(s) in 60s alive in this run directory")
    now[0] += 240.0
    assert auto.every()[0] == pytest.approx(300.0)
    told = AutoInterval(interrupt_every=50.0, run_dir=tmp_path)
    now[0] += 1000.0
    assert told.every() == (50.0, "interrupt_every")


def test_a_slow_first_step_does_not_trap_the_run_into_saving_every_step(monkeypatch):
    """Found by the interval sweep: the first step after a start (5 s of warm-up here) was the step
    time's first sample and dominated it, so the interval came out as 1 step; a step that saved was
    then never timed, and the run saved every step from there on."""
    from preemptible.checkpoint import interval

    clock = [0.0]
    monkeypatch.setattr(interval.time, "monotonic", lambda: clock[0])
    schedule = interval.AutoSchedule(60.0, "unused", rank=0, start_step=0, say=lambda choice: None)
    saves = []
    for step in range(400):
        schedule.boundary(step, lambda: 0.1)
        if schedule.due(step):
            clock[0] += 0.1  # the save blocks the loop for 0.1 s
            schedule.saved(step, 0.1)
            saves.append(step)
        clock[0] += 5.0 if step == 0 else 0.2
    best = round((math.sqrt(2 * 0.1 * 60.0) - 0.1) / 0.2)  # Daly: 3.36 s = 17 steps of 0.2 s
    assert schedule.every == best and schedule.auto.step_seconds == pytest.approx(0.2)
    assert saves == list(range(best, 400, best))  # from the start step, every `best` steps


def test_the_choice_uses_the_measured_step_and_save():
    auto = AutoInterval(interrupt_every=200.0, run_dir="unused")
    for i in range(6):
        auto.step(i * 0.1)
    choice = auto.choose(estimate=0.5)
    assert choice.basis == "interrupt_every" and choice.save_cost == 0.5
    assert choice.steps == round((math.sqrt(2 * 0.5 * 200.0) - 0.5) / 0.1)
    auto.saved(2.0)
    assert auto.choose(estimate=0.5).save_cost == 2.0  # a timed save replaces the estimate


@pytest.mark.parametrize("kwargs, words", [
    (dict(interval="sometimes"), "interval='sometimes'; expected an int >= 0"),
    (dict(interval="auto", interrupt_every=0), "interrupt_every=0; expected seconds > 0"),
    (dict(interrupt_every="hourly"), "interrupt_every='hourly'"),
])
def test_bad_values_are_named(kwargs, words):
    with pytest.raises(ConfigError, match="^" + words.replace("(", r"\(")):
        Checkpointer(**kwargs)


def test_a_run_chooses_says_and_keeps_its_interval(tmp_path):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = Run(tmp_path, model=model, optimizer=opt, max_steps=80,
              checkpoint=Checkpointer(interval="auto", interrupt_every=0.5, keep=100))
    with run:
        while run.step < 80:
            time.sleep(0.01)
            opt.zero_grad()
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
            run.step_done()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    chosen = [r for r in rows if r.get("event") == "interval"]
    assert chosen and chosen[0]["step"] == 3 and chosen[0]["interrupt_every"] == 0.5
    first = chosen[0]
    tau = math.sqrt(2 * first["save_cost"] * 0.5) - first["save_cost"]
    assert first["interval_seconds"] == pytest.approx(tau, abs=1e-3)
    assert first["expected_overhead"] == pytest.approx(overhead(tau, first["save_cost"], 0.5), rel=1e-2)
    saved = sorted(int(p.name[5:]) for p in (tmp_path / "checkpoints").glob("step_*"))
    assert saved[-1] == 80 and len(saved) >= 3  # periodic saves, then the end's
    for a, b in zip(saved, saved[1:-1]):  # each gap is the interval chosen at the save before it
        assert b - a == [c for c in chosen if c["step"] <= a + 1][-1]["interval_steps"]


def test_times_that_cannot_be_right_are_not_read(tmp_path):
    """A history written while the clock was 75 years ahead, a crafted killed row claiming a run
    lived from -1e300 to 1e300, -Infinity, NaN: none of it moves the estimate; durations measured
    on the boot clock (alive_seconds) are read instead where they exist."""
    now = 2_000_000_000.0
    ahead = now + 75 * 365 * 86400.0
    future = [{"step": 1, "time": ahead}, {"step": 2, "time": ahead + 10},
              {"event": "preempted", "step": 2, "time": ahead + 11, "alive_seconds": 11.0}]
    assert interval._alive(future, now) == (0.0, 0)  # nothing in it can be placed in time: no history
    sane = [{"step": 1, "time": now - 100}] + future + [{"event": "resumed", "step": 2, "time": now - 50},
                                                      {"step": 3, "time": now - 20}]
    alive, count = interval._alive(sane, now)
    assert count == 0 and alive == pytest.approx(11.0 + 30.0)  # the measured 11 s, then 30 s of this run
    crafted = [{"step": 1, "time": now - 60}, {"event": "killed", "step": 1, "time": now - 30,
                                               "alive_from": -1e300, "alive_until": 1e300, "alive_seconds": 1e300}]
    alive, count = interval._alive(crafted, now)
    assert count == 1 and alive <= 60.0  # never more than the directory has existed
    odd = [{"step": 1, "time": float("-inf")}, {"step": 2, "time": float("nan")},
           {"event": "hung", "step": 2, "time": now - 5, "alive_seconds": float("-inf")}]
    assert interval._alive(odd, now) == (0.0, 1)


def test_a_crafted_history_never_gives_an_interval_past_the_cap(tmp_path):
    from preemptible.observe.metrics import append_rows

    append_rows(str(tmp_path / "metrics.jsonl"), [{"step": 1, "time": 1.0},  # "since 1970": M of 56 years
                                                  {"event": "preempted", "step": 1, "time": 2.0,
                                                   "alive_seconds": 1.7e9}])
    auto = AutoInterval(interrupt_every=None, run_dir=tmp_path)
    for i in range(6):
        auto.step(i * 0.1)
    choice = auto.choose(estimate=1.0)
    assert choice.seconds == interval.MAX_INTERVAL and choice.steps == round(interval.MAX_INTERVAL / 0.1)
    assert auto.choose(estimate=1000.0).seconds == pytest.approx(1000.0 / UNSEEN_SAVE_SHARE)  # a tenth of the loop


def test_a_history_that_cannot_be_read_is_a_warning(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").mkdir()
    with caplog.at_level("WARNING"):
        auto = AutoInterval(interrupt_every=None, run_dir=tmp_path)
    assert auto.every()[0] > 0 and not auto._count
    assert any("cannot be read" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("history", ["clock ahead", "-Infinity", "a directory"])
def test_a_run_trains_through_a_history_it_cannot_trust(tmp_path, history):
    """A Run with interval='auto' on a run directory whose history was written 75 years ahead,
    holds -Infinity (which json reads), or is a directory: it trains to the end, choosing an
    interval within the cap and saving periodically (it used to save every 5,214,852 steps, or stop
    at step 3 with a traceback)."""
    from preemptible.observe.metrics import append_rows

    path = tmp_path / "metrics.jsonl"
    if history == "a directory":
        path.mkdir()
    else:
        t = time.time() + (75 * 365 * 86400.0 if history == "clock ahead" else 0.0)
        rows = [{"step": s, "loss": 1.0, "time": t + s} for s in range(1, 4)]
        rows += [{"event": "killed", "step": 0, "time": t + 10, "alive_from": t, "alive_until": t + 1e9}]
        append_rows(str(path), rows)
        if history == "-Infinity":
            with open(path, "a") as f:
                f.write('{"step": 4, "time": -Infinity}\n{"event": "hung", "step": 4, "time": -Infinity}\n')
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = Run(tmp_path, model=model, optimizer=opt, data=(torch.randn(2) for _ in iter(int, 1)), max_steps=40,
              checkpoint=Checkpointer(interval="auto", keep=50))
    with run:
        for x in run.batches():
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
            time.sleep(0.02)
            run.step_done()
    assert run.exit_code == 0 and run.step == 40
    chosen = run._schedule.auto.choose(0.01)
    assert chosen.seconds <= interval.MAX_INTERVAL and chosen.steps <= interval.MAX_INTERVAL / 0.02
    saved = sorted(int(p.name[5:]) for p in (tmp_path / "checkpoints").glob("step_*"))
    assert saved[-1] == 40 and len(saved) <= 10  # not every step: nothing in the history says interruptions are near
