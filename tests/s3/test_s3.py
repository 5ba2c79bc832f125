"""Checkpoints on S3 with the disk's guarantees, against a real S3 server (moto's) on 127.0.0.1.

Every run here is the real recipe in real processes. "A new machine" is a fresh run directory:
nothing local, only what the store holds."""

import json
import re
import signal
import time

import pytest

from conftest import REFERENCE_STEPS
from recipe_helpers import events, losses, run, start, wait_for_step
from s3_helpers import S3

pytestmark = pytest.mark.slow
STEPS = REFERENCE_STEPS


@pytest.fixture
def s3(monkeypatch):
    store = S3()
    for k, v in store.env.items():
        monkeypatch.setenv(k, v)
    yield store
    store.close()


def _dir(prefix):
    return f"checkpoint.dir=s3://ckpt/{prefix}"


def _committed(s3, prefix):
    return sorted({k.split("/")[1] for k in s3.keys(prefix + "/") if k.endswith("/COMMITTED")})


def test_stop_then_resume_on_a_new_machine_is_bit_identical(tmp_path, s3, reference):
    """2 ranks: SIGTERM, the stop's checkpoint reaches the store (marker last, then latest); a fresh
    run directory resumes from the store and finishes equal to the uninterrupted run."""
    common = [f"trainer.max_steps={STEPS}", "checkpoint.interval=10", _dir("r")]
    proc = start(tmp_path / "a", *common, nproc=2)
    wait_for_step(tmp_path / "a", 14, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    stop = events(tmp_path / "a", "preempted")[0]
    assert stop["uploaded"] is True, out[-3000:]
    name = f"step_{stop['step']:08d}"
    assert json.loads(s3.get("r/latest"))["checkpoint"] == name and name in _committed(s3, "r")
    assert "r/OWNER" not in s3.keys("r/")  # the lease is released
    code, out = run(tmp_path / "b", *common, nproc=2)
    assert code == 0, out[-3000:]
    assert f"downloaded {name} from s3://ckpt/r" in out
    assert events(tmp_path / "b", "resumed")[0]["step"] == stop["step"]
    done, ref = events(tmp_path / "b", "done"), events(reference[2], "done")
    assert done[0]["params_sha256"] == ref[-1]["params_sha256"]
    both = {**losses(tmp_path / "a"), **losses(tmp_path / "b")}
    assert both == losses(reference[2])
    assert _committed(s3, "r")[-1] == f"step_{STEPS:08d}" and len(_committed(s3, "r")) <= 2  # pruned to keep=2


def test_sigkill_during_an_upload_never_leaves_a_loadable_torn_checkpoint(tmp_path, s3):
    """Every upload after step 10's is slowed to a crawl and the run SIGKILLed in the middle of one:
    the store holds some of its objects but no marker; a new machine skips it, saying why, and
    resumes from step 10."""
    common = ["trainer.max_steps=100000", "checkpoint.interval=10", _dir("k"), "model.n_embd=64",
              "ownership.stale_after=2"]  # the killed owner's lease goes stale after 2 s
    proc = start(tmp_path / "a", *common)
    wait_for_step(tmp_path / "a", 12, proc)
    deadline = time.monotonic() + 60
    while "k/step_00000010/COMMITTED" not in s3.keys("k/") and time.monotonic() < deadline:
        time.sleep(0.05)
    s3.proxy.throttle = 100_000  # bytes/s: the next upload takes seconds
    later = lambda: [k for k in s3.keys("k/step_") if not k.startswith("k/step_00000010/")]  # noqa: E731
    while not later() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.communicate(timeout=60)
    s3.proxy.throttle = None
    keys = later()
    torn = sorted({k.split("/")[1] for k in keys})
    assert len(torn) == 1 and not any(k.endswith("/COMMITTED") for k in keys), keys  # some objects, no marker
    code, out = run(tmp_path / "b", "trainer.max_steps=12", "checkpoint.interval=10", _dir("k"), "model.n_embd=64",
                    "ownership.stale_after=2", "ownership.wait=30")
    assert code == 0, out[-3000:]
    resumed = events(tmp_path / "b", "resumed")[0]
    assert resumed["step"] == 10
    assert any(torn[0] in where and "no COMMITTED object" in why for where, why in resumed["skipped"])


def test_missing_truncated_and_flipped_objects_are_each_skipped_with_a_reason(tmp_path, s3):
    # Steps of 0.2 s: each checkpoint's upload ends before the next one is committed (the uploader
    # skips a pending older one for a newer one, so millisecond steps on a busy machine left step 15 out).
    spaced = {"PREEMPTIBLE_FAULTS": json.dumps([{"at": "step", "sleep": 0.2}])}
    code, out = run(tmp_path / "a", "trainer.max_steps=20", "checkpoint.interval=5", "checkpoint.keep=5", _dir("c"),
                    env=spaced)
    assert code == 0, out[-3000:]
    assert _committed(s3, "c") == [f"step_000000{s:02d}" for s in (5, 10, 15, 20)]
    marker = json.loads(s3.get("c/step_00000020/COMMITTED"))
    data = sorted(n for n in marker["files"] if n.endswith(".distcp"))[0]
    blob = bytearray(s3.get(f"c/step_00000020/{data}"))
    blob[len(blob) // 2] ^= 0x01
    s3.put(f"c/step_00000020/{data}", bytes(blob))                                  # a flipped byte
    s3.put(f"c/step_00000015/{data}", s3.get(f"c/step_00000015/{data}")[:-100])     # truncated
    s3.delete(f"c/step_00000010/{data}")                                            # missing
    code, out = run(tmp_path / "b", "trainer.max_steps=20", "checkpoint.interval=5", "checkpoint.keep=5", _dir("c"))
    assert code == 0, out[-3000:]
    resumed = events(tmp_path / "b", "resumed")[0]
    assert resumed["step"] == 5
    why = {re.search(r"step_\d+", w).group(): r for w, r in resumed["skipped"]}
    assert "does not match its checksum (crc32c" in why["step_00000020"], why
    assert "bytes on s3://ckpt/c, the commit says" in why["step_00000015"], why
    assert f"{data} is missing" in why["step_00000010"], why


def test_the_store_going_away_mid_save_fails_with_one_line_and_keeps_the_last_commit(tmp_path, s3):
    common = ["trainer.max_steps=100000", "checkpoint.interval=10", _dir("g"), "ownership.stale_after=2"]
    proc = start(tmp_path / "a", *common)
    wait_for_step(tmp_path / "a", 13, proc)
    deadline = time.monotonic() + 60
    while "g/step_00000010/COMMITTED" not in s3.keys("g/") and time.monotonic() < deadline:
        time.sleep(0.05)
    # one run per prefix: a second run on it (another machine) is refused, naming the owner
    code, out = run(tmp_path / "other", "trainer.max_steps=10", _dir("g"), "ownership.wait=1")
    assert code == 2 and "error: checkpoint.dir='s3://ckpt/g' is in use by another run (pid" in out, out[-2000:]
    s3.proxy.cut()
    head = json.loads(s3.get("g/latest"))["checkpoint"]  # read behind the proxy: what the store holds now
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, out[-3000:]
    assert "upload of step_" in errors[0] and "failed" in errors[0] and f"head stays {head}" in errors[0]
    stop = events(tmp_path / "a", "preempted")[0]
    assert stop["checkpoint"] and stop["uploaded"] is False  # committed locally, not on the store
    assert json.loads(s3.get("g/latest"))["checkpoint"] == head
    s3.proxy.restore()
    # what a new machine resumes from (tested end to end above): the store's last commit, whole
    from preemptible.checkpoint.remote import Remote

    assert Remote("s3://ckpt/g").download(head, tmp_path / "check" / head) is None
