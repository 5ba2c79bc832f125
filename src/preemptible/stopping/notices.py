"""Preemption notices that are not signals: a cloud's spot/preemptible notice and a stop file.

A notice says "stop soon (by time T, if known)". `Notices` polls its sources from background
threads, one per source, on one process per node (never from the training step); the first notice makes this rank vote to stop,
exactly like a signal (`DistributedSignalHandler.request_stop`), so every rank stops at the same
step with one committed checkpoint.

Sources (each usable on its own: `poll()` returns a `Notice` or None, raises OSError when the
endpoint cannot be reached):
  AwsSpot       EC2 instance metadata, IMDSv2: PUT a token, GET `spot/instance-action` with it
                (404 until AWS schedules the interruption, then {"action", "time"}: 2 minutes ahead).
  GcpPreempted  GCE metadata `instance/preempted` with `Metadata-Flavor: Google`: TRUE once the
                VM is being preempted (about 30 s before it is stopped).
  AzureScheduledEvents  Azure IMDS Scheduled Events with `Metadata: true`: a `Preempt` event for
                this VM, with `NotBefore` (at least 30 s ahead).
  StopFile      a file appearing (`touch <run dir>/STOP`): no deadline.
Any object with `name` and `poll()` works as a source too (`Notices(sources=[...])`).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Optional, Sequence

from preemptible.checks import seconds
from preemptible.errors import ConfigError
from preemptible.names import STOP_FILE

log = logging.getLogger("preemptible.notices")  # the name users filter on (stable across moves)

CLOUDS = ("aws", "gcp", "azure")
# Where each provider serves its metadata when no endpoint is given.
DEFAULT_ENDPOINTS = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal",
                     "azure": "http://169.254.169.254"}
GCP_LEAD_SECONDS = 30.0  # GCP documents 30 s from the preemption notice to the hard stop


@dataclass
class Notice:
    """A source said: stop soon. `deadline`: Unix time the machine goes away, None if not said."""
    source: str
    seen: float = field(default_factory=time.time)
    deadline: Optional[float] = None
    detail: str = ""

    @property
    def lead_seconds(self) -> Optional[float]:
        """How much warning the source gave: deadline - seen (None: it named no deadline)."""
        return None if self.deadline is None else round(self.deadline - self.seen, 3)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "seen": round(self.seen, 3), "deadline": self.deadline,
                "lead_seconds": self.lead_seconds, "detail": self.detail}


MAX_BODY = 64 << 10  # bytes a metadata answer may have; a notice document is well under 1 KiB


def _request(url: str, timeout: float, method: str = "GET", headers: Optional[dict[str, str]] = None) -> tuple[int, bytes, Any]:
    """(status, body, headers) of one HTTP request, bounded in time and size: the whole exchange
    (connect, headers, body) ends within `timeout` s (a timer cuts the connection: a service that
    drips bytes cannot hold a poll longer), and a body over MAX_BODY bytes is refused unread. An
    HTTP error status is returned, not raised; anything else that fails raises OSError. No proxy:
    metadata endpoints are link-local."""
    parts = urllib.parse.urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=timeout)
    cut = threading.Event()

    def cut_off() -> None:
        cut.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(timeout, cut_off)
    timer.daemon = True
    timer.start()
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, body=b"" if method == "PUT" else None, headers=headers or {})
        resp = conn.getresponse()
        length = resp.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            raise OSError(f"{url} answered {length} bytes (more than {MAX_BODY}); not read")
        body = resp.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise OSError(f"{url} answered more than {MAX_BODY} bytes; not read")
        if cut.is_set():
            raise OSError("cut off")
        return resp.status, body, resp.headers
    except (http.client.HTTPException, OSError, ValueError) as e:
        if cut.is_set():
            raise OSError(f"{url} gave no full answer within {timeout:g}s") from None
        raise OSError(str(e) or type(e).__name__) from None
    finally:
        timer.cancel()
        conn.close()


class _Http:
    name = "cloud"

    def __init__(self, endpoint: Optional[str] = None, timeout: float = 2.0):
        endpoint = endpoint or DEFAULT_ENDPOINTS[self.name]
        _check_endpoint(endpoint)
        seconds("timeout", timeout, strict=True)
        self.endpoint, self.timeout = endpoint.rstrip("/"), float(timeout)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.endpoint!r})"


class AwsSpot(_Http):
    """EC2 spot interruption notice through IMDSv2 (token renewed before it expires, and on a 401)."""
    name = "aws"
    TOKEN_TTL = 21600  # seconds, the most IMDSv2 grants

    def __init__(self, endpoint: Optional[str] = None, timeout: float = 2.0):
        super().__init__(endpoint, timeout)
        self._token: Optional[str] = None
        self._token_until = 0.0

    def _new_token(self) -> str:
        status, body, _ = _request(f"{self.endpoint}/latest/api/token", self.timeout, "PUT",
                                   {"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL)})
        if status != 200:
            raise OSError(f"IMDSv2 token request answered HTTP {status}")
        self._token, self._token_until = body.decode().strip(), time.time() + self.TOKEN_TTL - 60
        return self._token

    def probe(self) -> bool:
        return self._new_token() != ""

    def poll(self) -> Optional[Notice]:
        for attempt in (0, 1):
            token = self._token if self._token and time.time() < self._token_until else self._new_token()
            status, body, _ = _request(f"{self.endpoint}/latest/meta-data/spot/instance-action", self.timeout,
                                       headers={"X-aws-ec2-metadata-token": token})
            if status == 401 and attempt == 0:
                self._token = None  # expired or revoked: one new token, one retry
                continue
            break
        if status == 404:
            return None
        if status != 200:
            raise OSError(f"spot/instance-action answered HTTP {status}")
        try:
            doc = json.loads(body)
            action, when = doc["action"], _iso_time(doc["time"])
        except (ValueError, KeyError, TypeError):
            raise OSError(f"spot/instance-action answered an unexpected document: {body[:200]!r}") from None
        return Notice("aws", deadline=when, detail=f"spot instance-action {action} at {doc['time']}")


class GcpPreempted(_Http):
    """GCE `instance/preempted`: TRUE once preemption began; the VM stops about 30 s later."""
    name = "gcp"
    HEADERS = {"Metadata-Flavor": "Google"}

    def probe(self) -> bool:
        status, _, headers = _request(f"{self.endpoint}/computeMetadata/v1/", self.timeout, headers=self.HEADERS)
        return status == 200 and headers.get("Metadata-Flavor") == "Google"

    def poll(self) -> Optional[Notice]:
        status, body, _ = _request(f"{self.endpoint}/computeMetadata/v1/instance/preempted", self.timeout,
                                   headers=self.HEADERS)
        if status != 200:
            raise OSError(f"instance/preempted answered HTTP {status}")
        value = body.decode(errors="replace").strip().upper()
        if value != "TRUE":
            return None
        now = time.time()
        return Notice("gcp", seen=now, deadline=now + GCP_LEAD_SECONDS, detail="instance/preempted TRUE")


class AzureScheduledEvents(_Http):
    """Azure Scheduled Events: a `Preempt` event naming this VM (or any VM if its name is unknown)."""
    name = "azure"
    HEADERS = {"Metadata": "true"}
    API = "2020-07-01"

    def __init__(self, endpoint: Optional[str] = None, timeout: float = 2.0):
        super().__init__(endpoint, timeout)
        self._vm: Optional[str] = None

    def probe(self) -> bool:
        status, _, _ = _request(f"{self.endpoint}/metadata/instance?api-version=2021-02-01", self.timeout,
                                headers=self.HEADERS)
        return status == 200

    def _vm_name(self) -> str:
        if self._vm is None:
            status, body, _ = _request(f"{self.endpoint}/metadata/instance/compute/name?api-version=2021-02-01"
                                       "&format=text", self.timeout, headers=self.HEADERS)
            self._vm = body.decode().strip() if status == 200 else ""
        return self._vm

    def poll(self) -> Optional[Notice]:
        status, body, _ = _request(f"{self.endpoint}/metadata/scheduledevents?api-version={self.API}", self.timeout,
                                   headers=self.HEADERS)
        if status != 200:
            raise OSError(f"scheduledevents answered HTTP {status}")
        try:
            events = json.loads(body).get("Events") or []
        except (ValueError, AttributeError):
            raise OSError(f"scheduledevents answered an unexpected document: {body[:200]!r}") from None
        vm = None
        for event in events:
            if not isinstance(event, dict) or event.get("EventType") != "Preempt":
                continue
            if vm is None:
                vm = self._vm_name()
            resources = event.get("Resources") or []
            if vm and resources and vm not in resources:
                continue  # another VM's eviction (events cover the availability set)
            deadline = None
            if event.get("NotBefore"):
                try:
                    deadline = email.utils.parsedate_to_datetime(event["NotBefore"]).timestamp()
                except (TypeError, ValueError):
                    pass
            return Notice("azure", deadline=deadline,
                          detail=f"Preempt event {event.get('EventId', '?')} NotBefore {event.get('NotBefore')}")
        return None


class StopFile:
    """A file whose appearance asks the run to stop (`touch <run dir>/STOP`)."""
    name = "stop_file"

    def __init__(self, path: str):
        self.path = str(path)

    def __repr__(self) -> str:
        return f"StopFile({self.path!r})"

    def poll(self) -> Optional[Notice]:
        if os.path.exists(self.path):
            return Notice("stop_file", detail=self.path)
        return None


SOURCES = {"aws": AwsSpot, "gcp": GcpPreempted, "azure": AzureScheduledEvents}


def detect_cloud(endpoint: Optional[str] = None, timeout: float = 1.0) -> Optional[str]:
    """Which cloud's metadata service answers here (aws, gcp, azure), or None. GCP first: its
    service also answers on 169.254.169.254, and only it says `Metadata-Flavor: Google`."""
    for name in ("gcp", "aws", "azure"):
        try:
            if SOURCES[name](endpoint, timeout).probe():
                return name
        except OSError:
            continue
    return None


class Notices:
    """The notice sources of a run, each polled from a thread of its own (on local rank 0 of each node).

    cloud:        None (no cloud notice), 'auto' (find out which cloud answers, in the background),
                  'aws', 'gcp' or 'azure'.
    endpoint:     the metadata service's base URL; None: the provider's own
                  (http://169.254.169.254; GCP http://metadata.google.internal). For proxies and tests.
    poll_seconds: seconds between polls of every source.
    stop_file:    a file name (relative to the run directory) or path whose appearance stops the
                  run; None: off. A stop file left from before is removed when the next run starts.
    timeout:      seconds one metadata request may take in all (connect, headers, body; a body over
                  64 KiB is refused); a slow or unreachable endpoint is logged once and polled again
                  at the next interval, and never delays another source.
    sources:      more sources (objects with `name` and `poll() -> Notice | None`).
    """

    def __init__(self, cloud: Optional[str] = None, endpoint: Optional[str] = None, poll_seconds: float = 5.0,
                 stop_file: Optional[str] = STOP_FILE, timeout: float = 2.0, sources: Sequence[Any] = ()):
        if cloud is not None and cloud not in CLOUDS + ("auto",):
            raise ConfigError(f"cloud={cloud!r}; expected null (off), auto, aws, gcp or azure")
        if endpoint is not None:
            _check_endpoint(endpoint)
        seconds("poll_seconds", poll_seconds, strict=True)
        seconds("timeout", timeout, strict=True)
        if stop_file is not None and (not isinstance(stop_file, str) or not stop_file.strip()):
            raise ConfigError(f"stop_file={stop_file!r}; expected a file name (in the run directory), a path, "
                              "or null (off)")
        for s in sources:
            if not callable(getattr(s, "poll", None)) or not isinstance(getattr(s, "name", None), str):
                raise ConfigError(f"sources: {s!r} has no name and poll(); a source returns a Notice or None")
        self.cloud, self.endpoint, self.stop_file = cloud, endpoint, stop_file
        self.poll_seconds, self.timeout = float(poll_seconds), float(timeout)
        self.extra = list(sources)
        self.notice: Optional[Notice] = None  # the first notice this process saw
        self.sources: list[Any] = []
        self._threads: list[threading.Thread] = []
        self._first = threading.Lock()
        self._halt = threading.Event()
        self._failing: set[str] = set()
        self._on_notice: Optional[Callable[[Notice], None]] = None

    def __repr__(self) -> str:
        return (f"Notices(cloud={self.cloud!r}, endpoint={self.endpoint!r}, poll_seconds={self.poll_seconds:g}, "
                f"stop_file={self.stop_file!r})")

    def stop_file_path(self, run_dir: Any) -> Optional[str]:
        if self.stop_file is None:
            return None
        return os.path.join(os.fspath(run_dir), os.path.expanduser(self.stop_file))

    def clear_stop_file(self, run_dir: Any) -> None:
        """A stop file left from an earlier run is removed (once, by rank 0, before polling starts)."""
        path = self.stop_file_path(run_dir)
        if path and os.path.lexists(path):
            try:
                touched = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.lstat(path).st_mtime))
                if os.path.isdir(path) and not os.path.islink(path):
                    os.rmdir(path)  # `mkdir STOP` stops a run too; only an empty one is removed
                else:
                    os.remove(path)
                log.warning("removed the stop file %s (from %s) left by an earlier stop; touch it again to stop "
                            "this run", path, touched)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise ConfigError(f"stop_file={self.stop_file!r}: {path} is left from an earlier stop and cannot be "
                                  f"removed ({e.strerror or e}); remove it (a stop file is an empty file), or "
                                  "choose another stop_file") from None

    def start(self, run_dir: Any, on_notice: Callable[[Notice], None]) -> None:
        """Begin polling (call on one process per node); `on_notice(notice)` runs once, in a poller
        thread. Each source has a thread of its own: a slow or hung one never delays another."""
        if self._threads:
            raise RuntimeError("Notices.start() twice; make a new Notices for another run")
        self._on_notice = on_notice
        self.sources = list(self.extra)
        path = self.stop_file_path(run_dir)
        if path:
            self.sources.append(StopFile(path))
        if self.cloud in CLOUDS:
            self.sources.append(SOURCES[self.cloud](self.endpoint, self.timeout))
        for source in self.sources:
            self._spawn(self._watch, source)
        if self.cloud == "auto":
            self._spawn(self._detect)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name="preemptible-notices", daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self) -> None:
        """Stop polling. A request in flight is not waited for (at most `timeout` s, in a daemon
        thread): leaving a run, often inside a grace period, never waits on a metadata service."""
        self._halt.set()
        for thread in self._threads:
            thread.join(timeout=0.05)

    def _detect(self) -> None:
        found = detect_cloud(self.endpoint, min(self.timeout, 1.0))
        if self._halt.is_set():
            return
        if found:
            log.info("notices: %s metadata service found; polling its preemption notice every %gs",
                     found, self.poll_seconds)
            source = SOURCES[found](self.endpoint, self.timeout)
            self.sources.append(source)
            self._watch(source)
        else:
            log.info("notices: no cloud metadata service answered; cloud notices are off")

    def _watch(self, source: Any) -> None:
        while not self._halt.is_set():
            if self._poll(source):
                return
            self._halt.wait(self.poll_seconds)

    def _poll(self, source: Any) -> bool:
        try:
            notice = source.poll()
        except Exception as e:  # noqa: BLE001 -- a source must never end the polling
            if source.name not in self._failing:
                self._failing.add(source.name)
                log.warning("notices: %r cannot be read (%s); polling goes on every %gs", source, e, self.poll_seconds)
            return False
        if source.name in self._failing:
            self._failing.discard(source.name)
            log.info("notices: %r answers again", source)
        if notice is None:
            return False
        with self._first:
            if self.notice is not None or self._halt.is_set():
                return True  # another source was first
            self.notice = notice
            self._halt.set()  # the others stop polling: one notice is all a run needs
        lead = f", {notice.lead_seconds:.0f}s ahead" if notice.lead_seconds is not None else ""
        log.warning("notice from %s: %s%s; stopping at the next agreed step", notice.source, notice.detail, lead)
        if self._on_notice is not None:
            self._on_notice(notice)
        return True


def _iso_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _check_endpoint(endpoint: Any) -> None:
    if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"endpoint={endpoint!r}; expected an http:// URL (the metadata service), or null for "
                          "the provider's own")
