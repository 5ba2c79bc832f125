"""A checkpoint tier on object storage (s3://bucket/prefix through fsspec/s3fs: the `s3` extra).

Object stores have no atomic rename and show objects one by one, so a checkpoint is written once
to fast local storage (the local tier: committed there exactly as on disk) and then uploaded:
every data file first, sizes checked, then the `COMMITTED` marker object last, then the `latest`
head object. A remote checkpoint counts only with its marker, and its objects must match the
marker's sizes and CRC-32C checksums (checked on download). Endpoint and credentials come from
the usual AWS variables and files (AWS_ENDPOINT_URL, AWS_PROFILE, ~/.aws): nothing here.

One run owns a prefix: an `LEASE` object created with a conditional write (If-None-Match) and
renewed with If-Match on its ETag; an owner whose lease went unrenewed for `stale_after` seconds
counts as gone. A run that lost its lease uploads no marker.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Optional

from preemptible.errors import CheckpointError, ConfigError, described
from preemptible.names import COMMIT, LATEST

log = logging.getLogger("preemptible.remote")  # the name users filter on (stable across moves)



def is_remote(url: Any) -> bool:
    return isinstance(url, str) and "://" in url and not url.startswith("file://")


SCHEMES = ("s3",)  # where the lease works: S3's conditional writes (If-None-Match, If-Match)
# Where botocore finds credentials without asking the network (the instance metadata service is opt-in here).
_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                         "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


def check_url(url: str) -> None:
    """ConfigError, before any lookup, unless `url` is s3://bucket/prefix with a credential source."""
    scheme = url.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise ConfigError(f"dir={url!r}: {scheme}:// is not supported; use s3://bucket/prefix (any S3-compatible "
                          "store, through AWS_ENDPOINT_URL): the run's lease needs S3's conditional writes")
    bucket, _, prefix = url.split("://", 1)[1].partition("/")
    if not bucket or not prefix.strip("/"):
        raise ConfigError(f"dir={url!r}; expected s3://bucket/prefix (a prefix of its own for this run)")
    files = [os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
             os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")]
    if any(os.environ.get(v) for v in _CREDENTIAL_VARIABLES) or any(os.path.isfile(os.path.expanduser(f))
                                                                      for f in files):
        return
    if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "false":
        return  # asked for: an instance role's credentials from the instance metadata service
    raise ConfigError(f"dir={url!r}: no S3 credentials are configured (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                      "AWS_PROFILE, ~/.aws/credentials, or a web-identity/container variable); on a cloud VM with "
                      "an instance role, set AWS_EC2_METADATA_DISABLED=false to let the SDK ask its metadata service")


