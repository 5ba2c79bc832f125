"""metrics.jsonl: one write per flush, a torn tail left by a killed process, readers while it is written."""

import json
import multiprocessing
import os

import pytest

from preemptible.observe.metrics import Metrics, read_metrics


def _writer(run_dir, rows):
    m = Metrics(run_dir, enabled=True, max_steps=None, log_every=7)
    for s in range(1, rows + 1):
        m.step(s, loss=float(s) / 3, lr=1e-3, tokens=s * 1000, note="x" * (s % 50))
    m.close()


def test_a_reader_during_writes_sees_only_whole_rows(tmp_path):
    """A reader polling while another process appends never gets a half row (the CI failure: a
    test read '{"step": 25, "loss": 4.55' mid-write and json.loads raised)."""
    proc = multiprocessing.get_context("spawn").Process(target=_writer, args=(str(tmp_path), 3000))
    proc.start()
    reads = during = 0
    while proc.is_alive() or reads == 0:
        rows = read_metrics(tmp_path, strict=True)
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
        reads += 1
        during += 0 < len(rows) < 3000  # read while the writer was part way
    proc.join()
    assert proc.exitcode == 0
    assert during >= 10, during  # the reads did overlap the writes (else the test proves nothing)
    assert [r["step"] for r in read_metrics(tmp_path, strict=True)] == list(range(1, 3001))


def test_a_torn_tail_is_left_out_and_the_next_run_starts_a_new_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n" + '{"step": 2, "lo')  # killed mid-write
    assert read_metrics(tmp_path, strict=True) == [{"step": 1, "loss": 1.0}]
    m = Metrics(str(tmp_path), enabled=True, max_steps=None, log_every=1)
    m.event("resumed", step=1)
    m.step(2, loss=0.5)
    rows = read_metrics(tmp_path)  # the torn line is now a whole line of its own, skipped
    assert [r.get("event", r.get("step")) for r in rows] == [1, "resumed", 2]
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a metrics row"):
        read_metrics(path, strict=True)


def test_read_metrics_edge_cases(tmp_path):
    assert read_metrics(tmp_path) == []  # no file yet
    assert read_metrics(tmp_path / "nothing.jsonl") == []
    (tmp_path / "metrics.jsonl").write_bytes(b"")
    assert read_metrics(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text('\n[1, 2]\n{"step": 3}\n')  # a list is not a row
    assert read_metrics(tmp_path) == [{"step": 3}]
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(tmp_path, strict=True)


def test_disabled_metrics_write_nothing(tmp_path):
    m = Metrics(str(tmp_path), enabled=False, max_steps=3)
    m.step(1, loss=1.0)
    m.event("done")
    m.close()
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_an_unclean_end_is_found_from_the_tail_of_a_long_file(tmp_path):
    """unclean_end reads only the end of metrics.jsonl: a long run's file is not read whole at each start."""
    from preemptible.observe.metrics import unclean_end

    rows = [{"step": s, "loss": 1.0, "time": 1000.0 + s} for s in range(1, 5001)]  # ~250 KiB
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (tmp_path / "metrics.jsonl").stat().st_size > 1 << 17
    assert unclean_end(tmp_path) == 5000  # no end recorded: killed at the last step reached
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "done", "step": 5000, "time": 7000.0}) + "\n")
    assert unclean_end(tmp_path) is None


def test_step_done_takes_any_metric_a_loop_passes(tmp_path):
    """lr= from a loop that keeps its LR by hand (no optimizer to read it from) is logged as the
    row's lr (it was a TypeError inside the library); the names a row uses itself are one line."""
    import torch

    from preemptible import ConfigError, Run, Stopping

    run = Run(tmp_path, model=torch.nn.Linear(1, 1), data=range(10), max_steps=3, stopping=Stopping(signals=None))
    with run:
        for i in run.batches():
            run.step_done(loss=torch.tensor(1.0), lr=0.5 / (i + 1), accuracy=0.25)
    steps = [r for r in read_metrics(tmp_path) if "event" not in r]
    assert [(r["lr"], r["accuracy"]) for r in steps] == [(0.5, 0.25), (0.25, 0.25), (0.5 / 3, 0.25)]
    for name in ("step", "time", "event"):
        again = Run(tmp_path / name, model=torch.nn.Linear(1, 1), data=range(10), max_steps=3,
                    stopping=Stopping(signals=None))
        with pytest.raises(ConfigError, match=f"step_done\\({name}=...\\): step, time, event are names"):
            with again:
                for _ in again.batches():
                    again.step_done(**{name: 1})
