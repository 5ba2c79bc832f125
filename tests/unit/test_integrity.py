"""Checksums computed while writing, verified at resume; nothing in a checkpoint can run code."""

import json
import os
import pickle

import pytest
import torch

from preemptible.checkpoint import storage
from preemptible.checkpoint.writer import (COMMIT, Checkpointer, load_model_weights, load_state, marker_checksum, read_marker,
                                   why_invalid)
from preemptible.errors import ConfigError, UnsafeCheckpointError
from preemptible.run.state import from_blob


class Payload:
    """What an attacker puts in a pickle: unpickling it creates a file."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def saved(tmp_path, state=None, name="ckpt"):
    ckpt = Checkpointer(dir=str(tmp_path / name), interval=1, keep=1)
    ckpt.setup(str(tmp_path), 0)
    return ckpt.save(5, state or {"w": torch.arange(4096.0), "nested": {"b": torch.ones(300)}, "step": 5})


def recommit(path):
    """An attacker who edits files can also rewrite the marker's sizes and checksums (its own too)."""
    marker = json.loads((path / COMMIT).read_text())
    for name in marker["files"]:
        marker["files"][name] = list(storage.file_crc32c(path / name))
    marker["marker_crc32c"] = marker_checksum(marker)
    (path / COMMIT).write_text(json.dumps(marker))


def test_every_file_is_checksummed_while_written_and_recorded_in_the_marker(tmp_path):
    path = saved(tmp_path)
    files = read_marker(path)["files"]
    assert ".metadata" in files and any(n.endswith(".distcp") for n in files)
    for name, (size, crc) in files.items():
        assert (size, crc) == storage.file_crc32c(path / name), name
    assert not list(path.glob(".sums_*"))  # folded into the marker
    assert why_invalid(path, verify=True) is None


def test_a_flipped_byte_is_found_and_named(tmp_path):
    path = saved(tmp_path)
    shard = sorted(path.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    assert why_invalid(path) is None  # sizes still match
    why = why_invalid(path, verify=True)
    assert why and shard.name in why and "does not match its checksum" in why


def test_crafted_metadata_never_runs(tmp_path):
    path = saved(tmp_path)
    target = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(Payload(target)))
    recommit(path)
    assert why_invalid(path, verify=True) is None  # consistent, and still refused
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|os\.system"):
        load_state(path, {"w": torch.zeros(4096)}, what="checkpoint")
    with pytest.raises(UnsafeCheckpointError):
        load_model_weights(torch.nn.Linear(2, 2), str(path))
    assert not target.exists()


def test_crafted_non_tensor_entry_never_runs(tmp_path):
    target = tmp_path / "pwned"
    path = saved(tmp_path, {"w": torch.zeros(4), "extra": Payload(target)})  # DCP torch.saves non-tensors
    assert not target.exists()
    with pytest.raises(UnsafeCheckpointError, match="extra"):
        load_state(path, {"w": torch.zeros(4), "extra": None}, what="checkpoint")
    assert not target.exists()


def test_crafted_rank_state_never_runs(tmp_path):
    target = tmp_path / "pwned"
    with pytest.raises(UnsafeCheckpointError, match="not plain data"):
        from_blob(pickle.dumps(Payload(target)), "rank state")  # the old pickled format, or a crafted one
    from preemptible.run.parts import RankState

    with pytest.raises(UnsafeCheckpointError):
        RankState(feed=None).load_state_dict({"blob": pickle.dumps(Payload(target))})
    assert not target.exists()


def test_crafted_state_dict_file_for_init_from_never_runs(tmp_path):
    target = tmp_path / "pwned"
    evil = tmp_path / "weights.pt"
    torch.save({"weight": Payload(target)}, evil)
    with pytest.raises(UnsafeCheckpointError, match="weights.pt"):
        load_model_weights(torch.nn.Linear(2, 2), str(evil))
    assert not target.exists()
    good = tmp_path / "good.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), good)
    load_model_weights(torch.nn.Linear(2, 2), str(good))
    with pytest.raises(ConfigError, match="does not fit"):
        load_model_weights(torch.nn.Linear(3, 3), str(good))


def test_safe_loading_reads_what_was_saved(tmp_path):
    state = {"w": torch.arange(4096.0), "nested": {"b": torch.ones(300)}, "step": 5, "name": "x", "lrs": [0.1, 0.2]}
    path = saved(tmp_path, dict(state))
    loaded = {"w": torch.zeros(4096), "nested": {"b": torch.zeros(300)}, "step": 0, "name": "", "lrs": []}
    load_state(path, loaded, what="checkpoint")
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["nested"]["b"], state["nested"]["b"])
    assert (loaded["step"], loaded["name"], loaded["lrs"]) == (5, "x", [0.1, 0.2])


# ----------------------------------------------------------------------------- what a checkpoint may reference


def _rewrite_metadata(path, change):
    """Load `.metadata` safely, let `change` alter it, write it back and recommit (consistent sums)."""
    from preemptible.checkpoint.safe_load import read_metadata

    meta = read_metadata(str(path))
    change(meta)
    (path / ".metadata").write_bytes(pickle.dumps(meta))
    recommit(path)


