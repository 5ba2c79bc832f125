"""The data contract of a run: how batches are pulled, resumed, and what a step boundary records.

`Feed` iterates the run's `data` epoch after epoch and captures, at a step boundary, this rank's
data position and every RNG. `data` may be:
- stateful (`state_dict()`/`load_state_dict()`: torchdata's StatefulDataLoader, your own): its
  position is saved and restored;
- a plain iterable or iterator: used as is; its position is not saved (exact only when its only
  state is the RNG that the run restores, like a batch function drawing from torch's RNG).

A loop that holds batches beyond its current step (prefetching, as nanoGPT does) declares how
many (`ahead`): each pull then records the state before it, and the boundary is the state before
the first batch the next step uses.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterator, Optional

import torch

from preemptible.errors import ConfigError
from preemptible.run.state import rng_state


def stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


class Feed:
    """Batches of `data` for one rank, resumable; the step boundary it records (`boundary`)."""

    def __init__(self, data: Any):
        if data is not None and not hasattr(data, "__iter__") and not hasattr(data, "__next__"):
            raise ConfigError(f"data={type(data).__name__} is not iterable; pass a loader, an iterable or an iterator")
        self.data = data
        self.epoch = 0
        self.boundary: dict[str, Any] = {}
        self._iter: Optional[Iterator] = None
        self.ahead = 0  # batches the loop holds beyond its current step (batches(ahead=N))
        self._pre_pull: Any = collections.deque(maxlen=1)  # the state before each of the last `ahead` pulls
        self._pulls = 0  # batches pulled by this process
        self._pulls_at: list[int] = []  # _pulls at this process's first two step boundaries
        self._generator_due: Any = None  # a resumed loader's own generator state, set once its iterator exists

    @property
    def saves_position(self) -> bool:
        return self.data is not None and stateful(self.data)

    def capture(self) -> dict[str, Any]:
        """This rank's RNGs and data position now."""
        data = self.data
        position = data.global_position() if data is not None and callable(getattr(data, "global_position", None)) \
            else None
        rng = rng_state()
        data_state = None
        if self.saves_position:
            data_state = data.state_dict()
            # StatefulDataLoader.state_dict() creates the iterator if there is none yet, which draws
            # from torch's global RNG: undone, as in batches(), so that saving never moves the stream.
            torch.set_rng_state(rng["torch"])
            self._settle_generator()
        generator = self._generator()
        return {"rng": rng, "data": data_state, "epoch": self.epoch, "position": position,
                "generator": None if generator is None else generator.get_state()}

    def _generator(self) -> Optional[torch.Generator]:
        """The loader's own generator (`DataLoader(generator=g)`), shared by its sampler and its
        workers' base seed; None where it draws from torch's global RNG."""
        generator = getattr(self.data, "generator", None)
        return generator if isinstance(generator, torch.Generator) else None

    def _settle_generator(self) -> None:
        """After a resume, once the loader's iterator exists: its own generator as it was at the
        boundary. Creating the resumed iterator draws a base seed from it that the uninterrupted run
        never drew; without this, the next epoch would be shuffled differently."""
        if self._generator_due is not None and getattr(self.data, "_iterator", None) is not None:
            self._generator().set_state(self._generator_due)
            self._generator_due = None

    def mark_boundary(self) -> None:
        """The step boundary any save of this step holds: the state now, or, for a loop that holds
        `ahead` batches, the state before the first batch the next step uses."""
        if self.ahead and len(self._pre_pull) == self.ahead:
            self.boundary = self._pre_pull[0]
        else:
            self.boundary = self.capture()

    def restore_position(self, state: Any, epoch: int, generator: Any = None) -> None:
        """A resume on the same world size: the data's position as saved (where it has one), and
        its own generator's state (applied once the resumed iterator exists)."""
        if state is not None and self.saves_position:
            self.data.load_state_dict(state)
            if generator is not None and self._generator() is not None:
                self._generator_due = generator
        self.epoch = epoch

    def batches(self, ahead: int, going: Callable[[], bool]) -> Iterator[Any]:
        """The data's items while `going()`, epoch after epoch; ends early when an iterator ends."""
        if self.data is None:
            raise ConfigError("batches() needs data= (a loader, an iterable or an iterator)")
        if isinstance(ahead, bool) or not isinstance(ahead, int) or ahead < 0:
            raise ConfigError(f"batches(ahead={ahead!r}); expected an int >= 0 (batches held beyond the current step)")
        if ahead != self.ahead:
            self.ahead, self._pre_pull = ahead, collections.deque(maxlen=ahead or 1)
        empty_epochs = 0
        while going():
            if self.ahead:
                self._pre_pull.append(self.capture())
            try:
                item = self._next_item()
            except StopIteration:
                if self.ahead:
                    self._pre_pull.pop()
                if self._iter is self.data:
                    return
                self._iter = None
                self.epoch += 1
                empty_epochs += 1
                if empty_epochs > 1:
                    raise ConfigError("data yields no batches: an epoch of it is empty") from None
                continue
            empty_epochs = 0
            self._pulls += 1
            yield item

    def _next_item(self) -> Any:
        fresh = self._iter is None
        if fresh:
            if hasattr(self.data, "__next__"):
                self._iter = self.data  # an iterator (a generator): used as is
            else:
                sampler = getattr(self.data, "sampler", None)
                if callable(getattr(sampler, "set_epoch", None)):
                    sampler.set_epoch(self.epoch)
        if not (fresh and self._iter is None):
            return next(self._iter)
        # Starting an epoch draws from torch's global RNG (the loader's base seed, a sampler's seed)
        # unless the loader has a generator of its own; a resumed run starts its iterator at another
        # point of the stream than an uninterrupted one, so the draw is undone: the training's
        # random stream never sees it.
        cpu_rng = torch.get_rng_state()
        try:
            self._iter = iter(self.data)
            self._settle_generator()
            return next(self._iter)
        finally:
            torch.set_rng_state(cpu_rng)

    def check_ahead(self) -> None:
        """At the second step boundary: the batches pulled before the first step, less those pulled
        per step since, is how many the loop holds ahead; it must be what batches(ahead=) declared."""
        self._pulls_at.append(self._pulls)
        if len(self._pulls_at) != 2 or self._pulls_at[1] == self._pulls_at[0]:
            return
        first, per_step = self._pulls_at[0], self._pulls_at[1] - self._pulls_at[0]
        held = first - per_step
        if held != self.ahead and held >= 0:
            raise ConfigError(
                f"the loop holds {held} batch(es) ahead (it pulled {first} before its first step_done() and "
                f"{per_step} per step since), but batches(ahead={self.ahead}) says {self.ahead}: a checkpoint would "
                f"record the wrong data position; iterate run.batches(ahead={held})")

    def close(self) -> None:
        self._iter = None  # the data iterator (and its worker processes) need not outlive the run
