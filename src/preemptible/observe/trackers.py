"""Experiment trackers that stay one run across stops, crashes and resumes (rank 0 only).

`metrics.jsonl` stays the source of truth; a tracker gets the same rows and events:
  TensorBoard  (`torch.utils.tensorboard`, extra `tensorboard`): rows as they are written; a resume
               at step S reopens the same log directory with `purge_step=S+1`, so steps a crash left
               after the checkpoint are discarded by TensorBoard's readers, not doubled.
  WandB        (extra `wandb`) and MLflow (extra `mlflow`): neither can delete logged points (W&B's
               rewind is a private preview), so they get a row once a committed checkpoint covers
               its step (every `interval` steps, at a stop, at the end): a crash can then never
               leave a step in them that the resumed run logs again. The run's id is kept in
               `<run dir>/trackers.json`; the next start logs into the same run.
A stop's status reads preempted (W&B `mark_preempting` and summary `preemptible/status`;
MLflow status SCHEDULED with tag `preemptible.status=preempted`; TensorBoard an `events` text).
Going back to an older checkpoint than the tracker has seen gives W&B/MLflow a new run for the
branch (named as forked from the old one); TensorBoard purges.

A tracker that fails (no network, a bad key, a missing package) never stops training: one warning,
then the run goes on without it. Any object with `name`, `live`, `start`, `log`, `finish` works.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from pathlib import Path
from typing import Any, Optional, Sequence

from preemptible.errors import ConfigError
from preemptible.files import write_atomic
from preemptible.names import TRACKERS

log = logging.getLogger("preemptible.trackers")  # the name users filter on (stable across moves)

STATE_FILE = TRACKERS
_SKIP = ("step", "time", "event")


def _numbers(row: dict) -> dict[str, float]:
    """A row's numeric values (not step/time), floats; lists and strings are left to metrics.jsonl."""
    out = {}
    for k, v in row.items():
        if k in _SKIP or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[k] = float(v)
    return out


def _event_text(row: dict) -> str:
    fields = {k: v for k, v in row.items() if k not in ("event", "step", "time", "params_sha256", "notices",
                                                         "process_started", "entered")}
    return f"{row['event']} at step {row.get('step')}: " + ", ".join(f"{k}={v}" for k, v in fields.items())


