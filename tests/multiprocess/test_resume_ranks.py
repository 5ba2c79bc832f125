"""Two real ranks (gloo, DDP): checksums checked while loading. A file whose bytes changed is found
by whichever rank reads it, and every rank chooses again and resumes from the same older checkpoint."""

import json

import torch

from distributed_helpers import run_ranks
from preemptible import Checkpointer, Run, params_sha256
from preemptible.checkpoint.layout import read_marker


def _ddp_run(rank, world, run_dir, steps):
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Linear(64, 1)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    run = Run(run_dir, model=model, optimizer=opt, max_steps=steps, checkpoint=Checkpointer(interval=4, keep=10))
    digests = {}
    with run:
        digests["start"] = [run.step, params_sha256(model)]
        while run.step < steps and not run.stopping:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 1)).backward()
            opt.step()
            run.step_done()
            digests[str(run.step)] = params_sha256(model)
    return digests


def test_a_changed_file_of_one_rank_makes_every_rank_resume_from_the_one_before(tmp_path):
    run_dir = str(tmp_path / "run")
    first = run_ranks(_ddp_run, 2, tmp_path, run_dir, 8)
    newest = tmp_path / "run" / "checkpoints" / "step_00000008"
    files = read_marker(newest)["files"]
    assert any(name.startswith("__1_") for name in files)  # rank 1 wrote files of its own
    shard = max((newest / n for n in files if n.startswith("__1_")), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    again = run_ranks(_ddp_run, 2, tmp_path, run_dir, 12)
    assert [r["start"] for r in again] == [[4, first[0]["4"]]] * 2  # both ranks: exactly step 4's state
    assert again[0]["8"] == again[1]["8"] == first[0]["8"]  # trained again: the same weights at 8
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in rows if r.get("event") == "resumed"][-1]
    assert resumed["from"].endswith("step_00000004") and resumed["skipped"][0][0].endswith("step_00000008")
    assert shard.name in resumed["skipped"][0][1] and "does not match its checksum" in resumed["skipped"][0][1]
