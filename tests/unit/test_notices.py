"""Notice sources against real HTTP servers that speak each cloud's metadata protocol (127.0.0.1)."""

import logging
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metadata_servers import MetadataServer  # noqa: E402

from preemptible import ConfigError, Notice, Notices  # noqa: E402
from preemptible.stopping.notices import AwsSpot, AzureScheduledEvents, GcpPreempted, StopFile, detect_cloud  # noqa: E402
from preemptible.stopping.decision import EXIT_NOTICE, Stop, exit_status, save_decision  # noqa: E402
from preemptible.stopping.vote import NOTICE, reason_name  # noqa: E402


def _wait_for(got, seconds=5.0):
    """Until the poller's thread has reported a notice (or `seconds` passed)."""
    until = time.monotonic() + seconds
    while not got and time.monotonic() < until:
        time.sleep(0.02)


def _closed_port_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def test_aws_imdsv2_token_flow_then_the_notice():
    with MetadataServer("aws", lead_seconds=120) as server:
        src = AwsSpot(server.url, timeout=2)
        assert src.poll() is None  # 404 before the notice
        assert [r[:2] for r in server.requests[:2]] == [("PUT", "/latest/api/token"),
                                                        ("GET", "/latest/meta-data/spot/instance-action")]
        assert src.poll() is None
        assert sum(1 for r in server.requests if r[0] == "PUT") == 1  # the token is reused while valid
        server.expire_tokens()  # the service forgets the token: 401, one new token, the retry answers
        assert src.poll() is None
        assert [r[2] for r in server.requests[-3:]] == [401, 200, 404]
        server.notify()
        notice = src.poll()
        assert notice.source == "aws" and "terminate" in notice.detail
        assert abs(notice.deadline - server.deadline) < 1.01  # the document's time, to the second
        assert 118 < notice.lead_seconds <= 120.5


def test_aws_asks_with_the_token_it_was_given():
    """The client's side of IMDSv2, read from what it sent: the token request carries its TTL header,
    and every metadata GET carries the token the service issued last (a new one after the old one
    expired), never another."""
    with MetadataServer("aws") as server:
        src = AwsSpot(server.url, timeout=2)
        src.poll()
        server.expire_tokens()
        src.poll()
        server.notify()
        assert src.poll() is not None
    issued = iter(server.issued)
    current = None
    for (method, path, _), headers in zip(server.requests, server.sent):
        if method == "PUT":
            assert path == "/latest/api/token" and int(headers["X-aws-ec2-metadata-token-ttl-seconds"]) > 0
            current = next(issued)
        else:
            assert headers.get("X-aws-ec2-metadata-token") == current, (path, headers)
    assert len(server.issued) == 2 and current == server.issued[-1]


def test_gcp_needs_its_header_and_says_true():
    with MetadataServer("gcp") as server:
        src = GcpPreempted(server.url)
        assert src.poll() is None
        assert server.requests[-1] == ("GET", "/computeMetadata/v1/instance/preempted", 200)
        server.notify()
        notice = src.poll()
        assert notice.source == "gcp" and notice.lead_seconds == 30.0
        # without the header the service refuses (403), which the source reports as unreadable
        import urllib.request
        import urllib.error

        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{server.url}/computeMetadata/v1/instance/preempted", timeout=2)
        assert e.value.code == 403


def test_azure_preempt_event_for_this_vm_only():
    with MetadataServer("azure", lead_seconds=45) as server:
        src = AzureScheduledEvents(server.url)
        assert src.poll() is None  # no events
        server.notify()
        server.other_vm = True
        assert src.poll() is None  # another VM's eviction is not ours
        server.other_vm = False
        notice = src.poll()
        assert notice.source == "azure" and "Preempt" in notice.detail
        assert abs(notice.deadline - server.deadline) < 1.01 and 43 < notice.lead_seconds <= 45.5
        assert all(status != 400 for _, _, status in server.requests)  # the Metadata header was always sent
        import urllib.request
        import urllib.error

        with pytest.raises(urllib.error.HTTPError) as e:  # the service itself refuses a request without it
            urllib.request.urlopen(f"{server.url}/metadata/scheduledevents?api-version=2020-07-01", timeout=2)
        assert e.value.code == 400


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_auto_detects_the_cloud(cloud):
    with MetadataServer(cloud) as server:
        assert detect_cloud(server.url, timeout=2) == cloud


