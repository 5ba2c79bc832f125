"""Early writeback, fsync=false and the zip CRC switch change how a checkpoint is written, never what."""

import os
import threading
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

from preemptible.checkpoint import storage
from preemptible.checkpoint.writer import Checkpointer, why_invalid
from preemptible.errors import ConfigError


def make_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(1024, 1024, generator=g), "b": torch.randn(4096, generator=g),
            "nested": {"m": torch.randn(512, 700, generator=g)}, "step": 7}


def save(tmp_path, name: str, **options) -> "os.PathLike":
    ckpt = Checkpointer(dir=str(tmp_path / name), interval=1, keep=1, **options)
    ckpt.setup(str(tmp_path), 0)
    return ckpt.save(3, make_state())


def data_files(path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.suffix == ".distcp"}


def test_every_way_of_writing_gives_the_same_bytes_and_a_committed_checkpoint(tmp_path):
    written = {name: save(tmp_path, name, **opts) for name, opts in {
        "default": {}, "no_writeback": {"writeback_mib": 0}, "tiny_kicks": {"writeback_mib": 1},
        "crc": {"zip_crc32": True, "writeback_mib": 1}, "not_durable": {"fsync": False},
        "threads": {"write_threads": 4}}.items()}
    for path in written.values():
        assert why_invalid(path) is None
        loaded = {"w": torch.zeros(1024, 1024), "b": torch.zeros(4096), "nested": {"m": torch.zeros(512, 700)}, "step": 0}
        dcp.load(loaded, checkpoint_id=str(path))
        expected = make_state()
        assert torch.equal(loaded["w"], expected["w"]) and torch.equal(loaded["nested"]["m"], expected["nested"]["m"])
        assert loaded["step"] == 7
    # Same writer thread count, same layout: byte-identical data files, CRC fields aside.
    reference = data_files(written["no_writeback"])
    assert data_files(written["tiny_kicks"]) == reference
    assert data_files(written["default"]) == reference


def test_writeback_is_requested_while_writing(tmp_path, monkeypatch):
    calls = []
    real = storage.start_writeback
    if real is None:
        pytest.skip("sync_file_range is not available on this platform")

    def counting(fd, offset, nbytes):
        calls.append((offset, nbytes))
        real(fd, offset, nbytes)

    monkeypatch.setattr(storage, "start_writeback", counting)
    save(tmp_path, "kicked", writeback_mib=1, write_threads=1)
    # ~6.4 MiB of tensors in one file: a request per MiB, contiguous from offset 0.
    assert len(calls) >= 5
    offsets = sorted(calls)
    assert offsets[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(offsets, offsets[1:]))
    calls.clear()
    save(tmp_path, "not_durable", fsync=False)
    assert calls == []  # without fsync the bytes may stay cached: no writeback is forced


def test_fsync_false_never_fsyncs_and_the_default_does(tmp_path, monkeypatch):
    count = {"n": 0}
    real = os.fsync

    def counting(fd):
        count["n"] += 1
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    save(tmp_path, "durable")
    assert count["n"] >= 4  # data files, .metadata, the marker, directories, latest
    count["n"] = 0
    save(tmp_path, "fast", fsync=False)
    assert count["n"] == 0


def test_the_crc_switch_is_restored_after_a_save(tmp_path):
    before = torch.serialization.get_crc32_options()
    save(tmp_path, "a", zip_crc32=False)
    assert torch.serialization.get_crc32_options() == before
    save(tmp_path, "b", zip_crc32=True)
    assert torch.serialization.get_crc32_options() == before


def test_without_sync_file_range_files_are_written_as_dcp_does(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "start_writeback", None)
    path = save(tmp_path, "plain")
    assert why_invalid(path) is None
    monkeypatch.undo()
    assert data_files(path) == data_files(save(tmp_path, "kicked", writeback_mib=1))


def test_a_closing_file_waits_for_its_writeback_requests(tmp_path, monkeypatch):
    seen = []

    def slow(fd, offset, nbytes):
        time.sleep(0.2)
        os.fstat(fd)  # raises if the descriptor was closed under the request
        seen.append(threading.current_thread().name)

    monkeypatch.setattr(storage, "start_writeback", slow)
    fs = storage.ChecksumFileSystem(kick_bytes=5)
    with fs.create_stream(tmp_path / "f", "wb") as stream:
        stream.write(b"x" * 10)
    assert seen and seen[0].startswith("preemptible-writeback")
    assert (tmp_path / "f").read_bytes() == b"x" * 10
    assert fs.sums["f"] == storage.file_crc32c(tmp_path / "f")  # checksummed while written


@pytest.mark.parametrize("options, words", [
    ({"writeback_mib": -1}, "writeback_mib=-1"),
    ({"writeback_mib": 1.5}, "writeback_mib=1.5"),
    ({"fsync": "yes"}, "fsync='yes'; expected true or false"),
    ({"zip_crc32": 1}, "zip_crc32=1; expected true or false"),
])
def test_bad_write_options_name_the_value(options, words):
    """The part names its own argument (the recipe's build() puts the node's name before it)."""
    with pytest.raises(ConfigError) as e:
        Checkpointer(**options)
    assert str(e.value).startswith(words)
