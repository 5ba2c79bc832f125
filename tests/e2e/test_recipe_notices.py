"""Notices end to end: the real recipe, real ranks, a real HTTP metadata service on 127.0.0.1."""

import re

import pytest

from conftest import REFERENCE_STEPS
from metadata_servers import MetadataServer
from recipe_helpers import events, exit_codes, losses, run, start, wait_for_step

pytestmark = pytest.mark.slow
STEPS = REFERENCE_STEPS


def _cloud(server, cloud):
    return [f"notices.cloud={cloud}", f"notices.endpoint={server.url}", "notices.poll_seconds=0.1"]


def _stop_when(proc, run_dir, step, act):
    wait_for_step(run_dir, step, proc)
    act()
    out, _ = proc.communicate(timeout=240)
    return proc.returncode, out


def test_aws_notice_then_a_stop_file_every_rank_stops_together_and_resumes_bit_identically(tmp_path, reference):
    """2 ranks: an EC2 spot notice (IMDSv2) stops both at one step (exit 75 from the workers); a stop
    file left from that stop is removed at the next start; touching it mid-run stops again; the
    third run finishes equal to the uninterrupted run, every step's loss and the final weights."""
    common = [f"trainer.max_steps={STEPS}", "checkpoint.interval=10", "tracker=tensorboard"]  # + the tracker wiring
    with MetadataServer("aws", lead_seconds=120) as server:
        proc = start(tmp_path, *common, *_cloud(server, "aws"), nproc=2)
        code, out = _stop_when(proc, tmp_path, 8, server.notify)
        assert code == 1 and set(exit_codes(out)) == {75}, out[-3000:]  # every worker 75; torchrun itself 1
        stops = re.findall(r"\[rank (\d)\].*stop agreed at step (\d+)", out)
        assert {r for r, _ in stops} == {"0", "1"} and len({s for _, s in stops}) == 1, out[-3000:]
        first = events(tmp_path, "preempted")[0]
        assert first["signal"] == "notice (aws)" and first["ranks"] == {"0": "notice (aws)"}
        assert first["checkpoint"] and str(first["step"]) == stops[0][1] and 8 <= first["step"] < STEPS
        seen = first["notices"]["0"]
        assert seen["source"] == "aws" and 115 < seen["lead_seconds"] <= 120.5 and "terminate" in seen["detail"]
        assert 0 <= first["seconds_since_notice"] < 60
        assert any(r[:2] == ("PUT", "/latest/api/token") for r in server.requests)

        server.noticed_at = None  # the next machine has no notice
        (tmp_path / "STOP").touch()  # left over: must not stop the resumed run at once
        proc = start(tmp_path, *common, *_cloud(server, "aws"), nproc=2)
        code, out = _stop_when(proc, tmp_path, first["step"] + 6, lambda: (tmp_path / "STOP").touch())
        assert code == 1 and set(exit_codes(out)) == {75} and "removed the stop file" in out, out[-3000:]
        second = events(tmp_path, "preempted")[1]
        assert second["signal"] == "notice (stop_file)" and second["step"] >= first["step"] + 6
        assert second["notices"]["0"]["lead_seconds"] is None
        assert events(tmp_path, "resumed")[0]["step"] == first["step"]

        code, out = run(tmp_path, *common, *_cloud(server, "aws"), nproc=2)
        assert code == 0, out[-3000:]
        assert not (tmp_path / "STOP").exists()
    done, ref = events(tmp_path, "done"), events(reference[2], "done")
    assert done[-1]["params_sha256"] == ref[-1]["params_sha256"]
    assert losses(tmp_path) == losses(reference[2])
    # tracker=tensorboard from the command line: one log directory, each step once across both stops
    from tracker_readers import tensorboard_scalars

    assert [s for s, _ in tensorboard_scalars(tmp_path / "tensorboard", "loss")] == list(range(1, STEPS + 1))


def test_gcp_and_azure_notices_with_the_defaults_save_before_any_save_was_timed(tmp_path):
    """One rank, no periodic save (nothing timed). Azure's Preempt event names a NotBefore already
    due: the save may not fit, so it is tried anyway (a save cut off commits nothing) and it
    commits. Then the resumed process gets GCP's preempted=TRUE (30 s ahead): its untimed save is
    estimated from the state's bytes and the measured write speed (well under 30 s), not a fixed
    guess, and it commits too: exit 75 both times, nothing lost."""
    common = ["trainer.max_steps=100000", "checkpoint.interval=0"]
    with MetadataServer("azure", lead_seconds=0) as server:
        proc = start(tmp_path, *common, *_cloud(server, "azure"))
        code, out = _stop_when(proc, tmp_path, 12, server.notify)
    assert code == 75, out[-3000:]
    stop = events(tmp_path, "preempted")[0]
    assert stop["signal"] == "notice (azure)" and stop["checkpoint"] and "save_skipped" not in stop, stop
    assert "azure notice's deadline is past" in out and "saving anyway" in out, out[-3000:]
    assert stop["notices"]["0"]["lead_seconds"] <= 0
    with MetadataServer("gcp") as server:
        proc = start(tmp_path, *common, *_cloud(server, "gcp"))
        code, out = _stop_when(proc, tmp_path, stop["step"] + 3, server.notify)
    assert code == 75, out[-3000:]
    assert events(tmp_path, "resumed")[0]["step"] == stop["step"]
    stop2 = events(tmp_path, "preempted")[1]
    assert stop2["signal"] == "notice (gcp)" and stop2["checkpoint"] and stop2["notices"]["0"]["lead_seconds"] == 30.0
    assert "saving anyway" not in out and "save_skipped" not in stop2, out[-3000:]
