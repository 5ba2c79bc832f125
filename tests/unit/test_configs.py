"""Every config under conf/ composes, and every `_target_` in it instantiates."""

import functools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from preemptible import DistributedSignalHandler
from finetune_parts.hydra_glue import build

CONF = Path(__file__).resolve().parents[2] / "conf"
OPTIONS = sorted((p.parent.name, p.stem) for p in CONF.glob("*/*.yaml"))
# What the recipe passes at build time, per group.
RUNTIME = {"data": dict(rank=0, world_size=1, seed=0, max_bytes=50_000)}


def _compose(*overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("finetune", overrides=list(overrides), return_hydra_config=False)


def test_every_group_option_is_covered():
    assert {g for g, _ in OPTIONS} == {"model", "data", "optim", "lr_schedule", "signal_handler", "checkpoint", "trainer",
                                       "notices", "tracker", "stopping", "ownership", "report", "watchdog"}


@pytest.mark.parametrize("group, option", OPTIONS)
def test_compose_and_instantiate(group, option, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    cfg = _compose(f"{group}={option}")
    node = cfg[group]
    OmegaConf.resolve(cfg)
    if "_target_" not in node:
        assert group == "trainer" or option == "none"  # plain settings, or a group turned off
        return
    obj = instantiate(node, **RUNTIME.get(group, {}))
    if group in ("optim", "lr_schedule"):
        assert isinstance(obj, functools.partial)
        import torch
        opt = instantiate(cfg.optim)([torch.nn.Parameter(torch.zeros(2))])
        obj = obj(opt, total_steps=10) if group == "lr_schedule" else obj([torch.nn.Parameter(torch.zeros(2))])
    if group == "signal_handler":
        assert isinstance(obj, DistributedSignalHandler) and obj.local_rank == 3
        with obj:  # installs and releases for real, group built lazily (no dist here)
            assert obj.should_stop() is False
    if group == "tracker":
        from preemptible.observe.trackers import TrackerFeed

        assert obj.name == option and TrackerFeed([obj]).trackers == [obj]  # built, nothing imported or opened yet
    if group == "notices":
        from preemptible import Notices

        assert isinstance(obj, Notices) and obj.cloud is None and obj.stop_file == "STOP"


def test_notices_from_the_command_line():
    """The issue's names: notices.cloud / endpoint / poll_seconds / stop_file; notices=none turns it off."""
    cfg = _compose("notices.cloud=aws", "notices.endpoint=http://127.0.0.1:8080", "notices.poll_seconds=0.5",
                   "notices.stop_file=null")
    n = build(cfg, "notices")
    assert (n.cloud, n.endpoint, n.poll_seconds, n.stop_file) == ("aws", "http://127.0.0.1:8080", 0.5, None)
    assert build(_compose("notices=none"), "notices") is None
    from preemptible import ConfigError

    with pytest.raises(ConfigError, match=r"^notices\.cloud='gce'; expected null \(off\), auto, aws, gcp or azure"):
        build(_compose("notices.cloud=gce"), "notices")


def test_signal_handler_overrides_from_the_command_line():
    cfg = _compose("signal_handler.sig=SIGUSR2", "signal_handler.check_every=5")
    handler = instantiate(cfg.signal_handler)
    assert [s.name for s in handler.signals] == ["SIGUSR2"] and handler._vote.every == 5
    cfg = _compose("signal_handler=slurm")
    handler = instantiate(cfg.signal_handler)
    assert [s.name for s in handler.signals] == ["SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP"]
    assert isinstance(handler._group_spec, functools.partial)  # built only once dist is up
    cfg = _compose("signal_handler.group=gloo", "signal_handler.local_rank=2", "signal_handler.sig=[SIGUSR2,SIGTERM]")
    handler = instantiate(cfg.signal_handler)
    assert handler._group_spec == "gloo" and handler.local_rank == 2 and len(handler.signals) == 2
    cfg = _compose("signal_handler=none")  # an option of the group, not an argv rewrite
    assert build(cfg, "signal_handler") is None
    cfg = _compose("~signal_handler")
    assert build(cfg, "signal_handler") is None


# Where the recipe chooses otherwise than the library's default, on purpose (each one said in the YAML).
RECIPE_CHOICES = {
    ("report", "default"): {"log_file": "finetune.log", "param_digests": True},
    # the documented signal-handling API keeps its own defaults (one signal, a vote every step); the
    # recipe stops on TERM/INT/HUP, votes as rarely as a 1 s latency allows, on a CPU side group
    **{("signal_handler", o): {"sig": None, "group": None, "local_rank": None, "check_every": "auto"}
       for o in ("default", "slurm", "sigterm")},
    ("tracker", "mlflow"): {"experiment": "preemptible"},
}


def _library_defaults(target):
    import dataclasses
    import inspect

    from hydra.utils import get_object

    obj = get_object(target)
    if dataclasses.is_dataclass(obj):
        return {f.name: f.default for f in dataclasses.fields(obj) if f.init}
    return {name: p.default for name, p in inspect.signature(obj).parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("group, option", [o for o in OPTIONS if o[0] in (
    "checkpoint", "stopping", "ownership", "report", "notices", "signal_handler", "tracker")])
def test_each_yaml_default_equals_the_library_default_it_sets(group, option):
    """One home per default: a YAML value that sets a library argument equals the library's default,
    unless the recipe chooses otherwise on purpose (RECIPE_CHOICES)."""
    node = OmegaConf.to_container(_compose(f"{group}={option}")[group], resolve=False)
    if "_target_" not in node or not node["_target_"].startswith("preemptible."):
        return
    defaults = _library_defaults(node.pop("_target_"))
    chosen = RECIPE_CHOICES.get((group, option), {})
    for key, value in node.items():
        assert key in defaults, f"{group}/{option}.yaml sets {key}, which {group}'s target does not take"
        if key in chosen:
            continue
        expected = defaults[key]
        expected = list(expected) if isinstance(expected, tuple) else expected
        assert value == expected, f"{group}/{option}.yaml: {key}={value!r}, the library's default is {expected!r}"


def test_the_docs_table_of_keys_says_the_yaml_defaults():
    """docs/recipe.md's table restates each key's default for readers: it must say what the YAML sets."""
    import re

    import yaml

    cfg = OmegaConf.to_container(_compose(), resolve=False)
    text = (CONF.parent / "docs" / "recipe.md").read_text()
    checked = 0
    for key, default in re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \| `([^`]*)` \|", text, re.M):
        group, name = key.split(".")
        if group not in cfg or not isinstance(cfg[group], dict) or name not in cfg[group]:
            continue
        value = cfg[group][name]
        if isinstance(value, str) and value.startswith("${"):
            continue  # an interpolation, shown as such
        assert yaml.safe_load(default) == value, f"docs/recipe.md says {key} defaults to {default}; the YAML: {value!r}"
        checked += 1
    assert checked >= 30, checked
