"""Weights out of a run directory, and what `status` says about it (in-process; the CLI: tests/e2e)."""

import pytest
import torch

from preemptible import Checkpointer, ConfigError, Run, Stopping, export_weights, params_sha256
from preemptible.__main__ import main as cli
from preemptible.observe.export import format_status, status


@pytest.fixture
def run_dir(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Run(tmp_path / "run", model=model, optimizer=opt, stopping=Stopping(signals=None),
             checkpoint=Checkpointer(interval=2, keep=3)) as run:
        for _ in range(6):
            model(torch.randn(2, 3)).sum().backward()
            opt.step()
            run.step_done()
    return tmp_path / "run", params_sha256(model)


def test_export_takes_the_head_and_matches_the_model(run_dir, tmp_path):
    path, digest = run_dir
    out = export_weights(path, tmp_path / "w.pt")
    weights = torch.load(out, weights_only=True)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model.load_state_dict(weights)
    assert params_sha256(model) == digest
    with pytest.raises(ConfigError, match="format='npz'"):
        export_weights(path, tmp_path / "w.npz", format="npz")


def test_a_damaged_head_is_skipped_by_export_and_named_by_status(run_dir, tmp_path, capsys):
    path, _ = run_dir
    victim = next((path / "checkpoints" / "step_00000006").glob("*.distcp"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    victim.write_bytes(bytes(data))
    info = status(path, verify=True)
    rows = {r["name"]: r for r in info["checkpoints"]}
    assert "does not match its checksum" in rows["step_00000006"]["why_invalid"] and rows["step_00000006"]["head"]
    assert rows["step_00000004"]["why_invalid"] is None
    text = format_status(info)
    assert "INVALID" in text and "(head)" in text and "done" in text
    # export from the run directory falls back along the line, as a resume would
    export_weights(path, tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="does not match its checksum"):
        export_weights(path / "checkpoints" / "step_00000006", tmp_path / "x.pt")
    assert cli(["status", str(path), "--verify"]) == 0 and "INVALID" in capsys.readouterr().out
    assert cli(["export", str(tmp_path / "nowhere"), str(tmp_path / "y.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_export_onto_a_directory_or_an_unwritable_path_is_one_line_and_leaves_nothing(run_dir, tmp_path):
    path, _ = run_dir
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(ConfigError, match="out=.*target' is a directory; give a file path"):
        export_weights(path, target)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot be written"):
        export_weights(path, blocker / "sub" / "w.pt")  # a file where a directory must be
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "run", "target"] and not any(target.iterdir())


def test_status_with_an_odd_owner_file_and_odd_metrics_rows(run_dir):
    path, _ = run_dir
    (path / "OWNER").write_text("[1, 2]")
    with open(path / "metrics.jsonl", "a") as f:
        f.write('{"event": "preempted", "step": "x"}\n{"event": 5, "step": 3}\n{"step": 4, "time": "noon"}\n[1]\n')
    info = status(path)
    assert info["owner"] == {"error": "unreadable OWNER file (not a lease record)"}
    text = format_status(info)
    assert "owner:         unreadable OWNER file" in text and "done" in text