def test_auto_finds_nothing_where_nothing_answers():
    assert detect_cloud(_closed_port_url(), timeout=0.5) is None


def test_an_unreachable_endpoint_is_logged_once_and_polling_goes_on(caplog):
    url = _closed_port_url()
    notices = Notices(cloud="aws", endpoint=url, poll_seconds=0.05, stop_file=None, timeout=0.5)
    got = []
    with caplog.at_level(logging.INFO, logger="preemptible.notices"):
        notices.start("/nonexistent", got.append)
        time.sleep(0.6)  # ~10 polls, all refused
        port = int(url.rsplit(":", 1)[1])
        server = MetadataServer("aws")
        server.httpd.server_close()
        server.httpd = type(server.httpd)(("127.0.0.1", port), server.httpd.RequestHandlerClass)
        with server.start():  # the service comes up on the same address: polling picks it up
            server.notify()
            _wait_for(got)
            notices.stop()
    warned = [r for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    assert any("answers again" in r.getMessage() for r in caplog.records)
    assert got and got[0].source == "aws" and notices.notice is got[0]


def test_a_slow_service_times_out_without_blocking(caplog):
    with MetadataServer("gcp") as server:
        server.delay = 3.0
        src = GcpPreempted(server.url, timeout=0.3)
        t = time.perf_counter()
        with pytest.raises(OSError):
            src.poll()
        assert time.perf_counter() - t < 2.0
        notices = Notices(cloud="gcp", endpoint=server.url, poll_seconds=0.05, stop_file=None, timeout=0.3)
        got = []
        with caplog.at_level(logging.WARNING, logger="preemptible.notices"):
            notices.start("/nonexistent", got.append)
            time.sleep(1.0)
            server.delay = 0.0
            server.notify()
            _wait_for(got)
            notices.stop()
        assert got and got[0].source == "gcp"
        assert len([r for r in caplog.records if "cannot be read" in r.getMessage()]) == 1


def test_a_dripping_service_is_cut_off_at_its_timeout_and_never_delays_the_stop_file(tmp_path):
    """A metadata service that answers 1 byte/s: each request ends within `timeout` in all (not per
    byte), and the stop file, polled by a thread of its own, is seen at once meanwhile."""
    with MetadataServer("gcp") as server:
        server.drip = 1.0
        src = GcpPreempted(server.url, timeout=0.5)
        t = time.perf_counter()
        with pytest.raises(OSError, match="no full answer within 0.5s"):
            src.poll()
        assert time.perf_counter() - t < 1.5
        notices = Notices(cloud="gcp", endpoint=server.url, poll_seconds=0.05, timeout=5.0)
        got = []
        notices.start(tmp_path, got.append)
        time.sleep(0.3)  # the gcp poller is inside a 5 s dripping request now
        (tmp_path / "STOP").touch()
        t = time.perf_counter()
        _wait_for(got, 2.0)
        assert time.perf_counter() - t < 1.0 and got[0].source == "stop_file"
        notices.stop()


def test_a_huge_answer_is_refused_unread():
    """300 MiB streamed without a Content-Length: at most MAX_BODY + 1 bytes are read."""
    import resource

    from preemptible.stopping.notices import MAX_BODY

    with MetadataServer("gcp") as server:
        server.huge_body = 300 << 20
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(OSError, match=f"more than {MAX_BODY} bytes"):
            GcpPreempted(server.url, timeout=5).poll()
        grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grew_mib < 50, grew_mib


def test_stop_file_in_the_run_directory(tmp_path):
    notices = Notices(poll_seconds=0.05)
    got = []
    notices.start(tmp_path, got.append)
    time.sleep(0.2)
    assert not got
    (tmp_path / "STOP").touch()
    _wait_for(got)
    notices.stop()
    assert got[0].source == "stop_file" and got[0].deadline is None and got[0].lead_seconds is None
    # a stop file left from before is removed at the next start, before polling
    Notices().clear_stop_file(tmp_path)
    assert not (tmp_path / "STOP").exists()
    assert StopFile(str(tmp_path / "STOP")).poll() is None
    # an absolute path, and a configurable name
    assert Notices(stop_file="/tmp/x/STOP_ME").stop_file_path(tmp_path) == "/tmp/x/STOP_ME"
    assert Notices(stop_file="HALT").stop_file_path(tmp_path) == str(tmp_path / "HALT")
    assert Notices(stop_file=None).stop_file_path(tmp_path) is None


def test_a_custom_source_and_one_that_raises(caplog):
    class Flaky:
        name = "flaky"
        calls = 0

        def poll(self):
            Flaky.calls += 1
            if Flaky.calls < 4:
                raise RuntimeError("boom")
            return Notice("flaky", deadline=time.time() + 10)

    got = []
    with caplog.at_level(logging.WARNING, logger="preemptible.notices"):
        n = Notices(stop_file=None, poll_seconds=0.02, sources=[Flaky()])
        n.start("/nonexistent", got.append)
        _wait_for(got)
        n.stop()
    assert got and got[0].source == "flaky"
    assert len([r for r in caplog.records if "cannot be read" in r.getMessage()]) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"cloud": "gpc"}, "cloud='gpc'; expected null (off), auto, aws, gcp or azure"),
    ({"cloud": "aws", "endpoint": "169.254.169.254"}, "endpoint='169.254.169.254'; expected an http:// URL"),
    ({"poll_seconds": 0}, "poll_seconds=0; expected seconds > 0"),
    ({"poll_seconds": "5"}, "poll_seconds='5'"),
    ({"timeout": -1}, "timeout=-1"),
    ({"stop_file": ""}, "stop_file=''"),
    ({"stop_file": 3}, "stop_file=3"),
    ({"sources": [object()]}, "has no name and poll()"),
])
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=None) as e:
        Notices(**kwargs)
    assert message in str(e.value)


