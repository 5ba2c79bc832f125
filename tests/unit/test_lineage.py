"""Which checkpoint is the head: going back, branching, `never`, pruning by line (one process)."""

import json
import logging
import shutil

import pytest
import torch

from preemptible.checkpoint.writer import ABANDONED, LATEST, Checkpointer, read_marker
from preemptible.errors import ConfigError


def state(step):
    return {"w": torch.full((64,), float(step)), "step": step}


class Run:
    """What a run does with its checkpointer: resume, adopt, save; `step` continues from the resume."""

    def __init__(self, root, resume="auto", keep=2, **kw):
        self.ckpt = Checkpointer(dir=str(root), interval=10, keep=keep, resume=resume, **kw).setup(str(root), 0)
        self.decision = self.ckpt.resume_path()
        self.step = 0
        if self.decision.path is not None:
            loaded = state(0)
            self.ckpt.load(self.decision.path, loaded)
            self.step = loaded["step"]
            self.ckpt.adopt(self.decision, self.step)

    def train_to(self, step, every=10):
        while self.step < step:
            self.step += 1
            if self.step % every == 0 or self.step == step:
                self.ckpt.save(self.step, state(self.step))
        return self


def names(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))


def head(root):
    return json.loads((root / LATEST).read_text())["checkpoint"]


def test_auto_follows_the_head_and_keeps_the_newest_of_its_line(tmp_path):
    Run(tmp_path).train_to(40)
    assert names(tmp_path) == ["step_00000030", "step_00000040"] and head(tmp_path) == "step_00000040"
    run = Run(tmp_path)
    assert run.decision.path.name == "step_00000040" and run.step == 40


def test_going_back_branches_keeps_the_abandoned_apart_and_the_same_command_continues_the_branch(tmp_path):
    Run(tmp_path, keep=4).train_to(40)
    back = tmp_path / "step_00000020"
    run = Run(tmp_path, resume=str(back), keep=4)  # a loss spike after 20: go back
    assert run.decision.branched and run.step == 20
    assert names(tmp_path) == ["step_00000010", "step_00000020"]  # 30 and 40 are not on the new branch
    abandoned = sorted(p.name for p in (tmp_path / ABANDONED).rglob("step_*"))
    assert abandoned == ["step_00000030", "step_00000040"]
    assert head(tmp_path) == "step_00000020"  # preempted now: the head is where it went back to
    run.train_to(35, every=5)  # then preempted at 35
    assert head(tmp_path) == "step_00000035"
    again = Run(tmp_path, resume=str(back), keep=4)  # the same command again, as a requeue runs it
    assert again.decision.path.name == "step_00000035" and not again.decision.branched
    assert read_marker(tmp_path / "step_00000035")["parent"] == "step_00000030"
    auto = Run(tmp_path, keep=4)
    assert auto.decision.path.name == "step_00000035"


def test_pruning_never_takes_the_checkpoint_resumed_from_before_a_newer_commit(tmp_path):
    Run(tmp_path, keep=3).train_to(40)
    run = Run(tmp_path, resume=str(tmp_path / "step_00000020"), keep=1)
    assert "step_00000020" in names(tmp_path)
    run.train_to(25, every=5)  # the first commit after going back
    assert names(tmp_path) == ["step_00000025"]
    assert Run(tmp_path, keep=1).decision.path.name == "step_00000025"


def test_a_higher_step_of_another_line_is_never_followed_or_pruned(tmp_path):
    Run(tmp_path, keep=4).train_to(40)
    Run(tmp_path, resume=str(tmp_path / "step_00000020"), keep=4).train_to(30)
    stray = tmp_path / "step_00000090"
    shutil.copytree(next((tmp_path / ABANDONED).rglob("step_00000040")), stray)  # a foreign lineage, higher step
    run = Run(tmp_path, keep=1)
    assert run.decision.path.name == "step_00000030"
    run.train_to(50)
    assert stray.exists() and "step_00000050" in names(tmp_path)


def test_never_refuses_a_directory_with_checkpoints(tmp_path):
    Run(tmp_path).train_to(20)
    before = names(tmp_path)
    with pytest.raises(ConfigError, match=r"resume=never.*step_00000020.*resume=auto"):
        Run(tmp_path, resume="never")
    assert names(tmp_path) == before
    fresh = Run(tmp_path / "new", resume="never").train_to(10)
    assert names(tmp_path / "new") == ["step_00000010"]
    assert fresh.decision.path is None


def test_a_branch_from_another_runs_checkpoint_never_touches_it(tmp_path):
    Run(tmp_path / "a", keep=4).train_to(40)
    source = tmp_path / "a" / "step_00000030"
    run = Run(tmp_path / "b", resume=str(source)).train_to(45, every=5)
    assert names(tmp_path / "a") == ["step_00000010", "step_00000020", "step_00000030", "step_00000040"]
    assert names(tmp_path / "b") == ["step_00000040", "step_00000045"]
    assert Run(tmp_path / "b", resume=str(source)).decision.path.name == "step_00000045"
    assert run.decision.branched


def test_corrupt_head_falls_back_along_its_line(tmp_path, caplog):
    Run(tmp_path, keep=3).train_to(30)
    shard = next((tmp_path / "step_00000030").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 1
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        run = Run(tmp_path, keep=3)
    assert run.decision.path.name == "step_00000020"
    assert "does not match its checksum" in caplog.text
    assert run.decision.skipped and "step_00000030" in run.decision.skipped[0][0]


def test_no_valid_checkpoint_on_the_line_is_an_error_not_a_fresh_start(tmp_path):
    Run(tmp_path, keep=1).train_to(20)
    (tmp_path / "step_00000020" / "COMMITTED").write_text("{garbage")
    with pytest.raises(ConfigError, match="no valid checkpoint is left"):
        Run(tmp_path, keep=1)


def test_a_commit_whose_head_record_cannot_be_replaced_still_counts(tmp_path, caplog):
    run = Run(tmp_path).train_to(10)
    (tmp_path / (LATEST + ".tmp")).mkdir()  # replacing `latest` fails (as on a full disk)
    with caplog.at_level(logging.WARNING):
        run.ckpt.save(20, state(20))
    assert "step_00000020 is committed, but latest could not be replaced" in caplog.text
    assert "nothing was committed" not in caplog.text
    assert head(tmp_path) == "step_00000010"
    (tmp_path / (LATEST + ".tmp")).rmdir()
    assert Run(tmp_path).decision.path.name == "step_00000020"  # the newer commit of the head's line


def test_going_back_then_requeued_continues_the_branch_after_pruning_took_its_start(tmp_path):
    """resume=PATH, stopped, the same command again (a SLURM requeue): the branch continues even
    once pruning removed PATH itself; the resume is the branch's newest commit."""
    Run(tmp_path, keep=3).train_to(30)
    back = tmp_path / "step_00000010"
    Run(tmp_path, resume=str(back), keep=3).train_to(40)  # 20', 30', 40' committed: 10 pruned
    assert not back.exists() and names(tmp_path) == ["step_00000020", "step_00000030", "step_00000040"]
    again = Run(tmp_path, resume=str(back), keep=3)  # the requeued job: the same command
    assert again.decision.path.name == "step_00000040" and again.step == 40 and not again.decision.branched
    again.train_to(50)
    third = Run(tmp_path, resume=str(back), keep=3)  # and again: still the branch
    assert third.step == 50
    assert json.loads((tmp_path / LATEST).read_text())["branched_from"] == str(back.absolute())