def _need(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(f"{module} is not installed ({e}); pip install 'preemptible[{extra}]'") from None


class TensorBoard:
    """TensorBoard event files in `log_dir` (default `<run dir>/tensorboard`), purged at each resume."""
    name = "tensorboard"
    live = True       # rows as they are written (a resume purges what follows its checkpoint)
    durable = False   # written by a background thread: on disk for sure only after close()

    def __init__(self, log_dir: Optional[str] = None, flush_secs: float = 10.0):
        if log_dir is not None and (not isinstance(log_dir, str) or not log_dir):
            raise ConfigError(f"log_dir={log_dir!r}; expected a directory path or null (<run dir>/tensorboard)")
        if isinstance(flush_secs, bool) or not isinstance(flush_secs, (int, float)) or flush_secs <= 0:
            raise ConfigError(f"flush_secs={flush_secs!r}; expected seconds > 0")
        self.log_dir, self.flush_secs = log_dir, flush_secs
        self._w: Any = None

    def start(self, run_dir: Path, saved: dict, first_step: int, config: Optional[dict]) -> dict:
        _need("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        path = self.log_dir or str(run_dir / "tensorboard")
        # Everything from first_step on is written again (the replay, then the new steps): what an
        # earlier attempt left there (steps a crash computed past its checkpoint) is purged by readers.
        self._w = SummaryWriter(path, purge_step=first_step, flush_secs=self.flush_secs)
        if config and first_step <= 1:
            self._w.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)
        return {"log_dir": path}

    def log(self, rows: list[dict]) -> None:
        for row in rows:
            if "event" in row:
                self._w.add_text("events", _event_text(row), row.get("step", 0), walltime=row.get("time"))
                self._w.add_scalar(f"events/{row['event']}", 1.0, row.get("step", 0), walltime=row.get("time"))
                continue
            for k, v in _numbers(row).items():
                self._w.add_scalar(k, v, row["step"], walltime=row.get("time"))

    def finish(self, status: str, reason: Optional[str], step: int) -> None:
        self._w.add_text("status", f"{status}" + (f" ({reason})" if reason else "") + f" at step {step}", step)
        self._w.close()


class WandB:
    """One W&B run for the whole training run (id in trackers.json); rows once a checkpoint covers them."""
    name = "wandb"
    live = False      # rows once a commit covers them (W&B cannot take points back)
    durable = False   # written by W&B's service process: complete only after finish()

    def __init__(self, project: Optional[str] = None, entity: Optional[str] = None, name: Optional[str] = None,
                 group: Optional[str] = None, tags: Sequence[str] = (), mode: Optional[str] = None,
                 dir: Optional[str] = None):
        if mode not in (None, "online", "offline", "disabled"):
            raise ConfigError(f"mode={mode!r}; expected online, offline, disabled or null (W&B's own default)")
        self.project, self.entity, self.run_name, self.group = project, entity, name, group
        self.tags, self.mode, self.dir = list(tags or ()), mode, dir
        self._run: Any = None

    def start(self, run_dir: Path, saved: dict, first_step: int, config: Optional[dict]) -> dict:
        wandb = _need("wandb", "wandb")
        run_id = saved.get("id") or secrets.token_hex(4)  # W&B's own form: 8 of [a-z0-9]
        self._run = wandb.init(project=self.project or "preemptible", entity=self.entity,
                               name=self.run_name or run_dir.name, group=self.group, tags=self.tags or None,
                               id=run_id, resume="allow", mode=self.mode, dir=self.dir or str(run_dir),
                               config=config, reinit="create_new", settings=wandb.Settings(silent=True))
        if saved.get("forked_from"):
            self._run.config.update({"preemptible/forked_from": saved["forked_from"]}, allow_val_change=True)
        return {"id": run_id, **({"forked_from": saved["forked_from"]} if saved.get("forked_from") else {})}

    def log(self, rows: list[dict]) -> None:
        for row in rows:
            if "event" in row:
                self._run.log({f"events/{row['event']}": 1.0}, step=row.get("step", 0))
                continue
            self._run.log(_numbers(row), step=row["step"])

    def finish(self, status: str, reason: Optional[str], step: int) -> None:
        self._run.summary["preemptible/status"] = status
        if reason:
            self._run.summary["preemptible/stop_reason"] = reason
        if status == "preempted":
            self._run.mark_preempting()  # W&B shows the run as preempted, to be resumed
        self._run.finish(exit_code={"done": 0, "preempted": 1, "failed": 1}[status])


class MLflow:
    """One MLflow run for the whole training run (id in trackers.json); rows once a checkpoint covers them.

    tracking_uri: None: MLflow's own (MLFLOW_TRACKING_URI). A local `file:` store needs
    MLFLOW_ALLOW_FILE_STORE=true with MLflow 3 (its rule, not ours).
    """
    name = "mlflow"
    live = False      # rows once a commit covers them (MLflow cannot take points back)
    durable = True    # log_batch returns once the store has them

    def __init__(self, tracking_uri: Optional[str] = None, experiment: str = "preemptible",
                 run_name: Optional[str] = None, tags: Optional[dict] = None):
        if not isinstance(experiment, str) or not experiment:
            raise ConfigError(f"experiment={experiment!r}; expected an experiment name")
        self.tracking_uri, self.experiment, self.run_name, self.tags = tracking_uri, experiment, run_name, dict(tags or {})
        self._client: Any = None
        self._run_id: Optional[str] = None

    def start(self, run_dir: Path, saved: dict, first_step: int, config: Optional[dict]) -> dict:
        _need("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        self._client = client = MlflowClient(tracking_uri=self.tracking_uri)
        if saved.get("run_id"):
            self._run_id = saved["run_id"]
            client.update_run(self._run_id, status="RUNNING")
            client.set_tag(self._run_id, "preemptible.status", "running")
            return dict(saved)
        exp = client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(self.experiment)
        tags = {"preemptible.run_dir": str(run_dir), "preemptible.status": "running", **self.tags}
        if saved.get("forked_from"):
            tags["preemptible.forked_from"] = saved["forked_from"]
        run = client.create_run(exp_id, run_name=self.run_name or run_dir.name, tags=tags)
        self._run_id = run.info.run_id
        if config:
            from mlflow.entities import Param

            flat = _flatten(config)
            params = [Param(k, str(v)[:6000]) for k, v in sorted(flat.items())]
            for i in range(0, len(params), 100):
                client.log_batch(self._run_id, params=params[i:i + 100])
        return {"run_id": self._run_id, "experiment_id": exp_id,
                **({"forked_from": saved["forked_from"]} if saved.get("forked_from") else {})}

    def log(self, rows: list[dict]) -> None:
        from mlflow.entities import Metric

        metrics = []
        for row in rows:
            ms = int(row.get("time", 0) * 1000)
            values = {f"events.{row['event']}": 1.0} if "event" in row else _numbers(row)
            metrics += [Metric(k, v, ms, int(row.get("step", 0))) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self._client.log_batch(self._run_id, metrics=metrics[i:i + 1000])

    def finish(self, status: str, reason: Optional[str], step: int) -> None:
        self._client.set_tag(self._run_id, "preemptible.status", status)
        if reason:
            self._client.set_tag(self._run_id, "preemptible.stop_reason", reason)
        # MLflow has no "preempted": SCHEDULED (to run again) says it; never FAILED or KILLED for a stop.
        self._client.set_terminated(self._run_id, status={"done": "FINISHED", "preempted": "SCHEDULED",
                                                          "failed": "FAILED"}[status])


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class TrackerFeed:
    """What `Run` does with its trackers (rank 0): ids kept in the run directory, rows held until a
    commit covers them (trackers that cannot purge), failures turned into one warning.

    Per tracker, trackers.json keeps `sent_step` (the newest step it was given) and `durable_step`
    (the newest step it surely stored: at once for a synchronous tracker, at a clean finish for the
    others). A start re-sends metrics.jsonl's rows after `durable_step` up to the resume step, so
    what a killed process's tracker lost is filled in; TensorBoard purges from there first, W&B
    drops what it already has (it ignores steps below its current one).
    """

    def __init__(self, trackers: Sequence[Any]):
        for t in trackers:
            if not all(hasattr(t, a) for a in ("name", "live", "start", "log", "finish")):
                raise ConfigError(f"tracker={t!r}; expected a preemptible.trackers tracker (TensorBoard, WandB, "
                                  "MLflow) or an object with name, live, start, log, finish")
        names = [t.name for t in trackers]
        if len(set(names)) != len(names):
            raise ConfigError(f"tracker: {names} names one tracker twice")
        self.trackers = list(trackers)
        self._active: list[Any] = []
        self._held: list[dict] = []
        self._sent: dict[str, int] = {}
        self._durable: dict[str, int] = {}
        self._state: dict[str, dict] = {}
        self._path: Optional[Path] = None

    def start(self, run_dir: Path, resume_step: Optional[int], config: Optional[dict],
              new_rows: Sequence[dict] = ()) -> None:
        """Open every tracker (its saved run, or a new one), fill in what it lacks up to
        `resume_step` from metrics.jsonl, then give it `new_rows` (this start's own events)."""
        from preemptible.observe.metrics import read_history

        self._path = run_dir / STATE_FILE
        try:
            saved_all = json.loads(self._path.read_text()) if self._path.exists() else {}
            if not isinstance(saved_all, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            log.warning("tracker: %s is unreadable (%s); starting new tracker runs", self._path, e)
            saved_all = {}
        at = resume_step or 0
        history = None
        for t in self.trackers:
            saved = saved_all.get(t.name) if isinstance(saved_all.get(t.name), dict) else {}
            sent, durable = saved.get("sent_step", 0), saved.get("durable_step", 0)
            sent = sent if isinstance(sent, int) else 0
            durable = min(durable if isinstance(durable, int) else 0, at)
            if not t.live and sent > at:
                # Going back to an older checkpoint (or starting over): this tracker cannot take
                # back what it has, so the branch gets a run of its own, filled in up to here.
                old = saved.get("id") or saved.get("run_id")
                log.warning("tracker %s: resuming at step %d, before the %d steps it has; the branch gets a new "
                            "%s run (forked from %s)", t.name, at, sent, t.name, old)
                saved, durable = {"forked_from": old}, 0
            try:
                state = t.start(run_dir, {k: v for k, v in saved.items() if k not in ("sent_step", "durable_step")},
                                durable + 1, config)
            except Exception as e:  # noqa: BLE001 -- a tracker never stops training
                self._warn(t, "could not start", e)
                if saved.get("id") or saved.get("run_id"):  # kept for the next start
                    self._state[t.name] = {k: v for k, v in saved.items() if k not in ("sent_step", "durable_step")}
                    self._sent[t.name], self._durable[t.name] = sent, durable
                continue
            self._active.append(t)
            self._state[t.name] = dict(state or {})
            self._sent[t.name] = self._durable[t.name] = durable
            if durable < at:
                if history is None:
                    history = read_history(run_dir)
                mine = {(r.get("event"), r.get("time")) for r in new_rows}
                replay = sorted([r for r in history.rows + history.events if durable < r.get("step", 0) <= at
                                 and (r.get("event"), r.get("time")) not in mine], key=lambda r: r.get("step", 0))
                self._send([t], replay)
            self._sent[t.name] = at
            if getattr(t, "durable", False):
                self._durable[t.name] = at
        self.add(list(new_rows))
        self._save()

    def add(self, rows: list[dict]) -> None:
        """Rows as metrics.jsonl gets them: live trackers now, the others once committed()."""
        if not self._active:
            return
        self._send([t for t in self._active if t.live], rows)
        if any(not t.live for t in self._active):
            self._held += rows

    def committed(self, step: Optional[int]) -> None:
        """A checkpoint of `step` is committed: held rows up to it are safe to send."""
        if step is None or not self._held or self._held[0].get("step", 0) > step:
            return
        ready = [r for r in self._held if r.get("step", 0) <= step]
        self._held = [r for r in self._held if r.get("step", 0) > step]
        self._send([t for t in self._active if not t.live], ready)
        self._save()

    def finish(self, status: str, reason: Optional[str], step: int, committed: Optional[int]) -> None:
        """The run ended: send what a commit covers; a stop whose save was skipped still tells its
        event (at the last committed step: later steps will be computed again)."""
        self.committed(committed)
        if self._held:
            at = committed or 0
            events = [{**r, "step": at, "at_step": r.get("step")} for r in self._held if "event" in r]
            self._held = []
            self._send([t for t in self._active if not t.live], events)
        for t in list(self._active):
            try:
                t.finish(status, reason, step)
                self._durable[t.name] = self._sent.get(t.name, 0)
            except Exception as e:  # noqa: BLE001
                self._warn(t, "could not finish", e)
        self._active = []
        self._save()

    def _send(self, trackers: list[Any], rows: list[dict]) -> None:
        if not rows:
            return
        top = max(r.get("step", 0) for r in rows)
        for t in trackers:
            try:
                t.log(rows)
            except Exception as e:  # noqa: BLE001
                self._warn(t, "failed", e)
                continue
            self._sent[t.name] = max(self._sent.get(t.name, 0), top)
            if getattr(t, "durable", False):
                self._durable[t.name] = self._sent[t.name]

    def _warn(self, t: Any, what: str, e: BaseException) -> None:
        log.warning("tracker %s %s (%s: %s); training goes on without it (metrics.jsonl has everything)",
                    t.name, what, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        if t in self._active:
            self._active.remove(t)

    def _save(self) -> None:
        if self._path is None:
            return
        data = {name: {**state, "sent_step": self._sent.get(name, 0), "durable_step": self._durable.get(name, 0)}
                for name, state in self._state.items()}
        try:
            write_atomic(self._path, json.dumps(data, indent=1), durable=False)
        except OSError as e:
            log.warning("tracker: %s could not be written (%s)", self._path, e)
