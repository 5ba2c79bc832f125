"""What a run directory holds, by name: each name is written here once and read from here.

    <run dir>/
      OWNER              the lease: which process owns the run (ownership)
      STOP               `touch` it to stop the run with a checkpoint (notices' stop file)
      metrics.jsonl      one row per step and per event, appended (observe.metrics)
      progress.json      the last step reached, rewritten every step (a kill's step)
      trackers.json      the experiment trackers' run ids, one tracker run across resumes
      watchdog/          rank<N>: each rank's beat count; stacks-step<S>-rank<N>.txt: where a
                         rank that ended on a hang or a lost peer was (stopping.watchdog)
      checkpoints/       step_NNNNNNNN/ (each committed by its COMMITTED marker), `latest`
                         (the head), abandoned/ (newer checkpoints set aside after going back)
"""

CHECKPOINTS = "checkpoints"
LEASE = "OWNER"
TAKEOVER = LEASE + ".takeover"  # serialises taking over a stale lease
STOP_FILE = "STOP"
METRICS = "metrics.jsonl"
PROGRESS = "progress.json"
TRACKERS = "trackers.json"
COMMIT = "COMMITTED"
LATEST = "latest"
ABANDONED = "abandoned"
WATCHDOG = "watchdog"

# Every name above that lives directly in a run directory: no file of the user's (a log file) may take one.
RUN_DIR_NAMES = (LEASE, TAKEOVER, STOP_FILE, METRICS, PROGRESS, TRACKERS, WATCHDOG, CHECKPOINTS)


def is_run_dir_name(name: str) -> bool:
    """A name the run directory uses itself (the lease's temporary files, OWNER.*, included)."""
    return name in RUN_DIR_NAMES or name.startswith(LEASE + ".")
