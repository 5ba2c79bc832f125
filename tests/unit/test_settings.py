"""Every value the recipe reads later is checked at start; configuration changes at resume."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from preemptible.distributed.env import read_env
from preemptible.errors import ConfigError
from finetune_parts.data import ByteWindows
from finetune_parts.lr import warmup_cosine
from finetune_parts.model import GPT
from finetune_parts.hydra_glue import build
from finetune_parts.settings import config_changes, validate

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose_with(*overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("finetune", overrides=list(overrides))


def test_the_default_configuration_is_valid():
    validate(compose_with())


@pytest.mark.parametrize("override, words", [
    ("stopping.grace_period=abc", "stopping.grace_period='abc'"),
    ("stopping.grace_period=0", "stopping.grace_period=0; expected seconds > 0 or null"),
    ("stopping.grace_period=-5", "stopping.grace_period=-5"),
    ("stopping.exit_code_on_stop=256", "stopping.exit_code_on_stop=256; expected an exit status from 0 to 255"),
    ("stopping.exit_code_on_stop=-1", "stopping.exit_code_on_stop=-1"),
    ("stopping.exit_code_on_stop=true", "stopping.exit_code_on_stop=True"),
    ("report.log_every=0", "report.log_every=0"),
    ("trainer.max_steps=true", "trainer.max_steps=True"),
    ("trainer.max_steps=1.5", "trainer.max_steps=1.5"),
    ("stopping.save_guess=abc", "stopping.save_guess='abc'"),
    ("stopping.margin=-1", "stopping.margin=-1"),
    ("stopping.slurm_time_limit=maybe", "stopping.slurm_time_limit='maybe'"),
    ("report.param_digests=1", "report.param_digests=1"),
    ("optim.lr=-1", "optim.lr=-1"),
    ("optim.lr=0", "optim.lr=0"),
    ("ownership.wait=-1", "ownership.wait=-1"),
    ("ownership.stale_after=0", "ownership.stale_after=0"),
    ("seed=abc", "seed='abc'"),
    ("optim.lr=inf", "optim.lr=inf; expected a number > 0 (a finite value)"),
    ("optim.lr=nan", "optim.lr=nan"),
    ("stopping.grace_period=nan", "stopping.grace_period=nan"),
    ("stopping.save_guess=nan", "stopping.save_guess=nan"),
    ("stopping.margin=inf", "stopping.margin=inf"),
    ("ownership.wait=nan", "ownership.wait=nan"),
    ("stopping.slurm_time_limit=no", "stopping.slurm_time_limit='no'"),
    ("optim.betas=abc", "optim.betas='abc'; expected two numbers in [0, 1)"),
    ("optim.betas=[0.9,2]", "optim.betas=[0.9, 2]"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1"),
    ("data.block_size=256", "data.block_size=256 is longer than model.block_size=128"),
    ("run_dir=''", "run_dir=''; expected a directory path"),
])
def test_bad_values_are_named(override, words):
    """What the recipe checks before anything is written: its own keys, then each part as it is built."""
    cfg = compose_with(override)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
        for node in ("checkpoint", "stopping", "ownership", "report", "notices", "signal_handler"):
            build(cfg, node)
    assert words in str(e.value)


@pytest.mark.parametrize("kwargs, words", [
    ({"block_size": 0}, "model.block_size=0"), ({"vocab_size": -1}, "model.vocab_size=-1"),
    ({"n_layer": True}, "model.n_layer=True"), ({"dropout": 1.0}, "model.dropout=1.0"),
    ({"n_embd": 30, "n_head": 4}, "divisible"),
])
def test_model_values(kwargs, words):
    with pytest.raises(ValueError, match=words):
        GPT(**kwargs)


def test_data_paths(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("x" * 5000)
    assert len(ByteWindows(str(text), block_size=8).data) == 5000  # one file, not its characters
    with pytest.raises(ConfigError, match=r"data.paths=\[\] lists no files"):
        ByteWindows([], block_size=8)
    with pytest.raises(ConfigError, match="data.paths=5"):
        ByteWindows(5, block_size=8)
    with pytest.raises(ConfigError, match="data.block_size=0"):
        ByteWindows(None, block_size=0)


def test_schedule_values():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="lr_schedule.warmup_steps=-1"):
        warmup_cosine(opt, 10, warmup_steps=-1)
    with pytest.raises(ValueError, match="lr_schedule.min_ratio=2"):
        warmup_cosine(opt, 10, min_ratio=2)


@pytest.mark.parametrize("env, words", [
    ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x'"), ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"), ({"RANK": "3", "WORLD_SIZE": "2"}, "do not fit"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK='-1'"),
])
def test_launcher_variables(monkeypatch, env, words):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=words):
        read_env()


def test_config_changes_are_sorted_into_refused_applied_and_other():
    old = {"seed": 1, "model": {"n_embd": 32, "dropout": 0.1}, "optim": {"lr": 0.001}, "trainer": {"max_steps": 10},
           "report": {"log_every": 10}, "checkpoint": {"resume": "auto"}}
    new = {"seed": 1, "model": {"n_embd": 64, "dropout": 0.0}, "optim": {"lr": 0.002}, "trainer": {"max_steps": 20},
           "report": {"log_every": 5}, "checkpoint": {"resume": "auto"}}
    refused, applied, other = config_changes(old, new)
    assert refused == ["model.n_embd: 32 -> 64"]
    assert applied == ["model.dropout: 0.1 -> 0.0", "optim.lr: 0.001 -> 0.002", "trainer.max_steps: 10 -> 20"]
    assert other == ["report.log_every: 10 -> 5"]
    assert config_changes(None, new) == ([], [], [])
