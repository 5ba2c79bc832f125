"""The object-storage tier piece by piece, against moto's S3 server on 127.0.0.1."""

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from s3_helpers import S3  # noqa: E402

from preemptible import ConfigError  # noqa: E402
from preemptible.checkpoint.writer import Checkpointer, why_invalid  # noqa: E402
from preemptible.checkpoint.remote import Remote, Uploader  # noqa: E402
from preemptible.ownership.remote_lease import RemoteLease  # noqa: E402


@pytest.fixture(scope="module")
def s3():
    store = S3()
    old = {k: os.environ.get(k) for k in store.env}
    os.environ.update(store.env)
    yield store
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    store.close()


def _checkpoint(root, step, payload=b"x" * 5000):
    """A locally committed checkpoint as Checkpointer writes one (files, marker with sizes and CRC-32C)."""
    import crc32c

    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    files = {".metadata": b"meta" + bytes([step]), "__0_0.distcp": payload + bytes([step])}
    for name, data in files.items():
        (d / name).write_bytes(data)
    marker = {"format": 2, "step": step, "world_size": 1, "lineage": "l", "line": [["l", None]],
              "files": {n: [len(b), crc32c.crc32c(b)] for n, b in files.items()}}
    (d / "COMMITTED").write_text(json.dumps(marker))
    assert why_invalid(d, verify=True) is None
    return d


def test_upload_marker_last_then_download_verified(tmp_path, s3):
    remote = Remote("s3://ckpt/u1")
    local = _checkpoint(tmp_path / "a", 10)
    remote.upload(local)
    assert remote.listing() == ([(10, "step_00000010")], []) and remote.head() == "step_00000010"
    assert remote.download("step_00000010", tmp_path / "b" / "step_00000010") is None
    assert (tmp_path / "b" / "step_00000010" / "__0_0.distcp").read_bytes() == (local / "__0_0.distcp").read_bytes()
    # an upload that stopped before its marker is listed as unfinished, never as committed
    s3.put("u1/step_00000020/__0_0.distcp", b"partial")
    assert remote.listing() == ([(10, "step_00000010")], [(20, "step_00000020")])
    s3.put("u1/step_00000005/__0_0.distcp", b"left by a killed upload")
    remote.prune(keep=1)  # unfinished and older than the newest commit: removed; newer: maybe in progress, kept
    assert remote.listing() == ([(10, "step_00000010")], [(20, "step_00000020")])


def test_a_flipped_byte_on_the_store_is_caught_on_download(tmp_path, s3):
    remote = Remote("s3://ckpt/u2")
    remote.upload(_checkpoint(tmp_path / "a", 5))
    blob = bytearray(s3.get("u2/step_00000005/__0_0.distcp"))
    blob[100] ^= 0x10
    s3.put("u2/step_00000005/__0_0.distcp", bytes(blob))
    why = remote.download("step_00000005", tmp_path / "b" / "step_00000005")
    assert "does not match its checksum" in why and not (tmp_path / "b" / "step_00000005").exists()


def test_uploader_takes_the_newest_and_prunes(tmp_path, s3):
    remote = Remote("s3://ckpt/u3")
    up = Uploader(remote, keep=2)
    for step in (1, 2, 3, 4):
        up.submit(_checkpoint(tmp_path, step))
    assert up.wait(30) and up.error is None and up.uploaded == "step_00000004"
    committed, _ = remote.listing()
    assert committed[0] == (4, "step_00000004") and len(committed) <= 2


def test_the_lease_refuses_a_second_owner_and_takes_over_a_stale_one(s3):
    first = RemoteLease(Remote("s3://ckpt/u4"), wait=0.5, stale_after=1).acquire()
    with pytest.raises(ConfigError, match=r"dir='s3://ckpt/u4' is in use by another run \(pid \d+"):
        RemoteLease(Remote("s3://ckpt/u4"), wait=1.5, stale_after=1).acquire()  # renewals seen: alive
    first._stop.set()  # the owner dies without releasing: its lease goes unrenewed
    started = time.monotonic()
    second = RemoteLease(Remote("s3://ckpt/u4"), wait=5, stale_after=1).acquire()
    assert 0.9 <= time.monotonic() - started < 4  # watched unchanged for the owner's stale_after
    assert json.loads(s3.get("u4/OWNER"))["token"] == second.token
    # the old owner comes back: its next renewal (If-Match its old ETag) is refused, and it knows
    first._stop.clear()
    first.stale_after = 0.3
    renewer = threading.Thread(target=first._renew, daemon=True)
    renewer.start()
    until = time.monotonic() + 5
    while first.lost is None and time.monotonic() < until:
        time.sleep(0.05)
    first._stop.set()
    assert first.lost and "took s3://ckpt/u4 over" in first.lost
    with pytest.raises(Exception, match="nothing more is committed there"):
        first.check()
    second.release()
    assert "u4/OWNER" not in s3.keys("u4/")


class _SkewedLease(RemoteLease):
    """An owner whose clock is `behind` seconds behind ours: every record it writes says so."""
    behind = 60.0

    def _record(self) -> bytes:
        record = json.loads(super()._record())
        record["renewed"] -= self.behind
        return json.dumps(record).encode()


def test_an_owner_whose_clock_is_a_minute_behind_is_never_taken_over_while_it_renews(s3):
    """Judged by comparing clocks, its lease looks 60 s old (stale after 1 s); judged by watching
    its renewals, it is alive: the newcomer waits, then refuses, and the owner keeps the prefix."""
    owner = _SkewedLease(Remote("s3://ckpt/skew"), wait=0, stale_after=1).acquire()
    try:
        with pytest.raises(ConfigError, match="is in use by another run"):
            RemoteLease(Remote("s3://ckpt/skew"), wait=3, stale_after=1).acquire()
        assert json.loads(s3.get("skew/OWNER"))["token"] == owner.token and owner.lost is None
        owner.check()
    finally:
        owner.release()


@pytest.mark.parametrize("url, words", [
    ("ftp://host/x", "ftp:// is not supported; use s3://bucket/prefix"),
    ("gs://bucket/prefix", "gs:// is not supported"),
    ("s3://bucket", "expected s3://bucket/prefix"),
    ("s3://bucket/", "expected s3://bucket/prefix"),
])
def test_unsupported_urls_are_refused_before_any_lookup(url, words, monkeypatch):
    import socket

    def no_lookup(*args, **kwargs):
        raise AssertionError(f"a name lookup for {args[0]!r}")
    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    with pytest.raises(ConfigError, match=words):
        Checkpointer(dir=url)


def test_s3_without_credentials_is_refused_at_construction(tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    from preemptible import Run

    with pytest.raises(ConfigError, match="no S3 credentials are configured"):
        Run(tmp_path / "run", checkpoint=Checkpointer(dir="s3://bucket/prefix"))
    assert not (tmp_path / "run").exists()


def test_bad_remote_settings_are_named(tmp_path):
    with pytest.raises(ConfigError, match="local_dir='/x' is for a remote dir"):
        Checkpointer(dir=str(tmp_path), local_dir="/x")
    with pytest.raises(ConfigError, match="local_dir='s3://a/b'"):
        Checkpointer(dir="s3://ckpt/x", local_dir="s3://a/b")
    with pytest.raises(ConfigError, match="dir='nosuch://bucket/x'"):
        Checkpointer(dir="nosuch://bucket/x")
