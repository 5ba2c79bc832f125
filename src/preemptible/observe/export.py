"""Getting things out of a run directory without a training script: the model's weights as a plain
file, and what checkpoints there are (`python -m preemptible export|status`).

Both only read. Every checkpoint is read through the safe loader (no code runs, whoever wrote it),
its checksums verified first; the model need not be built: shapes and dtypes come from the
checkpoint's metadata.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import torch

from preemptible.checkpoint.layout import in_line, read_marker, step_of, why_invalid
from preemptible.checkpoint.lineage import Lineage
from preemptible.observe.metrics import ENDS, read_metrics
from preemptible.errors import ConfigError, UnsafeCheckpointError
from preemptible.stopping.watchdog import HANG_EXIT
from preemptible.names import ABANDONED, CHECKPOINTS, COMMIT, LATEST, LEASE, METRICS

MODEL_PREFIX = "model_optim.model."
FORMATS = ("pt", "safetensors")


def checkpoint_root(path: Path) -> Path:
    """A run directory's checkpoint directory (`<run>/checkpoints` if there), else `path` itself."""
    return path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path


def find_checkpoint(path: Any, verify: bool = True) -> Path:
    """A checkpoint directory as given, or the one a resume of the run directory would take."""
    path = Path(path)
    if (path / COMMIT).exists() or step_of(path) is not None:
        why = why_invalid(path, verify=verify)
        if why:
            raise ConfigError(f"checkpoint={str(path)!r} is not a valid checkpoint: {why}")
        return path
    if not path.is_dir():
        raise ConfigError(f"checkpoint={str(path)!r} does not exist; give a run directory or a checkpoint directory")
    resume = Lineage(checkpoint_root(path), verify=verify).decide()
    if resume.path is None:
        raise ConfigError(f"checkpoint={str(path)!r} holds no committed checkpoint")
    return resume.path


