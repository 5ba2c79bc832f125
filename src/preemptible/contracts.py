"""The typed contracts of what a user hands to `Run`: the data, a tracker, a notice source.

`Run` checks them by what an object has (duck typing), never by its class: these Protocols say
what that is, for readers, type checkers and IDEs (`isinstance` works too: they are runtime checkable).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Protocol, runtime_checkable

if TYPE_CHECKING:
    from preemptible.stopping.notices import Notice


@runtime_checkable
class DataSource(Protocol):
    """`Run(data=...)` whose position is saved: iterable, with `state_dict()`/`load_state_dict()`
    (torchdata's StatefulDataLoader is one as is). Saved per rank at every step boundary; a resume
    on the same world size continues at the same batch. A `sampler` with `set_epoch(n)` is called
    at each epoch. (A plain iterable without state works too: it starts again from its beginning.)"""

    def __iter__(self) -> Iterator[Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class PositionedData(DataSource, Protocol):
    """A `DataSource` that can also continue on another world size: `global_position()` says how
    many samples all ranks together have consumed (saved with each checkpoint), and
    `resume_position(position, saved_world_size)` continues from there with this world size.
    Without them, a resume on another world size starts the epoch again (and says so)."""

    def global_position(self) -> Any: ...

    def resume_position(self, position: Any, saved_world_size: int) -> None: ...


@runtime_checkable
class Tracker(Protocol):
    """`Run(tracker=...)`: an experiment tracker fed by rank 0 (`preemptible.trackers` has
    TensorBoard, WandB and MLflow).

    name:    unique among a run's trackers; keys its saved state in `<run dir>/trackers.json`.
    live:    True: rows are sent as they are written (a resume must be able to drop what follows
             its checkpoint, as TensorBoard's purge does); False: rows are held until a committed
             checkpoint covers them, so each step is sent once.
    start(run_dir, saved, first_step, config) -> dict: open (or continue: `saved` is what the last
             start returned, `first_step` the resume step or None) and return what to save.
    log(rows): metric rows ({"step", "time", name: value, ...}) and events ({"event": ...}).
    finish(status, reason, step): "done", "preempted" or "failed", with the stop's reason.
    """

    name: str
    live: bool

    def start(self, run_dir: Path, saved: dict, first_step: Optional[int], config: Optional[dict]) -> dict: ...

    def log(self, rows: list[dict]) -> None: ...

    def finish(self, status: str, reason: Optional[str], step: int) -> None: ...


@runtime_checkable
class NoticeSource(Protocol):
    """`Notices(sources=[...])`: something that can say "this machine goes away soon".

    name:   shown in the log and the stop's record.
    poll(): called from a background thread every `poll_seconds`; returns a `preemptible.Notice`
            (source, seen, deadline: Unix time or None) once there is one, else None. It may block
            up to the Notices' timeout; an exception is logged once and polling goes on.
    """

    name: str

    def poll(self) -> Optional["Notice"]: ...
