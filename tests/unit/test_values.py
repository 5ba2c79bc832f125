"""`run.values` holds only what a resume can load, however it is changed, and a stop's save never
fails on a value (docs/edges.md, "Which values values= and meta= accept")."""

import logging
import os
import signal

import numpy as np
import pytest
import torch

from preemptible import Checkpointer, ConfigError, Run, Stopping
from preemptible.run.state import PlainValues


@pytest.mark.parametrize("change, where", [
    (lambda v: v.__ior__({"x": np.float32(1)}), r"run.values\['x'\]"),
    (lambda v: v.update(x=np.float32(1)), r"run.values\['x'\]"),
    (lambda v: v.setdefault("x", np.float32(1)), r"run.values\['x'\]"),
    (lambda v: v["seen"].append(np.float32(1)), r"run.values\['seen'\]\[0\]"),
    (lambda v: v["seen"].extend([1, np.int64(2)]), r"run.values\['seen'\]\[1\]"),
    (lambda v: v["seen"].insert(0, object()), r"run.values\['seen'\]\[0\]"),
    (lambda v: v["seen"].__iadd__([np.float16(1)]), r"run.values\['seen'\]\[0\]"),
    (lambda v: v["seen"].__setitem__(slice(0, 0), [np.float16(1)]), r"run.values\['seen'\]\[0:0\]"),
    (lambda v: v["nested"]["a"].append({"b": np.float32(1)}), r"run.values\['nested'\]\['a'\]\[1\]\['b'\]"),
    (lambda v: v["nested"].__setitem__("c", np.float32(1)), r"run.values\['nested'\]\['c'\]"),
    (lambda v: v["nested"].__ior__({"c": np.float32(1)}), r"run.values\['nested'\]\['c'\]"),
    (lambda v: v["pair"][0].append(np.float32(1)), r"run.values\['pair'\]\[0\]\[0\]"),
])
def test_every_way_of_changing_values_is_checked_where_the_change_is_made(change, where):
    values = PlainValues({"seen": [], "nested": {"a": [0]}, "pair": ([], 1)})
    before = repr(values)
    with pytest.raises(ConfigError, match="^" + where + r"=.* is not plain data a resume can load"):
        change(values)
    assert repr(values) == before  # nothing half-changed


def test_plain_changes_go_through_and_save_as_plain_data():
    from preemptible.run.state import from_blob, to_blob, unwrap

    values = PlainValues({"seen": []})
    values |= {"best": 1.5, "hist": {"loss": [1.0]}}
    values["seen"] += [1, 2]
    values["hist"]["loss"].append(0.5)
    values.setdefault("n", 0)
    saved = from_blob(to_blob(unwrap(values)), "values")  # weights_only: no class of ours in it
    assert saved == {"seen": [1, 2], "best": 1.5, "hist": {"loss": [1.0, 0.5]}, "n": 0}
    assert type(saved["hist"]["loss"]) is list


def test_values_keep_their_own_copy_of_a_list(tmp_path):
    """The documented consequence: run.values copies the lists and dicts it is given; changes
    reach it through run.values, not through the caller's own list."""
    mine = [1]
    values = PlainValues({"seen": mine})
    mine.append(2)
    values["seen"].append(3)
    assert values["seen"] == [1, 3] and mine == [1, 2]


def test_a_stop_saves_even_when_a_value_got_past_the_checks(tmp_path, caplog):
    """A value put in behind run.values' back (dict.__setitem__) cannot make a TERM's save fail:
    the checkpoint is written without it, one warning names it, the run exits 143, and a resume
    has every other value."""
    model = torch.nn.Linear(1, 1)
    previous = signal.getsignal(signal.SIGTERM)
    run = Run(tmp_path, model=model, data=range(1000), values={"best": 2.0}, max_steps=50, checkpoint=Checkpointer(interval=0),
              stopping=Stopping(signals=("SIGTERM",), check_every=1))
    try:
        with caplog.at_level(logging.WARNING), run:
            for _ in run.batches():
                if run.step == 3:
                    dict.__setitem__(run.values, "bad", np.float32(1.0))
                    run.values["best"] = 1.0
                    os.kill(os.getpid(), signal.SIGTERM)  # a real signal, to this process
                if run.step_done():
                    break
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert run.exit_code == 143 and run.last_checkpoint is not None
    warned = [r.getMessage() for r in caplog.records if "saved without run.values['bad']" in r.getMessage()]
    assert len(warned) == 1 and "run.values['bad']=np.float32(1.0)" in warned[0], warned
    again = Run(tmp_path, model=model, values={"best": 9.0}, max_steps=4, stopping=Stopping(signals=None))
    with again:
        assert again.step == run.step and dict(again.values) == {"best": 1.0}
