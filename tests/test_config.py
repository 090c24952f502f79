"""Behavioural tests for :mod:`rlhf_base.config`: precedence, nesting, type checks and the error messages.

The dataclasses below use postponed annotations (``from __future__ import annotations``), as component
authors will, so every test also checks that string annotations are resolved.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import yaml

from rlhf_base.config import ConfigError, config_from_dict, config_to_dict, load_config, save_config


class Schedule(enum.Enum):
    CONSTANT = "constant"
    LINEAR = "linear"


@dataclass
class OptimConfig:
    RENAMED: ClassVar[dict[str, str]] = {"lr": "learning_rate"}  # old key -> new key, for the error

    learning_rate: float = 1e-3  # step size
    betas: tuple[float, float] = (0.9, 0.999)  # Adam moments
    name: Literal["adam", "sgd"] = "adam"  # optimiser
    schedule: Schedule = Schedule.CONSTANT  # learning-rate schedule


@dataclass
class AgentConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)  # nested section
    total_steps: int = 100  # environment steps
    use_kl: bool = True  # add the KL penalty
    beta: float | None = None  # KL coefficient; None = adaptive
    tags: list[str] = field(default_factory=list)  # free labels
    weights: dict[str, float] = field(default_factory=dict)  # reward mixture
    extra: Any = None  # anything goes
    out_dir: Path = Path("runs")  # where runs are written

    @property
    def total_updates(self) -> int:
        return self.total_steps // 10


@dataclass
class TrainConfig:
    agent: AgentConfig = field(default_factory=AgentConfig)  # the agent
    seed: int = 0  # global seed
    # a nested default that differs from OptimConfig(): YAML must merge into it, not into a fresh one
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=5e-4, name="sgd"))
    probe: OptimConfig | None = None  # optional section


@dataclass
class ModelConfig:
    n_embd: int = 64  # width
    n_head: int = 4  # heads; must divide n_embd

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")


@dataclass
class Required:
    name: str  # no default
    size: int = 1


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------------------
# What gets set
# --------------------------------------------------------------------------------------------------------
def test_defaults_without_file_or_overrides():
    assert load_config(TrainConfig) == TrainConfig()


def test_nested_override_by_dotted_key():
    cfg = load_config(TrainConfig, overrides=["agent.optim.learning_rate=3e-5", "agent.total_steps=7"])
    assert cfg.agent.optim.learning_rate == pytest.approx(3e-5)
    assert cfg.agent.total_steps == 7
    assert cfg.agent.optim.betas == (0.9, 0.999)  # siblings keep their defaults
    assert cfg.agent.total_updates == 0  # derived values are properties, recomputed


def test_yaml_then_overrides_precedence(tmp_path):
    path = write(tmp_path, "seed: 1\nagent:\n  total_steps: 50\n  use_kl: false\n")
    cfg = load_config(TrainConfig, path, ["seed=2", "seed=3"])
    assert cfg.seed == 3  # overrides beat the file, later overrides beat earlier ones
    assert cfg.agent.total_steps == 50 and cfg.agent.use_kl is False  # file beats defaults


def test_nested_mappings_merge_and_keep_nondefault_nested_defaults(tmp_path):
    path = write(tmp_path, "critic_optim:\n  betas: [0.5, 0.6]\n")
    cfg = load_config(TrainConfig, path, ["critic_optim={learning_rate: 1.0e-2}"])
    assert cfg.critic_optim == OptimConfig(learning_rate=1e-2, betas=(0.5, 0.6), name="sgd")


def test_value_types_are_parsed_and_converted():
    cfg = load_config(
        TrainConfig,
        overrides=[
            "agent.optim.learning_rate=1",  # int accepted for float, stored as float
            "agent.optim.betas=[0.8, 0.9]",
            "agent.optim.schedule=linear",
            "agent.beta=0.1",
            "agent.tags=[a, b]",
            "agent.weights={x: 1, y: 0.5}",
            "agent.extra={k: [1, 2]}",
            "agent.out_dir=/tmp/run",
            "probe.name=sgd",
        ],
    )
    assert cfg.agent.optim.learning_rate == 1.0 and isinstance(cfg.agent.optim.learning_rate, float)
    assert cfg.agent.optim.betas == (0.8, 0.9)
    assert cfg.agent.optim.schedule is Schedule.LINEAR
    assert cfg.agent.beta == 0.1 and cfg.agent.tags == ["a", "b"]
    assert cfg.agent.weights == {"x": 1.0, "y": 0.5}
    assert cfg.agent.extra == {"k": [1, 2]} and type(cfg.agent.extra) is dict
    assert cfg.agent.out_dir == Path("/tmp/run")
    assert cfg.probe == OptimConfig(name="sgd")  # an Optional section is created from its defaults
    assert load_config(TrainConfig, overrides=["agent.beta=null"]).agent.beta is None


def test_exponent_floats_without_a_dot(tmp_path):
    # PyYAML's YAML 1.1 would read 1e-4 as the string "1e-4"
    path = write(tmp_path, "agent:\n  optim:\n    learning_rate: 1e-4\n    betas: [1.5e1, 2E+1]\n")
    cfg = load_config(TrainConfig, path)
    assert cfg.agent.optim.learning_rate == pytest.approx(1e-4)
    assert cfg.agent.optim.betas == (15.0, 20.0)
    assert load_config(TrainConfig, overrides=["agent.tags=[1e3x]"]).agent.tags == ["1e3x"]  # still a string


def test_empty_file_and_yaml_merge_keys(tmp_path):
    assert load_config(TrainConfig, write(tmp_path, "")) == TrainConfig()
    path = write(tmp_path, "agent:\n  extra: &e {total_steps: 3}\n  <<: *e\n  use_kl: false\n")
    cfg = load_config(TrainConfig, path)
    assert cfg.agent.total_steps == 3 and cfg.agent.use_kl is False


def test_post_init_sees_final_values_only():
    # n_head=3 alone is invalid for n_embd=64; with n_embd=48 in the next override it is fine
    assert load_config(ModelConfig, overrides=["n_head=3", "n_embd=48"]) == ModelConfig(48, 3)


# --------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------
def test_unknown_key_in_file_names_key_path_file_line_and_valid_keys(tmp_path):
    path = write(tmp_path, "seed: 1\nagent:\n  optim:\n    lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, path)
    msg = str(info.value)
    assert "unknown key 'lerning_rate'" in msg
    assert "'agent.optim.lerning_rate'" in msg
    assert f"{path} line 4" in msg
    assert "did you mean 'learning_rate'?" in msg
    assert "valid keys for 'agent.optim' (OptimConfig): learning_rate, betas, name, schedule" in msg


def test_unknown_top_level_key_and_unknown_override():
    with pytest.raises(ConfigError, match=r"unknown key 'sed' in override 'sed=1' \(did you mean 'seed'\?\)"):
        load_config(TrainConfig, overrides=["sed=1"])
    with pytest.raises(ConfigError, match=r"'agent.nope'.*valid keys for 'agent' \(AgentConfig\): optim, "):
        load_config(TrainConfig, overrides=["agent.nope=1"])


def test_renamed_key_names_the_new_key_and_where_in_file_override_and_mapping(tmp_path):
    path = write(tmp_path, "seed: 1\nagent:\n  optim:\n    lr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, path)
    assert str(info.value) == (
        f"'agent.optim.lr' was renamed to 'agent.optim.learning_rate' in OptimConfig: change it in {path} line 4"
    )
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, overrides=["critic_optim.lr=0.1"])
    assert str(info.value) == (
        "'critic_optim.lr' was renamed to 'critic_optim.learning_rate' in OptimConfig: "
        "change it in override 'critic_optim.lr=0.1'"
    )
    with pytest.raises(ConfigError) as info:
        config_from_dict(OptimConfig, {"lr": 0.1}, where="in the caller's dict")
    assert (
        str(info.value)
        == "'lr' was renamed to 'learning_rate' in OptimConfig: change it in the caller's dict"
    )
    # the new name works, and a plain typo still gets the usual "unknown key" error
    assert (
        load_config(TrainConfig, overrides=["agent.optim.learning_rate=0.1"]).agent.optim.learning_rate == 0.1
    )
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        config_from_dict(OptimConfig, {"lrr": 0.1})


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("agent.total_steps=abc", "expected int, got 'abc' (str)"),
        ("agent.total_steps=1.5", "expected int, got 1.5 (float)"),
        ("agent.total_steps=true", "expected int, got True (bool)"),
        ("agent.optim.learning_rate=fast", "expected float, got 'fast' (str)"),
        ("agent.optim.learning_rate=true", "expected float, got True (bool)"),
        ("agent.use_kl=1", "expected bool, got 1 (int); use true or false"),
        ("agent.use_kl='1'", "expected bool, got '1' (str)"),
        ("agent.optim.name=adamw", "expected one of 'adam', 'sgd', got 'adamw' (str); did you mean 'adam'?"),
        ("agent.optim.schedule=cosine", "valid values: 'constant', 'linear'"),
        ("agent.beta=high", "expected float | None, got 'high' (str)"),
        ("agent.tags=[a, 3]", "expected list[str], got ['a', 3] (list); item 1 is 3"),
        ("agent.tags=a", "expected list[str], got 'a' (str)"),
        (
            "agent.optim.betas=[1, 2, 3]",
            "expected tuple[float, float], got [1, 2, 3] (list); needs exactly 2",
        ),
        ("agent.weights={x: big}", "expected dict[str, float]"),
        ("agent.optim=3", "expected a mapping of OptimConfig fields, got 3 (int)"),
    ],
)
def test_wrong_type_names_key_expected_type_and_value(override, expected):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, overrides=[override])
    msg = str(info.value)
    assert f"bad value for '{key}' in override {override!r}" in msg
    assert expected in msg


def test_wrong_type_in_file_names_line(tmp_path):
    path = write(tmp_path, "agent:\n  total_steps: 10\n  use_kl: maybe\n")
    with pytest.raises(
        ConfigError, match=rf"'agent.use_kl' in {re.escape(str(path))} line 3: expected bool, got 'maybe'"
    ):
        load_config(TrainConfig, path)


@pytest.mark.parametrize("override", ["agent.total_steps", "=3", "agent..steps=3", "agent.steps: 3"])
def test_malformed_override_shows_expected_form(override):
    with pytest.raises(
        ConfigError, match=r"malformed override .*expected KEY=VALUE with a dotted KEY, e\.g\."
    ):
        load_config(TrainConfig, overrides=[override])


def test_file_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))} must hold a mapping .*got a list"):
        load_config(TrainConfig, path)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"config file not found: {re.escape(str(path))}"):
        load_config(TrainConfig, path)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "seed: 1\nagent:\n  tags: [a, b\n  use_kl: true\n")
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, path)
    msg = str(info.value)
    assert f"invalid YAML in {path} line 4" in msg and "started at line 3" in msg
    with pytest.raises(ConfigError, match=r"invalid YAML in override 'seed=\[1'"):
        load_config(TrainConfig, overrides=["seed=[1"])


def test_duplicate_key_names_both_lines(tmp_path):
    path = write(tmp_path, "seed: 1\nagent: {}\nseed: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, path)
    assert f"duplicate key 'seed' in {path} line 3 (first set in {path} line 1)" in str(info.value)


def test_post_init_error_is_a_config_error_naming_the_source():
    with pytest.raises(
        ConfigError, match=r"invalid config for ModelConfig \(values set in override 'n_head=3'\)"
    ):
        load_config(ModelConfig, overrides=["n_head=3"])


def test_missing_required_field_and_non_dataclass():
    with pytest.raises(ConfigError, match=r"missing required key\(s\) for Required: name"):
        load_config(Required)
    assert load_config(Required, overrides=["name=x"]) == Required("x")
    with pytest.raises(TypeError, match="dataclass type"):
        load_config(dict)


# --------------------------------------------------------------------------------------------------------
# Writing back
# --------------------------------------------------------------------------------------------------------
def test_config_to_dict_is_plain_and_save_config_round_trips(tmp_path):
    cfg = load_config(
        TrainConfig, overrides=["agent.optim.schedule=linear", "agent.extra={a: [1]}", "probe={}"]
    )
    data = config_to_dict(cfg)
    assert data["agent"]["optim"] == {
        "learning_rate": 1e-3,
        "betas": [0.9, 0.999],
        "name": "adam",
        "schedule": "linear",
    }
    assert data["agent"]["out_dir"] == "runs" and "total_updates" not in data["agent"]  # no properties
    yaml.safe_dump(data)  # only plain types: safe_dump would refuse anything else

    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(TrainConfig, path) == cfg
    assert not [p for p in path.parent.iterdir() if p != path]  # no temp file left behind
    assert dataclasses.is_dataclass(cfg)


@pytest.mark.parametrize("override", ["learning_rate=.nan", "max_grad_norm=.inf", "ema_decay=-.inf"])
def test_non_finite_settings_are_refused_naming_the_key(override):
    from agents.reinforce import ReinforceAgent

    key = override.partition("=")[0]
    with pytest.raises(
        ConfigError, match=rf"bad value for '{key}' in override '{re.escape(override)}'.*NaN or infinity"
    ):
        load_config(ReinforceAgent.Config, None, [override])


def test_non_finite_values_inside_lists_are_refused_too():
    from rlhf_gym.sweep import SweepConfig

    with pytest.raises(ConfigError, match=r"bad value for 'betas'.*\[0\.1, nan\] holds a NaN"):
        load_config(SweepConfig, None, ["betas=[0.1, .nan]"])
