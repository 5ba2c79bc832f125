"""Checksums computed while writing, verified at resume; nothing in a checkpoint can run code."""

import json
import os
import pickle

import pytest
import torch

from preemptible import storage
from preemptible.checkpoint import COMMIT, Checkpointer, load_model_weights, load_state, read_marker, why_invalid
from preemptible.errors import ConfigError, UnsafeCheckpointError
from preemptible.state import from_blob


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
    """An attacker who edits files can also rewrite the marker's sizes and checksums."""
    marker = json.loads((path / COMMIT).read_text())
    for name in marker["files"]:
        marker["files"][name] = list(storage.file_crc32c(path / name))
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
    from preemptible.run import _RankState

    with pytest.raises(UnsafeCheckpointError):
        _RankState(run=None).load_state_dict({"blob": pickle.dumps(Payload(target))})
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