class Remote:
    """Checkpoints under one object-storage prefix."""

    def __init__(self, url: str):
        if not is_remote(url):
            raise ConfigError(f"dir={url!r}; expected s3://bucket/prefix")
        check_url(url)
        try:
            import fsspec
        except ImportError:
            raise ConfigError(f"dir={url!r} needs fsspec and s3fs: pip install 'preemptible[s3]'") from None
        try:
            # A filesystem of its own: fsspec's instance cache would hand back one made earlier in
            # the process, bound to the endpoint and credentials of that moment.
            self.fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True)
        except (ImportError, ValueError) as e:
            raise ConfigError(f"dir={url!r}: {described(e)}; for s3:// pip install 'preemptible[s3]'") from None
        self.url = url.rstrip("/")
        self.root = path.rstrip("/")
        if not self.root:
            raise ConfigError(f"dir={url!r}; expected s3://bucket/prefix")
        self.last_upload_seconds: Optional[float] = None
        self.last_upload_bytes: Optional[int] = None

    def key(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def where(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def _invalidate(self) -> None:
        self.fs.invalidate_cache()

    # -- writing -------------------------------------------------------------------------------

    def upload(self, local: Path, owner_check: Any = None) -> None:
        """Every file of a locally committed checkpoint, then its marker, then `latest`."""
        started = time.perf_counter()
        name = local.name
        files = sorted(p for p in local.iterdir() if p.is_file() and p.name != COMMIT)
        marker = (local / COMMIT).read_bytes()
        expected = json.loads(marker)["files"]
        self.fs.put([str(p) for p in files], [self.key(name, p.name) for p in files])
        self._invalidate()
        found = {Path(i["name"]).name: i["size"] for i in self.fs.ls(self.key(name), detail=True)}
        for fname, (size, _) in expected.items():
            if found.get(fname) != size:
                raise CheckpointError(f"upload of {name}: {fname} is {found.get(fname)} bytes on {self.url}, "
                                      f"{size} locally; no marker was uploaded")
        if owner_check is not None:
            owner_check()
        self.fs.pipe_file(self.key(name, COMMIT), marker)
        self.fs.pipe_file(self.key(LATEST), json.dumps({"checkpoint": name, "step": json.loads(marker)["step"]}).encode())
        self.last_upload_seconds = time.perf_counter() - started
        self.last_upload_bytes = sum(size for size, _ in expected.values()) + len(marker)

    def prune(self, keep: int) -> None:
        """Committed remote checkpoints beyond the newest `keep`, and unfinished uploads older than
        the newest commit, are removed (markers first: a half-removed one is never trusted)."""
        committed, unfinished = self.listing()
        newest = committed[0][0] if committed else None
        doomed = [n for _, n in committed[keep:]]
        doomed += [n for s, n in unfinished if newest is not None and s < newest]
        for name in doomed:
            try:
                if self.fs.exists(self.key(name, COMMIT)):
                    self.fs.rm_file(self.key(name, COMMIT))
                self.fs.rm(self.key(name), recursive=True)
            except (OSError, FileNotFoundError) as e:
                log.warning("checkpoint: could not remove %s (%s)", self.where(name), described(e))
        self._invalidate()

    # -- reading -------------------------------------------------------------------------------

    def listing(self) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        """(committed, unfinished): [(step, name)] newest first, from the objects under the prefix."""
        self._invalidate()
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return [], []
        committed, unfinished = [], []
        for entry in entries:
            name = Path(entry).name
            if not name.startswith("step_") or not name[5:].isdigit():
                continue
            step = int(name[5:])
            (committed if self.fs.exists(self.key(name, COMMIT)) else unfinished).append((step, name))
        return sorted(committed, reverse=True), sorted(unfinished, reverse=True)

    def head(self) -> Optional[str]:
        try:
            return json.loads(self.fs.cat_file(self.key(LATEST)))["checkpoint"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def download(self, name: str, into: Path) -> Optional[str]:
        """Fetch `name` into the directory `into` (created); None if it is complete and matches its
        marker's sizes and CRC-32C checksums, else why not (then `into` is removed)."""
        from preemptible.checkpoint.layout import why_invalid

        shutil.rmtree(into, ignore_errors=True)
        into.mkdir(parents=True)
        try:
            marker_bytes = self.fs.cat_file(self.key(name, COMMIT))
            files = json.loads(marker_bytes)["files"]
            present = {Path(i["name"]).name: i["size"] for i in self.fs.ls(self.key(name), detail=True)}
            for fname, (size, _) in files.items():
                if fname not in present:
                    return self._drop(into, f"{fname} is missing on {self.url}")
                if present[fname] != size:
                    return self._drop(into, f"{fname} is {present[fname]} bytes on {self.url}, the commit says {size} "
                                            "(truncated or changed)")
            self.fs.get([self.key(name, f) for f in files], [str(into / f) for f in files])
            (into / COMMIT).write_bytes(marker_bytes)
        except (ValueError, KeyError, TypeError) as e:
            return self._drop(into, f"its {COMMIT} object cannot be read ({described(e)})")
        why = why_invalid(into, verify=True)
        return self._drop(into, why) if why else None

    @staticmethod
    def _drop(into: Path, why: str) -> str:
        shutil.rmtree(into, ignore_errors=True)
        return why


class Uploader:
    """Uploads locally committed checkpoints in one background thread, newest first: a newer
    commit replaces one still waiting. A failed upload is logged (one line) and the next commit
    tries again; `wait()` reports the last failure."""

    def __init__(self, remote: Remote, keep: int, owner_check: Any = None):
        self.remote, self.keep, self.owner_check = remote, keep, owner_check
        self._lock = threading.Condition()
        self._pending: Optional[Path] = None
        self._busy = False
        self._thread: Optional[threading.Thread] = None
        self.uploaded: Optional[str] = None  # the newest checkpoint whose marker is on the store
        self.error: Optional[str] = None     # why the newest attempt failed, if it did

    def submit(self, local: Path) -> None:
        with self._lock:
            self._pending = local
            self._lock.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="preemptible-upload", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                while self._pending is None:
                    self._lock.wait()
                local, self._pending, self._busy = self._pending, None, True
            try:
                self.remote.upload(local, self.owner_check)
                self.uploaded, self.error = local.name, None
                log.info("checkpoint: %s uploaded to %s (%.1f MB in %.2fs)", local.name, self.remote.where(local.name),
                         (self.remote.last_upload_bytes or 0) / 1e6, self.remote.last_upload_seconds or 0)
                self.remote.prune(self.keep)
            except Exception as e:  # noqa: BLE001 -- reported once, retried with the next commit
                self.error = f"upload of {local.name} to {self.remote.url} failed ({described(e)})"
                log.warning("checkpoint: %s; it is committed locally, the remote head stays %s", self.error,
                            self.uploaded or "none")
            with self._lock:
                self._busy = False
                self._lock.notify_all()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """True once nothing is waiting or uploading (within `timeout` seconds)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending is not None or self._busy:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left)
        return True
