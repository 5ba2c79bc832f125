"""A picture of a run: loss (and LR) against step, each preemption, resume and skipped save marked,
and the wall time each interruption cost. `python -m preemptible plot RUN_DIR [-o FILE.png]`
(matplotlib, the `plot` extra). Drawn on a figure of its own: no global matplotlib state changes."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from preemptible.errors import ConfigError
from preemptible.observe.metrics import ENDS, History, read_history, read_metrics
from preemptible.names import METRICS

ABRUPT = ("killed", "hung", "peer lost")  # ends without a stop's save: the steps after the head are computed again


@dataclass
class Interruption:
    stop_step: Optional[int]     # the step the stop was agreed at (a crash: the last step logged before it)
    reason: str                  # "SIGTERM", "notice (aws)", "killed" (no stop event: SIGKILL, a crash),
                                 # "hung" / "peer lost" (the watchdog ended it), ...
    resume_step: int             # the step the next run resumed from
    lost_seconds: Optional[float]  # wall time from the resume point's first completion to the resumed run's first step, less one step
    save_skipped: bool


def interruptions(run_dir: Any) -> list[Interruption]:
    """Each stop or crash followed by a resume, and the wall time it cost: from the moment the
    resume step was first reached (in the run before) to the first step after the resume, less one
    typical step: the stop, the restart, and any steps computed twice after a crash."""
    rows = read_metrics(run_dir)
    out: list[Interruption] = []
    first_done: dict[int, float] = {}  # step -> when it was first completed
    gaps = []
    last_time, last_stop, last_step, finished = None, None, None, False
    for i, row in enumerate(rows):
        if "event" not in row:
            if last_time is not None and row.get("time") is not None:
                gaps.append(row["time"] - last_time)
            last_time, last_step = row.get("time"), row["step"]
            first_done.setdefault(row["step"], row.get("time"))
            continue
        if row["event"] in ENDS and row["event"] != "done":
            last_stop = {**row, "step": row.get("reached", row["step"])}  # a kill: the step it happened at
        elif row["event"] == "done":
            finished = True
        elif row["event"] == "resumed":
            step = row["step"]
            if finished and last_stop is None:  # started again after it was done: nothing was interrupted
                finished, last_time = False, None
                continue
            nxt = next((r for r in rows[i + 1:] if "event" not in r), None)
            since = first_done.get(step) or (last_stop or {}).get("time") or last_time
            typical = statistics.median(gaps) if gaps else 0.0
            lost = (nxt["time"] - since - typical) if nxt and since else None
            out.append(Interruption(last_stop["step"] if last_stop else last_step,
                                    last_stop.get("signal") or last_stop["event"] if last_stop else "killed", step,
                                    None if lost is None else max(lost, 0.0),
                                    bool(last_stop and last_stop.get("save_skipped"))))
            last_stop, last_time, finished = None, None, False
            for s in [s for s in first_done if s > step]:
                del first_done[s]  # computed again from here: the later completion counts
    return out


def plot_run(run_dir: Any, out: Optional[Any] = None, title: Optional[str] = None) -> Path:
    """Render the run's history to `out` (default `<run dir>/run.png`; .png, .svg, .pdf)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'preemptible[plot]'") from None
    run_dir = Path(run_dir)
    if not (run_dir / METRICS).is_file():
        raise ConfigError(f"run_dir={str(run_dir)!r} has no metrics.jsonl; expected a run directory")
    history: History = read_history(run_dir)
    if not history.rows:
        raise ConfigError(f"run_dir={str(run_dir)!r}: metrics.jsonl has no steps yet")
    out = _output(run_dir, out)

    fig = Figure(figsize=(10, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps, loss = history.series("loss")
    ax.plot(steps, loss, color="tab:blue", lw=1.2, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    lr_steps, lr = history.series("lr")
    if lr_steps:
        ax2 = ax.twinx()
        ax2.plot(lr_steps, lr, color="tab:gray", lw=0.9, ls="--", label="lr")
        ax2.set_ylabel("learning rate")
    _mark_stops_and_resumes(ax, history, run_dir, top=max(loss) if loss else 1.0)
    done = [e for e in history.events if e["event"] == "done"]
    ax.set_title(title or f"{run_dir.name}: {len(history.rows)} steps, "
                 f"{sum(1 for e in history.events if e['event'] == 'preempted')} stops, "
                 f"{sum(1 for e in history.events if e['event'] == 'resumed')} resumes"
                 + (", done" if done else ""), fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    if lr_steps:
        h2, n2 = ax2.get_legend_handles_labels()
        handles, names = handles + h2, names + n2
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    except OSError as e:
        raise ConfigError(f"out={str(out)!r} cannot be written ({e.strerror or e}); choose a writable path") from None
    return out


FORMATS = (".png", ".svg", ".pdf")


def _output(run_dir: Path, out: Optional[Any]) -> Path:
    """Where the picture goes: `out`, or `out/run.png` when `out` is a directory (default: the run's)."""
    out = Path(out) if out is not None else run_dir
    if out.is_dir():
        out = out / "run.png"
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(f"out={str(out)!r}; expected a file name ending in {', '.join(FORMATS)} (or a directory: "
                          "run.png in it)")
    return out


def _mark_stops_and_resumes(ax: Any, history: History, run_dir: Path, top: float) -> None:
    """Stops (with or without their save), kills with the steps computed again, and resumes."""
    labelled = set()

    def label(name):
        if name in labelled:
            return None
        labelled.add(name)
        return name

    def note(step, text, color, row):
        ax.annotate(text, (step, top), xytext=(3, -2 - 11 * row), textcoords="offset points", fontsize=7.5,
                    color=color, va="top")

    for e in history.events:
        if e["event"] != "preempted":
            continue
        if e.get("save_skipped"):
            ax.axvline(e["step"], color="tab:orange", ls=":", lw=1.2, label=label("stop, save skipped"))
            note(e["step"], f"{e.get('signal')}: no save", "tab:orange", 0)
        else:
            ax.axvline(e["step"], color="tab:red", lw=1.2, label=label("stop with checkpoint"))
            note(e["step"], str(e.get("signal")), "tab:red", 0)
    for it in interruptions(run_dir):
        if it.reason in ABRUPT and it.stop_step is not None and it.stop_step > it.resume_step:
            ax.axvspan(it.resume_step, it.stop_step, color="tab:red", alpha=0.12, lw=0,
                       label=label("killed, hung or peer lost: steps computed again"))
            note(it.stop_step, it.reason, "darkred", 0)
        ax.axvline(it.resume_step, color="tab:green", ls="--", lw=1.1, label=label("resume"))
        lost = f"lost {it.lost_seconds:.1f}s" if it.lost_seconds is not None else ""
        note(it.resume_step, f"resume@{it.resume_step}" + (f"\n{lost}" if lost else ""), "tab:green", 1)