def test_a_marker_listing_a_file_outside_its_directory_is_skipped_with_a_reason(tmp_path):
    path = saved(tmp_path)
    outside = tmp_path / "secret"
    outside.write_bytes(b"not yours")
    marker = json.loads((path / COMMIT).read_text())
    marker["files"]["../../secret"] = list(storage.file_crc32c(outside))  # its true size and CRC
    marker["marker_crc32c"] = marker_checksum(marker)
    (path / COMMIT).write_text(json.dumps(marker))
    why = why_invalid(path, verify=True)
    assert "'../../secret'" in why and "not a file of this checkpoint's own directory" in why


def test_a_link_inside_a_checkpoint_is_not_followed(tmp_path):
    path = saved(tmp_path)
    shard = sorted(path.glob("*.distcp"))[0]
    elsewhere = tmp_path / "elsewhere.distcp"
    shard.rename(elsewhere)
    shard.symlink_to(elsewhere)  # same size, same bytes, but not the checkpoint's own file
    assert f"{shard.name} is a link" in why_invalid(path, verify=True)


def test_a_changed_marker_does_not_match_its_own_checksum(tmp_path):
    path = saved(tmp_path)
    text = (path / COMMIT).read_text()
    (path / COMMIT).write_text(text.replace('"step": 5', '"step": 6'))
    assert "does not match its own checksum" in why_invalid(path)


@pytest.mark.parametrize("field, value, words", [
    ("world_size", "two", "world_size='two' is not a rank count"),
    ("world_size", 0, "world_size=0"),
    ("step", -3, "step=-3"),
    ("files", {".metadata": [True, None]}, "bad entry for .metadata"),
])
def test_a_marker_with_odd_values_is_a_reason_not_a_traceback(tmp_path, field, value, words):
    path = saved(tmp_path)
    marker = json.loads((path / COMMIT).read_text())
    marker[field] = value
    marker["marker_crc32c"] = marker_checksum(marker)
    (path / COMMIT).write_text(json.dumps(marker))
    assert words in why_invalid(path)


def test_metadata_pointing_into_a_sibling_checkpoint_is_refused(tmp_path):
    """Both checkpoints are valid; A's .metadata is rewritten to read its tensors from B's file."""
    a = saved(tmp_path, name="a")
    b = saved(tmp_path, {"w": torch.full((4096,), 7.0), "nested": {"b": torch.ones(300)}, "step": 5}, name="b")
    shard = sorted(b.glob("*.distcp"))[0].name

    def redirect(meta):
        for info in meta.storage_data.values():
            info.relative_path = f"../../b/{b.name}/{shard}"
    _rewrite_metadata(a, redirect)
    assert why_invalid(a, verify=True) is None  # its own files are consistent
    with pytest.raises(UnsafeCheckpointError, match="outside the checkpoint's own files"):
        load_state(a, {"w": torch.zeros(4096)}, what="checkpoint")


def test_metadata_pointing_at_a_file_its_marker_does_not_list_is_refused(tmp_path):
    path = saved(tmp_path)
    shard = sorted(path.glob("*.distcp"))[0]
    (path / "extra.distcp").write_bytes(shard.read_bytes())  # dropped in later: never checksummed

    def redirect(meta):
        for info in meta.storage_data.values():
            info.relative_path = "extra.distcp"
    _rewrite_metadata(path, redirect)
    with pytest.raises(UnsafeCheckpointError, match="which its commit marker does not list"):
        load_state(path, {"w": torch.zeros(4096)}, what="checkpoint")


def test_a_crafted_tensor_size_is_refused_before_anything_is_allocated(tmp_path):
    """export builds tensors from .metadata's sizes: 2**40 elements must not be allocated (4 TiB)."""
    from preemptible.observe.export import model_weights

    model = torch.nn.Linear(4, 4)
    path = saved(tmp_path, {"model_optim": {"model": model.state_dict()}})

    def huge(meta):
        meta.state_dict_metadata["model_optim.model.weight"].size = torch.Size([2 ** 20, 2 ** 20])
    _rewrite_metadata(path, huge)
    with pytest.raises(UnsafeCheckpointError, match=r"claims 'model_optim.model.weight' is \(1048576, 1048576\)"):
        model_weights(path)


def test_a_head_naming_another_runs_checkpoint_is_not_followed(tmp_path):
    """`latest` rewritten to name another run's checkpoint (and copy its line): skipped with a
    reason; the run resumes from its own newest checkpoint."""
    import shutil

    mine = Checkpointer(dir=str(tmp_path / "mine"), interval=1, keep=2)
    mine.setup(str(tmp_path), 0)
    mine.save(3, {"w": torch.zeros(4)})
    theirs = Checkpointer(dir=str(tmp_path / "theirs"), interval=1, keep=2)
    theirs.setup(str(tmp_path), 0)
    other = theirs.save(9, {"w": torch.ones(4)})
    shutil.copy(tmp_path / "theirs" / "latest", tmp_path / "mine" / "latest")
    head = json.loads((tmp_path / "mine" / "latest").read_text())
    head["checkpoint"] = str(other)
    (tmp_path / "mine" / "latest").write_text(json.dumps(head))
    again = Checkpointer(dir=str(tmp_path / "mine"))
    again.setup(str(tmp_path), 0)
    with pytest.raises(ConfigError, match="outside this run's checkpoint directory"):
        again.resume_path()  # its line is the other run's: nothing of this run's is on it, and it says why