def model_weights(checkpoint: Any, verify: bool = True) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) weights from a committed checkpoint, on the CPU, by parameter name."""
    from preemptible.checkpoint.reader import load_state
    from preemptible.checkpoint.safe_load import read_metadata

    path = find_checkpoint(checkpoint, verify)
    try:
        meta = read_metadata(str(path), read_marker(path)["files"] if (path / COMMIT).exists() else None)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"checkpoint={str(path)!r}: {e}") from None
    wanted = {}
    for key, info in meta.state_dict_metadata.items():
        if key.startswith(MODEL_PREFIX) and hasattr(info, "size"):
            wanted[key[len(MODEL_PREFIX):]] = torch.empty(tuple(info.size), dtype=info.properties.dtype)
    if not wanted:
        raise ConfigError(f"checkpoint={str(path)!r} holds no model weights (no {MODEL_PREFIX}* entries)")
    state = {"model_optim": {"model": wanted}}
    load_state(path, state, what=f"checkpoint={str(path)!r}")
    return state["model_optim"]["model"]


def export_weights(checkpoint: Any, out: Any, format: Optional[str] = None, verify: bool = True) -> Path:
    """Write a committed checkpoint's model weights to `out` as a plain `torch.save` state dict
    (format 'pt', loadable with weights_only=True) or a safetensors file ('safetensors', needs the
    `export` extra). `checkpoint`: a checkpoint directory, or a run directory (its head).
    The format defaults to `out`'s suffix (.safetensors, else pt). Single process; returns `out`."""
    out = Path(out)
    fmt = format or ("safetensors" if out.suffix == ".safetensors" else "pt")
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}; expected one of {', '.join(FORMATS)}")
    if out.is_dir():
        raise ConfigError(f"out={str(out)!r} is a directory; give a file path (e.g. {str(out / 'model.pt')!r})")
    save_file = None
    if fmt == "safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise ConfigError("format=safetensors needs the safetensors package: pip install 'preemptible[export]'"
                              ) from None
    weights = model_weights(checkpoint, verify)
    partial = out.with_name(out.name + ".partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if save_file is not None:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(partial))
        else:
            torch.save(weights, partial)
        partial.replace(out)  # never a half-written file under the name asked for
    except (OSError, RuntimeError) as e:
        why = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
        raise ConfigError(f"out={str(out)!r} cannot be written ({why}); choose a writable path") from None
    finally:
        try:
            partial.unlink(missing_ok=True)
        except OSError:
            pass
    return out


# ----------------------------------------------------------------------------- status


def status(run_dir: Any, verify: bool = False) -> dict[str, Any]:
    """What a run directory holds: its head, every checkpoint (valid or why not, on the head's line,
    size, world size) and the run's starts and stops from metrics.jsonl."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir={str(run_dir)!r} is not a directory")
    root = checkpoint_root(run_dir)
    cp = Lineage(root, verify=verify)
    try:
        head = cp.read_head()
    except ValueError as e:
        head = {"error": str(e)}
    line = head.get("line") if head and "line" in head else None
    rows = []
    for path in sorted(root.iterdir(), key=lambda p: (step_of(p) is None, step_of(p) or 0, p.name)) \
            if root.is_dir() else []:
        if not path.is_dir() or (step_of(path) is None and not path.name.startswith("step_")):
            continue
        row: dict[str, Any] = {"name": path.name, "step": step_of(path),
                               "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file())}
        row["why_invalid"] = why_invalid(path, verify=verify)
        try:
            marker = read_marker(path)
            row.update(world_size=marker.get("world_size"), lineage=marker["lineage"], parent=marker.get("parent"),
                       time=marker.get("time"), on_head_line=in_line(marker, line) if line else None)
        except ValueError:
            pass
        row["head"] = bool(head and head.get("checkpoint") == path.name)
        rows.append(row)
    abandoned = sorted(p.name for p in (root / ABANDONED).glob("*/*")) if (root / ABANDONED).is_dir() else []
    events = [row for row in read_metrics(run_dir / METRICS) if "event" in row]
    owner = None
    if (run_dir / LEASE).is_file():
        try:
            owner = json.loads((run_dir / LEASE).read_text())
        except (OSError, ValueError):
            owner = None
        if not isinstance(owner, dict):
            owner = {"error": "unreadable OWNER file (not a lease record)"}
    return {"run_dir": str(run_dir), "checkpoints_dir": str(root), "head": head, "checkpoints": rows,
            "abandoned": abandoned, "events": events, "owner": owner}


def format_status(info: dict[str, Any]) -> str:
    """`status()` as the text `python -m preemptible status` prints."""
    out = [f"run directory: {info['run_dir']}", f"checkpoints:   {info['checkpoints_dir']}"]
    head = info["head"]
    if head is None:
        out.append(f"head:          none ({LATEST} absent)")
    elif "error" in head:
        out.append(f"head:          unusable {LATEST}: {head['error']}")
    else:
        line = " -> ".join(f"{lin}@{end}" if end is not None else lin for lin, end in head["line"])
        out.append(f"head:          {head['checkpoint']} (step {head.get('step')}); lineage {line}")
    owner = info.get("owner")
    if owner and "error" in owner:
        out.append(f"owner:         {owner['error']}")
    elif owner:
        out.append(f"owner:         {owner.get('host')} pid {owner.get('pid')}" +
                   (f" job {owner['job']}" if owner.get("job") else "") + " (a run holds it, or died holding it)")
    out.append("")
    out.append(f"{'checkpoint':<22} {'step':>8} {'ranks':>5} {'size':>10}  {'line':<5} state")
    for row in info["checkpoints"]:
        state = "valid" if row["why_invalid"] is None else f"INVALID: {row['why_invalid']}"
        if row["head"]:
            state += " (head)"
        on = {True: "yes", False: "no", None: "-"}[row.get("on_head_line")]
        out.append(f"{row['name']:<22} {row['step'] if row['step'] is not None else '-':>8} "
                   f"{row.get('world_size') or '-':>5} {_size(row['bytes']):>10}  {on:<5} {state}")
    if not info["checkpoints"]:
        out.append("(no checkpoints)")
    if info["abandoned"]:
        out.append(f"set aside in abandoned/: {', '.join(info['abandoned'])}")
    out.append("")
    out.append("starts and stops (metrics.jsonl):")
    shown = [e for e in info["events"] if e.get("event") in ("resumed", *ENDS)]
    for e in shown:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"])) if isinstance(e.get("time"), (int, float)) else "?"
        what = {"resumed": lambda: f"resumed from {e.get('from')} on {e.get('world_size')} ranks",
                "preempted": lambda: f"stopped on {e.get('signal')} " + (
                    f"(checkpoint {Path(e['checkpoint']).name})" if e.get("checkpoint") else
                    f"without saving: {e.get('save_skipped')}"),
                "done": lambda: "done",
                "killed": lambda: f"killed (no stop recorded; found by the next start): {e.get('redone')} step(s) "
                                  f"trained again from step {e.get('step')} (killed at step {e.get('reached')})",
                "failed": lambda: f"failed ({e.get('error')}): no final save",
                "hung": lambda: f"{e.get('signal')} on rank {e.get('rank')} ({e.get('cause')}): ended with status {HANG_EXIT}, "
                                f"no final save; stacks in {e.get('stacks')}"}[e["event"]]()
        out.append(f"  {when}  step {e.get('step'):>8}  {what}")
    if not shown:
        out.append("  (none recorded)")
    return "\n".join(out)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
