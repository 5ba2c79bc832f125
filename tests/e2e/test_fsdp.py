"""FSDP2 (fully_shard) on CPU/gloo: sharded checkpoints, exact resume, resume on other world sizes."""

import re

import pytest

from recipe_helpers import events, interrupt_at, losses, run

pytestmark = pytest.mark.slow
STEPS = 60
FSDP = ["trainer.parallelism=fsdp", f"trainer.max_steps={STEPS}", "checkpoint.interval=10"]


def test_fsdp_interrupted_then_resumed_is_bit_identical(tmp_path):
    """4 ranks (the README's FSDP exactness claim), a signal to one, async saves, a grace period."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ("trainer.parallelism=fsdp", "trainer.max_steps=24", "checkpoint.interval=10")
    code, log = run(full, *args, nproc=4)
    assert code == 0, log
    code, log = interrupt_at(cut, 12, *args, "checkpoint.async_save=true", "stopping.grace_period=30",
                             nproc=4, rank=3)
    stop = events(cut, "preempted")[0]
    assert stop["ranks"] == {"3": "SIGTERM"} and stop["checkpoint"], log  # saved inside torchrun's 30 s
    agreed = re.findall(r"\[rank (\d)\].*stop agreed at step (\d+)", log)
    assert {r for r, _ in agreed} == {"0", "1", "2", "3"} and {int(s) for _, s in agreed} == {stop["step"]}
    shards = sorted(p.name for p in (cut / "checkpoints" / f"step_{stop['step']:08d}").iterdir())
    assert all(sum(name.startswith(f"__{r}_") for name in shards) for r in range(4))  # every rank its own shards
    code, log = run(cut, *args, "checkpoint.async_save=true", nproc=4)
    assert code == 0, log
    assert events(cut, "done")[-1]["params_sha256"] == events(full, "done")[-1]["params_sha256"]
    assert losses(cut) == losses(full)


def _continues_without_a_jump(run_dir, step):
    """Training keeps going down from where it was: no step back up towards a fresh start."""
    l = losses(run_dir)
    before = sum(l[s] for s in range(step - 4, step + 1)) / 5
    after = sum(l[s] for s in range(step + 1, step + 6)) / 5
    assert after < before + 0.05, (before, after)
    assert l[step + 1] < l[1] - 0.3, (l[1], l[step + 1])


def test_resume_on_a_different_world_size(tmp_path):
    """4 ranks -> 2 ranks -> 4 ranks: parameters at each resume are the saved ones exactly."""
    code, log = interrupt_at(tmp_path, 15, *FSDP, nproc=4)
    first = events(tmp_path, "preempted")[0]
    assert first["checkpoint"], log
    code, log = interrupt_at(tmp_path, first["step"] + 15, *FSDP, nproc=2)
    resumed = events(tmp_path, "resumed")[0]
    assert (resumed["saved_world_size"], resumed["world_size"]) == (4, 2), log
    assert resumed["step"] == first["step"] and resumed["params_sha256"] == first["params_sha256"]
    assert "RNG streams are reseeded" in log and "the data continues at the same global position" in log
    second = events(tmp_path, "preempted")[1]
    code, log = run(tmp_path, *FSDP, nproc=4)
    assert code == 0, log
    back = events(tmp_path, "resumed")[1]
    assert (back["saved_world_size"], back["world_size"]) == (2, 4)
    assert back["params_sha256"] == second["params_sha256"]
    assert sorted(losses(tmp_path)) == list(range(1, STEPS + 1))
    _continues_without_a_jump(tmp_path, first["step"])
    _continues_without_a_jump(tmp_path, second["step"])


def test_ddp_checkpoint_resumes_on_another_world_size_too(tmp_path):
    code, log = interrupt_at(tmp_path, 15, f"trainer.max_steps={STEPS}", nproc=2)
    stop = events(tmp_path, "preempted")[0]
    code, log = run(tmp_path, f"trainer.max_steps={STEPS}")  # one process now
    assert code == 0, log
    resumed = events(tmp_path, "resumed")[0]
    assert resumed["params_sha256"] == stop["params_sha256"] and resumed["saved_world_size"] == 2


def test_fsdp_without_a_process_group_is_a_clear_error(tmp_path):
    code, log = run(tmp_path, "trainer.parallelism=fsdp", "trainer.max_steps=2")
    assert code == 2 and "launch with torchrun" in log
