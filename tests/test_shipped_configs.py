"""The configs the project ships and the names of its knobs (issue 11).

- Every YAML file in `configs/` holds only what differs from the dataclass defaults (nanoGPT's override
  files), sweep overrides included: the test walks each file against the defaults.
- Built-in configs are found by name from any working directory; a path is relative to the working one.
- Shared knobs have one name across configs; an old name fails naming the new one, in files, overrides,
  mappings and sweep keys, before any sweep cell runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import pytest
import yaml

from agents.best_of_n import BestOfNConfig
from agents.ppo import PPOConfig
from agents.raft import RAFTConfig
from agents.registry import get_agent_class
from agents.reinforce import ReinforceConfig
from agents.sb3 import SB3A2CConfig, SB3PPOConfig
from reward_models.train import RewardTrainConfig
from rlhf_base.config import ConfigError, config_from_dict, load_config
from rlhf_gym import cli, pipeline, sweep
from rlhf_gym.configs import CONFIGS_DIR, builtin_configs, config_file
from rlhf_gym.label import LabelConfig
from rlhf_gym.pipeline import PipelineConfig
from rlhf_gym.sft import SFTConfig
from rlhf_gym.sweep import SweepConfig
from text_env.config import EnvConfig

#: The dataclass each shipped file fills; a new file must be added here, so that the rules below cover it.
SHIPPED = {"default": PipelineConfig, "sweep": SweepConfig, "smollm2": SweepConfig, "ensemble": SweepConfig}
CONFIGS = [
    PPOConfig,
    ReinforceConfig,
    RAFTConfig,
    BestOfNConfig,
    SB3PPOConfig,
    SB3A2CConfig,
    SFTConfig,
    RewardTrainConfig,
    LabelConfig,
    EnvConfig,
    SweepConfig,
    PipelineConfig,
]


def _get(obj: Any, dotted: str) -> Any:
    return functools.reduce(getattr, dotted.split("."), obj)


def _restated_overrides(config: SweepConfig) -> list[str]:
    """The sweep's fixed overrides that set a field to the value it has anyway."""
    found = []
    for text in config.overrides:
        key, _, value = text.partition("=")
        head, _, inner = key.partition(".")
        classes = (
            [EnvConfig]
            if head == "env"
            else [get_agent_class(a).Config for a in (config.agents if head == "agent" else [head])]
        )
        for cls in classes:
            if _get(load_config(cls, None, [f"{inner}={value}"]), inner) == _get(cls(), inner):
                found.append(f"overrides: {text}")
    return found


def _restated(cls: type, raw: dict[str, Any]) -> list[str]:
    """The keys of `raw` (a YAML file's mapping for `cls`) whose value equals the dataclass default."""

    def walk(raw: dict[str, Any], mine: Any, default: Any, prefix: str) -> list[str]:
        found = []
        for key, value in raw.items():
            ours, theirs = getattr(mine, key), getattr(default, key)
            if dataclasses.is_dataclass(theirs) and isinstance(value, dict):
                found += walk(value, ours, theirs, f"{prefix}{key}.")
            elif ours == theirs:
                found.append(f"{prefix}{key}")
            if isinstance(ours, SweepConfig):
                found += [f"{prefix}{key}.{entry}" for entry in _restated_overrides(ours)]
        return found

    config = config_from_dict(cls, raw)
    found = walk(raw, config, cls(), "")
    if isinstance(config, SweepConfig):
        found += _restated_overrides(config)
    return found


# --------------------------------------------------------------------------------------------------------
# configs/ holds only what differs from the defaults
# --------------------------------------------------------------------------------------------------------
def test_every_shipped_config_is_declared_and_configs_hold_yaml_only():
    assert set(builtin_configs()) == set(SHIPPED)
    assert sorted(p.name for p in CONFIGS_DIR.rglob("*") if p.is_file()) == sorted(
        f"{n}.yaml" for n in SHIPPED
    )


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_loads_and_sets_only_what_differs_from_the_defaults(name):
    path = config_file(name)
    assert isinstance(load_config(SHIPPED[name], path), SHIPPED[name])
    raw = yaml.safe_load(path.read_text())
    assert _restated(SHIPPED[name], raw) == [], f"{path} restates dataclass defaults; drop these keys"


def test_the_restated_check_finds_restated_fields_nested_fields_and_sweep_overrides():
    raw = {
        "name": "sweep",  # the default
        "betas": [0.1],
        "env": {"max_new_tokens": 32, "num_envs": 8},  # 32 is the default
        "overrides": ["best_of_n.prompts_per_iteration=64", "best_of_n.iterations=1", "agent.seed=0"],
    }
    assert _restated(SweepConfig, raw) == [
        "name",
        "env.max_new_tokens",
        "overrides: best_of_n.prompts_per_iteration=64",
        *["overrides: agent.seed=0"] * 4,  # for each of the four default agents
    ]
    nested = {"label": {"tau": 0.2}, "agents": {"overrides": ["ppo.iterations=60"]}}
    assert _restated(PipelineConfig, nested) == ["label.tau", "agents.overrides: ppo.iterations=60"]


