"""What rank 0 leaves for users and tests: metrics.jsonl, a progress bar or plain log lines."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Optional

import torch

log = logging.getLogger("preemptible.train")


class Metrics:
    """Appends one JSON object per step and per event to `<run dir>/metrics.jsonl` (rank 0 only).

    Step losses stay on the device until a flush (every `log_every` steps, and before every
    event), so logging never adds a per-step host-device sync.
    """

    def __init__(self, run_dir: str, enabled: bool, max_steps: int, log_every: int = 10):
        if log_every < 1:
            raise ValueError(f"trainer.log_every={log_every}; expected an int >= 1")
        self.enabled, self.log_every, self.max_steps = enabled, log_every, max_steps
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._pending: list[tuple[int, torch.Tensor, float, float]] = []
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, dynamic_ncols=True, desc="train")

    def start(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        if not self.enabled:
            return
        self._pending.append((step, loss.detach(), lr, time.time()))
        if len(self._pending) >= self.log_every:
            self.flush()

    def flush(self) -> None:
        if not self.enabled or not self._pending:
            return
        rows = [{"step": s, "loss": float(l), "lr": lr, "time": t} for s, l, lr, t in self._pending]
        self._pending.clear()
        self._append(rows)
        last = rows[-1]
        if self._bar is not None:
            self._bar.update(last["step"] - self._bar.n)
            self._bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
        else:
            log.info("step %d/%d loss %.4f lr %.3e", last["step"], self.max_steps, last["loss"], last["lr"])

    def event(self, name: str, **fields: Any) -> None:
        self.flush()
        if self.enabled:
            self._append([{"event": name, **fields, "time": time.time()}])

    def _append(self, rows: list[dict]) -> None:
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        self.flush()
        if self._bar is not None:
            self._bar.close()
