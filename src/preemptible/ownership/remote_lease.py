"""The lease on an s3:// prefix (one run per prefix): the LEASE object is created only if absent
(If-None-Match) and renewed only if still ours (If-Match). A newcomer judges the owner by watching
the object's ETag change on its own monotonic clock, never by comparing the owner's clock with ours."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Optional

from preemptible.checkpoint.remote import Remote
from preemptible.errors import CheckpointError, ConfigError, described
from preemptible.names import LEASE
from preemptible.ownership.lease import STALE_AFTER, WAIT

log = logging.getLogger("preemptible.remote")  # the name users filter on (stable across moves)


class RemoteLease:
    """One run per prefix: the LEASE object, created only if absent, renewed only if still ours."""

    def __init__(self, remote: Remote, wait: float = WAIT, stale_after: float = STALE_AFTER):
        self.remote, self.wait_seconds, self.stale_after = remote, float(wait), float(stale_after)
        self.token = uuid.uuid4().hex
        self._etag: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.lost: Optional[str] = None

    def _record(self) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "renewed": time.time(), "stale_after": self.stale_after}).encode()

    def _put(self, **condition: str) -> str:
        s3 = self.remote.fs
        bucket, _, key = self.remote.key(LEASE).partition("/")
        resp = s3.call_s3("put_object", Bucket=bucket, Key=key, Body=self._record(), **condition)
        return resp["ETag"]

    def _read(self) -> tuple[Optional[dict], Optional[str]]:
        s3 = self.remote.fs
        bucket, _, key = self.remote.key(LEASE).partition("/")
        try:
            resp = s3.call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None, None
        body = _read_body(s3, resp)
        try:
            return json.loads(body), resp["ETag"]
        except ValueError:
            return {"unreadable": True}, resp["ETag"]

    def acquire(self) -> "RemoteLease":
        """Own the prefix, waiting up to `wait` s for a live owner. Liveness is judged by watching
        the lease object change (every renewal is a new write, so a new ETag), timed by this
        process's own monotonic clock: an object unchanged for the owner's `stale_after` seconds
        is stale. No clock of another machine is compared with ours (a skewed owner renewing
        normally is never taken over)."""
        end = time.monotonic() + self.wait_seconds
        seen, seen_since = None, time.monotonic()
        while True:
            owner, etag = self._read()
            if etag != seen:
                seen, seen_since = etag, time.monotonic()
            unchanged = time.monotonic() - seen_since
            stale_after = _owner_stale_after(owner, self.stale_after)
            try:
                if owner is None:
                    self._etag = self._put(IfNoneMatch="*")
                    break
                if unchanged >= stale_after:
                    log.warning("checkpoint: %s's owner (%s, pid %s on %s) has not renewed its lease for %.0fs "
                                "(watched here); taking it over", self.remote.url, str(owner.get("token", "?"))[:8],
                                owner.get("pid"), owner.get("host"), unchanged)
                    self._etag = self._put(IfMatch=etag)
                    break
            except OSError as e:
                if not _precondition_failed(e):
                    raise
                continue  # someone else wrote it meanwhile: look again
            if time.monotonic() > end:
                raise ConfigError(f"dir={self.remote.url!r} is in use by another run (pid {owner.get('pid')} on "
                                  f"{owner.get('host')}; its lease changed {unchanged:.0f}s ago, watched for "
                                  f"{self.wait_seconds:g}s). Stop that run, or wait: a lease unchanged for "
                                  f"{stale_after:g}s counts as its owner's death")
            time.sleep(min(0.25, max(0.05, end - time.monotonic())))
        self._thread = threading.Thread(target=self._renew, name="preemptible-remote-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.stale_after / 3):
            try:
                self._etag = self._put(IfMatch=self._etag)
            except Exception as e:  # noqa: BLE001
                if _precondition_failed(e):
                    self.lost = f"another run took {self.remote.url} over"
                    log.error("checkpoint: %s; this run uploads no more markers", self.lost)
                    return
                log.warning("checkpoint: renewing the lease on %s failed (%s); trying again", self.remote.url, described(e))

    def check(self) -> None:
        if self.lost:
            raise CheckpointError(f"{self.lost}: nothing more is committed there")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)  # a renewal stuck in retries (the store is gone) is not waited for
        if self.lost is None and self._etag is not None:
            try:
                owner, etag = self._read()
                if owner and owner.get("token") == self.token:
                    bucket, _, key = self.remote.key(LEASE).partition("/")
                    self.remote.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
            except Exception as e:  # noqa: BLE001 -- it goes stale on its own after stale_after seconds
                log.warning("checkpoint: could not release the lease on %s (%s); it counts as gone after %gs",
                            self.remote.url, described(e), self.stale_after)


def _owner_stale_after(owner: Optional[dict], default: float) -> float:
    """The owner's own stale_after (it renews at a third of it), if it is a sane number."""
    value = owner.get("stale_after") if isinstance(owner, dict) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 86400:
        return float(value)
    return default


def _precondition_failed(e: BaseException) -> bool:
    """A conditional write refused (HTTP 412): s3fs turns it into an OSError carrying S3's message."""
    text = f"{e!r} {e}"
    return "PreconditionFailed" in text or "pre-conditions you specified did not hold" in text or " 412" in text


def _read_body(s3: Any, resp: dict) -> bytes:
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with resp["Body"] as body:
            return await body.read()

    return sync(s3.loop, read)