# --------------------------------------------------------------------------------------------------------
# Built-in configs by name from anywhere; paths relative to the working directory
# --------------------------------------------------------------------------------------------------------
@pytest.fixture()
def captured(monkeypatch) -> list[Any]:
    """Stand-ins for run_sweep / run_pipeline that record the config the command built."""
    seen: list[Any] = []
    monkeypatch.setattr(sweep, "run_sweep", lambda config, force=False: seen.append(config) or CONFIGS_DIR)
    monkeypatch.setattr(pipeline, "run_pipeline", lambda config: seen.append(config) or {})
    monkeypatch.setattr(cli, "print_summary", lambda paths: 0)
    return seen


def test_commands_find_built_in_configs_from_any_directory(tmp_path, monkeypatch, captured):
    monkeypatch.chdir(tmp_path)
    for output in ("sft", "reward_model"):  # the built-in sweep's pi_ref and reward model: the pipeline's
        (tmp_path / "runs" / "default" / output).mkdir(parents=True)
    assert cli.main(["sweep"]) == 0  # default: the built-in "sweep"
    assert cli.main(["sweep", "--config", "smollm2"]) == 0
    assert cli.main(["pipeline"]) == 0
    assert cli.main(["demo", "agents.workers=1"]) == 0
    first, smollm2, default, demo = captured
    assert first.betas == [0.05] and first.env.model == "runs/default/sft"
    assert len(first.agents) == 10 and "dpo.pairs=runs/default/pairs.jsonl" in first.overrides
    assert smollm2.name == "smollm2" and smollm2.env.model == "smollm2"
    assert default.label.num_pairs == 4000 and default.agents.seeds == [0]
    assert demo.label.num_pairs == 4000 and demo.agents.workers == 1


def test_a_config_path_is_relative_to_the_working_directory(tmp_path, monkeypatch, captured, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("name: mine\nseeds: [3]\n")
    assert cli.main(["sweep", "--config", "mine.yaml"]) == 0
    assert captured[-1].name == "mine" and captured[-1].seeds == [3]
    with pytest.raises(SystemExit):  # the repository's relative path, from elsewhere: not found, and why
        cli.main(["pipeline", "--config", "configs/default.yaml"])
    err = capsys.readouterr().err
    assert "config file not found: configs/default.yaml" in err and str(tmp_path) in err
    assert "built-in configs (by name, from any directory): default, ensemble, smollm2, sweep" in err
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--config", "sweeep"])
    assert "no built-in config named 'sweeep'" in capsys.readouterr().err


def test_agent_and_stage_commands_run_on_the_defaults_without_a_config(tmp_path, monkeypatch):
    from rlhf_gym import train

    monkeypatch.chdir(tmp_path)
    seen = {}
    monkeypatch.setattr(
        train, "train", lambda agent, run_dir, config, *a, **kw: seen.update(agent=agent, c=config)
    )
    assert cli.main(["train", "--agent", "ppo"]) == 0
    assert seen == {"agent": "ppo", "c": None}


# --------------------------------------------------------------------------------------------------------
# One name per knob; old names fail naming the new one
# --------------------------------------------------------------------------------------------------------
def test_no_config_uses_a_name_that_another_config_retired():
    retired = {old for cls in CONFIGS for old in getattr(cls, "RENAMED", {})}
    for cls in CONFIGS:
        fields = {f.name for f in dataclasses.fields(cls)}
        assert not fields & retired, f"{cls.__name__} has retired names {fields & retired}"
    assert retired >= {"lr", "lam", "k", "n", "ppo_epochs"}


@pytest.mark.parametrize("cls", [c for c in CONFIGS if getattr(c, "RENAMED", None)], ids=lambda c: c.__name__)
def test_each_old_name_fails_naming_the_new_one(cls, tmp_path):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for old, new in cls.RENAMED.items():
        assert new in fields, f"{cls.__name__}.RENAMED points {old!r} at a missing field {new!r}"
        value = getattr(cls(), new)
        message = rf"'{old}' was renamed to '{new}' in {cls.__name__}: change it in "
        with pytest.raises(ConfigError, match=message + "a mapping"):
            config_from_dict(cls, {old: value})
        with pytest.raises(ConfigError, match=message + "override"):
            load_config(cls, None, [f"{old}={json.dumps(value)}"])
        path = tmp_path / "old.yaml"
        path.write_text(yaml.safe_dump({old: value}))
        with pytest.raises(ConfigError, match=message + r".*old\.yaml line 1"):
            load_config(cls, path)


def test_an_old_name_in_a_sweep_fails_before_any_cell_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "run_cell", lambda cell, config: pytest.fail("a cell ran"))
    grid = SweepConfig(agents=["reinforce"], seeds=[0], grid={"reinforce.k": [2, 4]}, runs_root=str(tmp_path))
    with pytest.raises(ConfigError, match=r"sweep cell reinforce-.*'k' was renamed to 'samples_per_prompt'"):
        sweep.run_sweep(grid, progress=False)
    overrides = dataclasses.replace(grid, grid={}, overrides=["agent.lr=1e-4"])
    with pytest.raises(ConfigError, match="'lr' was renamed to 'learning_rate' in ReinforceConfig"):
        sweep.run_sweep(overrides, progress=False)
    assert not (tmp_path / "sweep").exists()
    agents = dataclasses.replace(grid, agents=["best_of_n"], grid={"best_of_n.n": [4]})
    nested = PipelineConfig(runs_root=str(tmp_path), agents=agents)
    with pytest.raises(ConfigError, match="'n' was renamed to 'samples_per_prompt' in BestOfNConfig"):
        pipeline.run_pipeline(nested, progress=False)  # before the SFT stage
    assert not (tmp_path / "default").exists()