def test_stop_reason_exit_status_and_the_deadline_rule():
    now = time.time()
    stop = Stop(NOTICE, 7, notices={"0": Notice("aws", seen=now, deadline=now + 3).as_dict()}, deadline=now + 3)
    assert stop.reason == "notice (aws)" and reason_name(NOTICE) == "notice"
    assert exit_status(stop, None) == EXIT_NOTICE == 75 and exit_status(stop, 0) == 0
    # the deadline decides whether the save may not fit: it is tried anyway (a save cut off commits
    # nothing), and skipped only when something must follow it (a SLURM requeue)
    skip, risk = save_decision(stop, None, 10.0)
    assert skip is None and "aws notice's deadline is in" in risk
    skip, risk = save_decision(stop, None, 10.0, "a SLURM requeue")
    assert "aws notice's deadline is in" in skip and "a SLURM requeue must follow" in skip
    assert save_decision(stop, None, 1.0, "a SLURM requeue") == (None, None)
    stop.deadline = now - 1
    assert "deadline is past" in save_decision(stop, None, 0.5)[1]
    # no deadline (a stop file): no risk
    assert save_decision(Stop(NOTICE, 7, notices={"0": Notice("stop_file").as_dict()}), None, 1e6) == (None, None)


def test_a_stop_directory_stops_and_is_cleared_and_a_full_one_is_one_line(tmp_path):
    (tmp_path / "STOP").mkdir()  # `mkdir STOP` asks for a stop like `touch STOP`
    assert StopFile(str(tmp_path / "STOP")).poll() is not None
    Notices().clear_stop_file(tmp_path)
    assert not (tmp_path / "STOP").exists()
    (tmp_path / "STOP").mkdir()
    (tmp_path / "STOP" / "keep").write_text("x")
    with pytest.raises(ConfigError, match=r"stop_file='STOP': .*STOP is left from an earlier stop and cannot be removed"):
        Notices().clear_stop_file(tmp_path)
