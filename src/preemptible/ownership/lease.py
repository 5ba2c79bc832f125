"""One owner per run directory: a lease file that works for every rank and across nodes.

`<dir>/OWNER` is created atomically (O_CREAT|O_EXCL, which NFS and Lustre honour too) by the
run's rank 0 and holds who owns the directory: host, pid, job id, since when, and a random token.
While the run lives, a background thread renews it (rewrites it every `heartbeat` seconds; the
contents carry a counter, so a renewal changes them). A second run that finds the lease:

- on the same host, in the same PID namespace and the same boot, with the owner's pid gone (or
  reused by another process): the owner was killed; the lease is stale at once. A pid means
  nothing across PID namespaces (containers share a hostname with the old job's container, and
  `unshare --pid` gives a fresh numbering), so there the owner is judged like one on another host;
- otherwise it watches the lease: renewals mean the owner is alive (a requeued job starting while
  the old one still saves), and the newcomer waits, up to `wait` seconds; a lease unchanged for
  `stale_after` seconds *of the newcomer's own clock* belongs to a dead owner on another host (no
  clock comparison across nodes is needed).

Taking over a stale lease is serialised by a second exclusive file (`OWNER.takeover`), so two
newcomers never both win. The owner checks its token before every commit (`check()`): a run whose
lease was taken over commits nothing more.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from preemptible.checks import seconds
from preemptible.errors import CheckpointError, ConfigError
from preemptible.files import write_atomic
from preemptible.names import LEASE, TAKEOVER

log = logging.getLogger("preemptible.ownership")  # the name users filter on (stable across moves)



def _job_id() -> Optional[str]:
    for name in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "KUBERNETES_POD_NAME", "HOSTNAME_JOB"):
        if os.environ.get(name):
            return f"{name}={os.environ[name]}"
    return None


def _process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): pid reuse shows."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _identity(kind: str) -> Optional[str]:
    """This process's PID namespace ('pidns': the inode of /proc/self/ns/pid) or boot ('boot': the
    kernel's boot id): a pid identifies a process only where both match."""
    try:
        if kind == "pidns":
            return os.readlink("/proc/self/ns/pid")
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def same_process_space(owner: dict[str, Any]) -> bool:
    """Whether `owner`'s pid can be looked up here: same host, PID namespace and boot (all known)."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    mine = (_identity("pidns"), _identity("boot"))
    return None not in mine and (owner.get("pidns"), owner.get("boot")) == mine


def describe(owner: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    job = f", {owner['job']}" if owner.get("job") else ""
    return f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}{job}, since {since}"


class WaitInterrupted(Exception):
    """A stop signal arrived while waiting for another run to release the directory."""

    def __init__(self, signum: int, waiting_for: str):
        super().__init__(signum, waiting_for)
        self.signum, self.waiting_for = signum, waiting_for


WAIT = 120.0        # seconds a second run waits for the owner (a requeued job overlapping the old one)
STALE_AFTER = 30.0  # seconds without a renewal after which an owner on another host counts as dead


@dataclass(frozen=True)
class Ownership:
    """One run per run directory, one part of `Run` (`Run(ownership=Ownership(...))`).

    wait:        seconds a second run on the directory waits for the owner to finish, then fails
                 naming it (0: fail at once).
    stale_after: seconds without a renewal after which an owner on another host (or in another PID
                 namespace) counts as dead; one on this host whose process is gone is dead at once.
    """

    wait: float = WAIT
    stale_after: float = STALE_AFTER

    def __post_init__(self) -> None:
        seconds("wait", self.wait)
        seconds("stale_after", self.stale_after, strict=True)


class RunLease:
    """Ownership of `directory` for one run (acquired by rank 0; see the module docstring).

    wait:        seconds a second run waits for the owner to finish before it fails (0: fail at once).
    stale_after: seconds without a renewal after which a lease on another host counts as dead.
    heartbeat:   seconds between renewals (default: stale_after / 6).
    """

    def __init__(self, directory: str | os.PathLike, wait: float = WAIT, stale_after: float = STALE_AFTER,
                 heartbeat: Optional[float] = None):
        seconds("wait", wait)
        seconds("stale_after", stale_after, strict=True)
        self.path = Path(directory) / LEASE
        self.wait, self.stale_after = float(wait), float(stale_after)
        self.heartbeat = float(heartbeat) if heartbeat is not None else self.stale_after / 6
        if not 0 < self.heartbeat < self.stale_after:
            raise ConfigError(f"heartbeat={heartbeat!r}; expected seconds > 0 and below stale_after={stale_after!r}")
        self.token = secrets.token_hex(8)
        self.interrupted: Callable[[], Optional[int]] = lambda: None  # a signal that ends the wait for the owner
        self.record: dict[str, Any] = {}
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- acquiring -----------------------------------------------------------------------------

    def acquire(self) -> "RunLease":
        """Own the directory, waiting for a live owner up to `wait` s; ConfigError naming the owner."""
        try:
            return self._acquire()
        except OSError as e:
            raise ConfigError(f"{self.path.parent} is not writable ({e.strerror or e}); choose a writable "
                              "directory") from None

    def _acquire(self) -> "RunLease":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait
        seen: Optional[str] = None
        seen_since = time.monotonic()
        announced = False
        while True:
            if self._create():
                break
            text = self._read_text()
            if text is None:
                continue  # released between our attempt and the read: try again at once
            if text != seen:
                seen, seen_since = text, time.monotonic()
            owner = self._parse(text)
            dead = self._dead_reason(owner, time.monotonic() - seen_since)
            if dead and self._take_over(text, dead, owner):
                break
            if time.monotonic() >= deadline:
                raise ConfigError(f"the run directory {self.path.parent} is in use by another run ({describe(owner)}); "
                                  f"waited {self.wait:g}s for it to finish. Stop that run, or use another run directory; "
                                  f"if it is dead, its lease expires {self.stale_after:g}s after its last renewal")
            if not announced:
                log.warning("run directory %s is in use by %s; waiting up to %gs for it to finish",
                            self.path.parent, describe(owner), self.wait)
                announced = True
            signum = self.interrupted()
            if signum is not None:
                raise WaitInterrupted(signum, f"{self.path.parent} is in use by {describe(owner)}")
            time.sleep(min(0.5, self.heartbeat, max(0.01, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._renew_loop, name="preemptible-lease", daemon=True)
        self._thread.start()
        return self

    def _new_record(self, beat: int) -> str:
        if not self.record:
            self.record = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
                           "pidns": _identity("pidns"), "boot": _identity("boot"), "job": _job_id(),
                           "since": time.time(), "token": self.token}
        return json.dumps({**self.record, "beat": beat, "renewed": time.time()})

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._new_record(0))
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read_text(self) -> Optional[str]:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None

    @staticmethod
    def _parse(text: str) -> dict[str, Any]:
        try:
            owner = json.loads(text)
            return owner if isinstance(owner, dict) else {}
        except ValueError:
            return {}  # torn or foreign: judged by staleness alone

    def _dead_reason(self, owner: dict[str, Any], unchanged_for: float) -> Optional[str]:
        if same_process_space(owner):
            start = _process_start(owner["pid"])
            if start is None:
                return f"its process {owner['pid']} is gone"
            if owner.get("start") is not None and start != owner["start"]:
                return f"its process {owner['pid']} is gone (the pid now belongs to another process)"
            return None  # alive on this host: renewals will continue
        if unchanged_for >= self.stale_after:
            return f"not renewed for {unchanged_for:.0f}s"
        return None

    def _take_over(self, text: str, reason: str, owner: dict[str, Any]) -> bool:
        gate = self.path.with_name(TAKEOVER)
        try:
            fd = os.open(gate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:  # a takeover that died half-way leaves the gate: it is stale after a while too
                if time.time() - gate.stat().st_mtime > self.stale_after:
                    gate.unlink()
            except OSError:
                pass
            return False
        os.close(fd)
        try:
            if self._read_text() != text:
                return False  # renewed or replaced meanwhile: not stale after all
            self.path.unlink(missing_ok=True)
            if not self._create():
                return False
            log.warning("run directory %s: took over the lease of %s (%s)", self.path.parent, describe(owner), reason)
            return True
        finally:
            gate.unlink(missing_ok=True)

    # -- holding ---------------------------------------------------------------------------

    def _renew_loop(self) -> None:
        beat, failing = 0, False
        while not self._stop.wait(self.heartbeat):
            beat += 1
            try:
                current = self._parse(self._read_text() or "")
                if current.get("token") != self.token:
                    self.lost = (f"the run directory {self.path.parent} was taken over by another run "
                                 f"({describe(current)})" if current else f"its lease {self.path} was removed")
                    log.error("%s; this run commits nothing more", self.lost)
                    return
                write_atomic(self.path, self._new_record(beat), durable=False, tmp_name=f"{LEASE}.{self.token}.tmp")
                if failing:
                    log.warning("run directory lease: renewed again")
                failing = False
            except OSError as e:  # a shared filesystem hiccup, a full disk: try again at the next beat
                if not failing:
                    log.warning("run directory lease: renewal failed (%s); trying again every %gs (a run on another "
                                "host may take the directory over after %gs without one)", e.strerror or e,
                                self.heartbeat, self.stale_after)
                failing = True

    def check(self) -> None:
        """Raise CheckpointError if another run owns the directory now (called before each commit)."""
        if self.lost is None:
            current = self._parse(self._read_text() or "")
            if current.get("token") != self.token:
                self.lost = f"the run directory {self.path.parent} is no longer this run's ({describe(current) if current else 'lease removed'})"
        if self.lost is not None:
            raise CheckpointError(f"{self.lost}; nothing was committed")

    def release(self) -> None:
        """Stop renewing and remove the lease, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            if self.lost is None and self._parse(self._read_text() or "").get("token") == self.token:
                self.path.unlink(missing_ok=True)
        except OSError as e:  # a read-only remount, a gone filesystem: never the error a run ends with
            log.warning("run directory lease: %s could not be removed (%s); a later run takes it over (at once "
                        "here, its process being gone; elsewhere after %gs without a renewal)", self.path,
                        e.strerror or e, self.stale_after)

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class Holder:
    """Whether this run still owns its run directory, asked from any rank: the lease file still
    holds the token rank 0's lease was taken with (`token`: broadcast at the start). A rank woken
    after its job ended (the lease released) or was replaced (another run's token) is told no, and
    writes nothing more there. `lease`: rank 0's own lease, whose renewals notice a takeover too."""

    RECENT = 1.0  # seconds recent() trusts its last answer (it is asked for every metrics row and log record)

    def __init__(self, directory: str | os.PathLike, token: Optional[str], lease: Optional[RunLease] = None):
        self.path, self.token, self.lease = Path(directory) / LEASE, token, lease
        self._answer, self._asked = True, -float("inf")
        # Made after rank 0 took the lease: a rank that cannot see it (a run directory that is not
        # shared with rank 0's machine) cannot tell, and answers yes as if there were no lease.
        self._seen = token is not None and self.path.exists()

    def recent(self) -> bool:
        """__call__()'s answer, read again at most once a second; once no, always no."""
        now = time.monotonic()
        if self._answer and now - self._asked >= self.RECENT:
            self._answer, self._asked = self(), now
        return self._answer

    def __call__(self) -> bool:
        if not self._seen:
            return True  # no lease taken, or not visible from here: nothing to compare with
        if self.lease is not None and self.lease.lost is not None:
            return False
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return False  # released: the run that owned it has ended
        except OSError:
            return True  # cannot tell: as if it could
        return RunLease._parse(text).get("token") == self.token
