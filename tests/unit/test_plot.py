"""The picture and the interruption accounting, from a metrics.jsonl written by hand."""

import json

import pytest

from preemptible import ConfigError
from preemptible.observe.plot import interruptions, plot_run


def _write(run_dir, rows):
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_skipped_save_a_kill_and_a_restart_after_done(tmp_path):
    t = 1000.0
    rows = [{"step": s, "loss": 5 - s * 0.1, "lr": 1e-3, "time": t + s} for s in range(1, 11)]
    rows += [{"event": "preempted", "step": 10, "signal": "SIGTERM", "checkpoint": None,
              "save_skipped": "a save takes ~30.0s but only 2.0s of the 5s grace period are left", "time": t + 10.5}]
    rows += [{"event": "resumed", "step": 5, "time": t + 20}]  # from the periodic checkpoint at 5
    rows += [{"step": s, "loss": 5 - s * 0.1, "lr": 1e-3, "time": t + 15 + s} for s in range(6, 16)]
    rows += [{"event": "resumed", "step": 12, "time": t + 40}]  # after a SIGKILL at 15 (no event)
    rows += [{"step": s, "loss": 5 - s * 0.1, "lr": 1e-3, "time": t + 28 + s} for s in range(13, 21)]
    rows += [{"event": "done", "step": 20, "time": t + 49}, {"event": "resumed", "step": 20, "time": t + 60},
             {"event": "done", "step": 20, "time": t + 61}]
    _write(tmp_path, rows)
    found = interruptions(tmp_path)
    assert [(i.reason, i.stop_step, i.resume_step, i.save_skipped) for i in found] == [
        ("SIGTERM", 10, 5, True), ("killed", 15, 12, False)]  # the start after done is no interruption
    # lost: from step 5's first completion (t+5) to the first step after the resume (t+21), less a step
    assert found[0].lost_seconds == pytest.approx(15.0)
    assert found[1].lost_seconds == pytest.approx((t + 41) - (t + 27) - 1.0)
    out = plot_run(tmp_path, tmp_path / "x.png")
    from matplotlib.image import imread

    rgb = imread(str(out))[..., :3]
    orange = ((rgb[..., 0] > 0.9) & (rgb[..., 1] > 0.4) & (rgb[..., 1] < 0.6) & (rgb[..., 2] < 0.2)).sum()
    assert orange > 50  # the skipped save is drawn (orange, dotted)


def test_plot_needs_a_run_with_steps(tmp_path):
    with pytest.raises(ConfigError, match="has no metrics.jsonl"):
        plot_run(tmp_path)
    _write(tmp_path, [{"event": "resumed", "step": 0}])
    with pytest.raises(ConfigError, match="no steps yet"):
        plot_run(tmp_path)


def test_odd_rows_are_left_out_not_a_traceback(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"step": s, "loss": 1.0, "time": 1000.0 + s} for s in range(1, 6)]
    rows += [{"step": "six", "loss": 1.0}, {"event": "resumed", "step": None}, {"step": 7, "time": [1]},
             {"event": 3, "step": 8}]
    _write(tmp_path, rows)
    (tmp_path / "metrics.jsonl").open("a").write("[1, 2]\n42\n")
    assert interruptions(tmp_path) == []
    assert plot_run(tmp_path).is_file()


def test_a_hang_and_a_lost_peer_are_their_own_kind_of_end(tmp_path):
    """The watchdog's `hung` events (two ranks may each write one) close a segment like a kill, at
    the step reached; the plot marks them with the steps computed again."""
    t = 2000.0
    rows = [{"step": s, "loss": 3.0, "time": t + s} for s in range(1, 15)]
    rows += [{"event": "hung", "step": 14, "reached": 14, "signal": "hung", "rank": 0, "time": t + 30},
             {"event": "hung", "step": 14, "reached": 14, "signal": "hung", "rank": 1, "time": t + 30.5}]
    rows += [{"event": "resumed", "step": 10, "time": t + 40}]
    rows += [{"step": s, "loss": 3.0, "time": t + 30 + s} for s in range(11, 18)]
    rows += [{"event": "hung", "step": 17, "reached": 17, "signal": "peer lost", "rank": 1, "time": t + 48}]
    rows += [{"event": "resumed", "step": 15, "time": t + 60}, {"step": 16, "loss": 3.0, "time": t + 61}]
    _write(tmp_path, rows)
    found = interruptions(tmp_path)
    assert [(i.reason, i.stop_step, i.resume_step) for i in found] == [("hung", 14, 10), ("peer lost", 17, 15)]
    assert plot_run(tmp_path, tmp_path / "x.png").is_file()


def test_the_output_is_a_picture_file_or_one_line(tmp_path, capsys):
    """-o names a .png/.svg/.pdf file, or a directory (run.png in it, and said so); anything else,
    or a path that cannot be written, is one `error:` line with status 2, not a traceback."""
    from preemptible.__main__ import main

    _write(tmp_path, [{"step": s, "loss": 1.0, "time": 1000.0 + s} for s in range(1, 4)])
    out_dir = tmp_path / "pictures"
    out_dir.mkdir()
    assert main(["plot", str(tmp_path), "-o", str(out_dir)]) == 0
    assert (out_dir / "run.png").is_file() and f"wrote {out_dir / 'run.png'}" in capsys.readouterr().out
    for bad, words in ((tmp_path / "x.txt", "expected a file name ending in .png, .svg, .pdf"),
                       ("/proc/x.png", "cannot be written")):
        assert main(["plot", str(tmp_path), "-o", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: out={str(bad)!r}") and words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.txt").exists()
