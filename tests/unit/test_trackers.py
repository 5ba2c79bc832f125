"""The tracker feed in one process: what a tracker is given, when, and what a failing one costs."""

import json
import logging

import pytest
import torch
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from preemptible import Checkpointer, ConfigError, Report, Run, read_history
from preemptible.observe.trackers import MLflow, TensorBoard, TrackerFeed, WandB


class Recorder:
    """A tracker that records what it is given (live or held until a commit, durable or not)."""

    def __init__(self, name="rec", live=False, durable=True, fail_at=None):
        self.name, self.live, self.durable, self.fail_at = name, live, durable, fail_at
        self.rows, self.starts, self.finished = [], [], []

    def start(self, run_dir, saved, first_step, config):
        self.starts.append((dict(saved), first_step, config))
        return {"id": saved.get("id", "run-1"), **({"forked_from": saved["forked_from"]} if "forked_from" in saved else {})}

    def log(self, rows):
        for r in rows:
            if self.fail_at is not None and r.get("step") == self.fail_at:
                raise ConnectionError("the service went away")
        self.rows += rows

    def finish(self, status, reason, step):
        self.finished.append((status, reason, step))


def _train(run_dir, trackers, steps=12, stop_at=None, **kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = StatefulDataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=4)
    run = Run(run_dir, model=model, optimizer=opt, data=data, max_steps=steps, tracker=trackers,
              checkpoint=Checkpointer(interval=5, meta={"config": {"lr": 0.1}}, **kw), report=Report(log_every=1))
    with run:
        for x, y in run.batches():
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if stop_at is not None and run.step + 1 == stop_at:
                run.handler.request_stop(15)  # as if SIGTERM arrived
            run.step_done(loss=loss)
    return run


def _steps(rows):
    return [r["step"] for r in rows if "event" not in r]


def test_held_rows_go_out_only_once_a_commit_covers_them_and_the_id_is_kept(tmp_path):
    rec, live = Recorder(), Recorder("live", live=True)
    run = _train(tmp_path, [rec, live], steps=12, stop_at=7)
    assert run.exit_code == 143 and run.step == 7
    assert _steps(rec.rows) == list(range(1, 8)) and _steps(live.rows) == list(range(1, 8))
    assert rec.finished == [("preempted", "SIGTERM", 7)] and rec.starts[0][1] == 1
    assert rec.starts[0][2] == {"lr": 0.1}
    saved = json.loads((tmp_path / "trackers.json").read_text())
    assert saved["rec"] == {"id": "run-1", "sent_step": 7, "durable_step": 7}
    rec2 = Recorder()
    run = _train(tmp_path, [rec2], steps=12)
    assert run.exit_code == 0
    assert rec2.starts[0][0] == {"id": "run-1"} and rec2.starts[0][1] == 8  # the same run, nothing to fill in
    assert _steps(rec2.rows) == list(range(8, 13))
    assert [r["event"] for r in rec2.rows if "event" in r] == ["resumed", "done"]
    assert rec2.finished == [("done", None, 12)]


def test_a_tracker_that_lost_rows_in_a_crash_gets_them_again(tmp_path):
    """Not durable (W&B, TensorBoard): what was sent since its last clean finish may be gone after a
    kill; the next start re-sends metrics.jsonl's rows from there to the resume step."""
    rec = Recorder(durable=False)
    _train(tmp_path, [rec], steps=7, stop_at=None)  # a clean finish at 7: durable up to 7
    state = json.loads((tmp_path / "trackers.json").read_text())
    assert state["rec"]["durable_step"] == 7
    state["rec"].update(sent_step=7, durable_step=3)  # as a killed run leaves it: 4-7 sent, maybe lost
    (tmp_path / "trackers.json").write_text(json.dumps(state))
    rec2 = Recorder(durable=False)
    _train(tmp_path, [rec2], steps=9)
    assert rec2.starts[0][1] == 4  # first_step: TensorBoard purges from here
    assert _steps(rec2.rows) == [4, 5, 6, 7, 8, 9]  # 4-7 again from metrics.jsonl, then trained


def test_going_back_gives_the_branch_a_new_run_filled_in_from_metrics(tmp_path, caplog):
    rec = Recorder()
    _train(tmp_path, [rec], steps=12, keep=10)
    rec2 = Recorder()
    with caplog.at_level(logging.WARNING, logger="preemptible.trackers"):
        run = _train(tmp_path, [rec2], steps=12, resume=str(tmp_path / "checkpoints" / "step_00000005"))
    assert run.resumed_from.name == "step_00000005"
    assert rec2.starts[0][0] == {"forked_from": "run-1"} and rec2.starts[0][1] == 1
    assert _steps(rec2.rows) == list(range(1, 13))  # 1-5 from metrics.jsonl, then 6-12 as trained
    assert any("the branch gets a new rec run (forked from run-1)" in r.getMessage() for r in caplog.records)


def test_a_failing_tracker_costs_one_warning_and_nothing_else(tmp_path, caplog):
    bad, good = Recorder("bad", fail_at=6), Recorder("good")
    with caplog.at_level(logging.WARNING, logger="preemptible.trackers"):
        run = _train(tmp_path, [bad, MLflow(tracking_uri="nosuchscheme://x"), good], steps=12)
    assert run.exit_code == 0 and run.step == 12
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, warned
    assert any("tracker bad failed (ConnectionError: the service went away); training goes on" in w for w in warned)
    assert any("tracker mlflow could not start" in w for w in warned)
    assert _steps(good.rows) == list(range(1, 13)) and bad.finished == []


def test_a_tracker_must_look_like_one():
    with pytest.raises(ConfigError, match="tracker=3; expected a preemptible.trackers tracker"):
        TrackerFeed([3])
    with pytest.raises(ConfigError, match="names one tracker twice"):
        TrackerFeed([Recorder(), Recorder()])
    with pytest.raises(ConfigError, match="mode='cloud'"):
        WandB(mode="cloud")
    with pytest.raises(ConfigError, match="flush_secs=0"):
        TensorBoard(flush_secs=0)
    with pytest.raises(ConfigError, match="experiment=''"):
        MLflow(experiment="")


def test_read_history_later_line_wins(tmp_path):
    rows = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0},
            {"event": "resumed", "step": 2}, {"step": 3, "loss": 3.5}, {"step": 4, "loss": 4.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    h = read_history(tmp_path)
    assert h.series("loss") == ([1, 2, 3, 4], [1.0, 2.0, 3.5, 4.0])
    assert [e["event"] for e in h.events] == ["resumed"]
