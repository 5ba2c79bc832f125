"""A resume checks every file's CRC-32C while it loads it (each file read once from disk, no verify
pass first); a file whose bytes changed stops the load and the run chooses again with every
checksum checked first, resuming exactly from the next valid checkpoint."""

import json
import logging

import pytest
import torch

from preemptible import Checkpointer, CorruptCheckpointError, Run, params_sha256
from preemptible.checkpoint import layout, safe_load
from preemptible.checkpoint.layout import read_marker

STEPS = 12


def model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Linear(64, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(run_dir, steps=STEPS, every=4):
    """A small model and AdamW trained to `steps` with a checkpoint every `every`; the digest of
    the parameters at each saved step and at the start of the run (after its resume)."""
    model, opt = model_and_optimizer()
    run = Run(run_dir, model=model, optimizer=opt, max_steps=steps, checkpoint=Checkpointer(interval=every, keep=10))
    digests = {}
    with run:
        digests["start"] = (run.step, params_sha256(model))
        while run.step < steps and not run.stopping:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 1)).backward()
            opt.step()
            run.step_done()
            if run.step % every == 0:
                digests[run.step] = params_sha256(model)
    return run, digests


def flip(checkpoint, where):
    """One byte of the checkpoint's biggest shard flipped, the size unchanged (only the checksum can tell)."""
    shard = max(checkpoint.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[where(len(data))] ^= 0x10
    shard.write_bytes(bytes(data))
    return shard


def resumed_events(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == "resumed"]


def test_a_resume_reads_each_file_once_and_checks_it_while_loading(tmp_path, monkeypatch):
    _, first = train(tmp_path, steps=8)
    summed, verified = [], []
    real = safe_load.file_crc32c
    monkeypatch.setattr(safe_load, "file_crc32c", lambda path, **kw: (summed.append(str(path)), real(path, **kw))[1])
    monkeypatch.setattr(layout, "_verify_checksums", lambda *a: verified.append(a))  # the pass before loading
    run, digests = train(tmp_path)
    assert digests["start"] == (8, first[8])
    assert not verified  # no verify pass: the load checked the sums
    files = read_marker(tmp_path / "checkpoints" / "step_00000008")["files"]
    assert sorted(name.rsplit("/", 1)[-1] for name in summed) == sorted(files)  # each file once, every file
    assert resumed_events(tmp_path)[-1]["from"].endswith("step_00000008")


@pytest.mark.parametrize("where", [lambda n: n // 2, lambda n: 40], ids=["in a tensor's bytes", "in a record's header"])
def test_a_changed_file_found_while_loading_resumes_exactly_from_the_one_before(tmp_path, caplog, where):
    _, first = train(tmp_path, steps=8)
    shard = flip(tmp_path / "checkpoints" / "step_00000008", where)
    with caplog.at_level(logging.WARNING):
        run, digests = train(tmp_path)
    assert f"{shard.name} does not match its checksum" in caplog.text
    assert "choosing the checkpoint to resume from again" in caplog.text
    assert digests["start"] == (4, first[4])  # exactly the step-4 state, nothing of the changed one
    event = resumed_events(tmp_path)[-1]
    assert event["from"].endswith("step_00000004") and "step_00000008" in event["skipped"][0][0]
    assert digests[8] == first[8] and run.step == STEPS  # trained again from 4: the same weights at 8


def test_the_checkpointer_load_names_the_changed_file(tmp_path):
    train(tmp_path, steps=4)
    path = tmp_path / "checkpoints" / "step_00000004"
    shard = flip(path, lambda n: n // 2)
    model, _ = model_and_optimizer()
    state = {"model_optim": {"model": model.state_dict()}}
    cp = Checkpointer()
    with pytest.raises(CorruptCheckpointError, match=f"{shard.name} does not match its checksum .* the commit says"):
        cp.load(path, state, checksums=True)
    cp.load(path, state)  # without checksums the same bytes load: a flipped bit in a weight is not an error
    with pytest.raises(CorruptCheckpointError):
        Checkpointer(verify=True).load(path, state, checksums=True)
    Checkpointer(verify=False).load(path, state, checksums=True)  # verify=False: no checksums anywhere


def test_resume_path_given_a_changed_checkpoint_is_refused_with_the_reason(tmp_path):
    train(tmp_path, steps=8)
    path = tmp_path / "checkpoints" / "step_00000004"
    shard = flip(path, lambda n: n // 2)
    model, opt = model_and_optimizer()
    run = Run(tmp_path / "other", model=model, optimizer=opt, checkpoint=Checkpointer(resume=str(path)))
    with pytest.raises(Exception, match=f"resume=.*is not a valid checkpoint: {shard.name} does not match its checksum"):
        with run:
            pass


def test_a_changed_metadata_file_is_one_line_not_dcps_tracebacks(tmp_path, caplog):
    """.metadata's bytes changed: the resume falls back to the checkpoint before with its one line;
    DCP's own 'Global metadata is not found' traceback (on the root logger) and its second try at
    per-rank metadata files (a second traceback) do not appear."""
    _, first = train(tmp_path, steps=8)
    meta = tmp_path / "checkpoints" / "step_00000008" / ".metadata"
    data = bytearray(meta.read_bytes())
    for i in range(10, len(data), 7):
        data[i] ^= 0xFF
    meta.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        run, digests = train(tmp_path)
    assert digests["start"] == (4, first[4])
    shown = [r for r in caplog.records if r.levelno >= logging.WARNING]  # what a user's log shows
    assert any(".metadata does not match its checksum" in r.getMessage() for r in shown)
    assert not any(r.exc_info for r in shown), [r.getMessage() for r in shown if r.exc_info]
    assert not any("metadata is not found" in r.getMessage() for r in shown)
    assert logging.getLogger().filters == []  # the filter was the load's alone
