"""Every number of every config has a declared valid range, checked at load and at construction (issue 16).

The mechanism (`rlhf_base.ranges`) is tested on small dataclasses first; then every config dataclass of the
project, found by scanning the source, is checked to declare a range for each numeric field, and every
field is given values below its range, above it, of the wrong type and NaN, in Python and as a command-line
override, expecting an error that names the key, the value and the range. Last, the cases a hostile tester
reported, through the `rlhf-gym train` and `sweep` commands: one line, exit 2, before any model loads.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from rlhf_base.config import ConfigError, config_from_dict, load_config
from rlhf_base.ranges import SEED, Range, check_ranges, declared_ranges, numeric_fields, range_text

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------
# The mechanism
# --------------------------------------------------------------------------------------------------------
@dataclass
class Inner:
    RANGES: ClassVar[dict[str, Range]] = {"rate": Range(gt=0, le=1)}

    rate: float = 0.5  # a share

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class Outer:
    RANGES: ClassVar[dict[str, Range]] = {
        "steps": Range(ge=1),
        "size": Range(ge=1),
        "betas": Range(ge=0),
        "shift": Range.any("an offset: any sign means something"),
        "ceiling": Range(gt=0),
    }
    NON_FINITE_OK: ClassVar[tuple[str, ...]] = ("ceiling",)

    steps: int = 10  # int
    size: int | None = None  # optional
    betas: list[float] = field(default_factory=lambda: [0.1])  # each item checked
    shift: float = 0.0  # any finite value
    ceiling: float = math.inf  # infinity allowed
    inner: Inner = field(default_factory=Inner)  # nested

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class Child(Outer):
    RANGES: ClassVar[dict[str, Range]] = {"extra": Range(lt=5)}

    extra: int = 0  # the subclass's own field


@dataclass
class Plugin:
    """A user's config: no RANGES, so only types are checked, as before."""

    rate: float = 0.1
    steps: int = 3


def test_range_text_and_conditions():
    assert Range(gt=0).interval() == "(0, inf)" and Range(gt=0).condition() == "> 0"
    assert (
        Range(ge=0, lt=0.5).interval() == "[0, 0.5)" and Range(ge=0, lt=0.5).condition() == ">= 0 and < 0.5"
    )
    assert Range(le=1).interval() == "(-inf, 1]"
    assert SEED.interval() == "[0, 4294967296)"
    assert range_text(Outer, "size") == "[1, inf), or None"
    assert range_text(Outer, "shift") == "any finite number: an offset: any sign means something"
    assert range_text(Plugin, "rate") is None


def test_a_range_needs_one_bound_per_side_or_a_reason():
    with pytest.raises(TypeError, match="one lower bound"):
        Range(gt=0, ge=0)
    with pytest.raises(TypeError, match="needs a reason"):
        Range()


def test_construction_checks_each_declared_field():
    for kwargs, message in [
        ({"steps": 0}, "Outer.steps = 0: must be >= 1 (valid range [1, inf))"),
        ({"steps": 2.5}, "Outer.steps = 2.5: must be an int (valid range [1, inf))"),
        ({"steps": True}, "Outer.steps = True: must be an int (valid range [1, inf))"),
        ({"size": 0}, "Outer.size = 0: must be >= 1 (valid range [1, inf), or None)"),
        ({"betas": [0.1, -1.0]}, "Outer.betas[1] = -1.0: must be >= 0 (valid range [0, inf))"),
        ({"betas": 0.1}, "Outer.betas = 0.1: must be a list of floats (valid range [0, inf))"),
        ({"shift": math.nan}, "Outer.shift = nan: must be a finite number"),
        ({"ceiling": -math.inf}, "Outer.ceiling = -inf: must be > 0 (valid range (0, inf))"),
    ]:
        with pytest.raises(ConfigError) as info:
            Outer(**kwargs)
        assert str(info.value).startswith(message), (kwargs, str(info.value))
    assert Outer(size=None, ceiling=math.inf, shift=-3.0, steps=1).steps == 1  # the edges are valid
    with pytest.raises(ConfigError, match=r"Inner\.rate = 0: must be > 0 and <= 1 \(valid range \(0, 1\]\)"):
        Inner(rate=0)


def test_a_subclass_adds_to_its_bases_ranges():
    assert set(declared_ranges(Child)) == {"steps", "size", "betas", "shift", "ceiling", "extra"}
    with pytest.raises(ConfigError, match=r"Child\.extra = 5: must be < 5"):
        Child(extra=5)
    with pytest.raises(ConfigError, match=r"Child\.steps = 0: must be >= 1"):
        Child(steps=0)


def test_the_loader_names_the_key_the_value_the_place_and_the_range(tmp_path):
    path = tmp_path / "outer.yaml"
    path.write_text("steps: 3\ninner:\n  rate: 1.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(Outer, path)
    assert str(info.value) == (
        f"Inner.rate = 1.5 at 'inner.rate' in {path} line 3: must be > 0 and <= 1 (valid range (0, 1])"
    )
    with pytest.raises(ConfigError) as info:
        load_config(Outer, None, ["steps=0"])
    assert str(info.value) == "Outer.steps = 0 in override 'steps=0': must be >= 1 (valid range [1, inf))"
    with pytest.raises(ConfigError) as info:
        load_config(Outer, None, ["steps=many"])
    assert str(info.value) == (
        "bad value for 'steps' in override 'steps=many': expected int, got 'many' (str); valid range [1, inf)"
    )
    with pytest.raises(ConfigError, match=r"Outer\.betas\[0\] = -0\.5 in the caller's dict: must be >= 0"):
        config_from_dict(Outer, {"betas": [-0.5]}, where="in the caller's dict")
    assert load_config(Outer, None, ["ceiling=.inf", "size=null"]).ceiling == math.inf  # NON_FINITE_OK


def test_a_config_without_ranges_keeps_working():
    assert load_config(Plugin, None, ["rate=-5", "steps=-1"]) == Plugin(rate=-5.0, steps=-1)
    check_ranges(Plugin())  # nothing declared, nothing checked
    assert declared_ranges(Plugin) == {} and numeric_fields(Plugin) == ["rate", "steps"]


def test_a_range_for_a_field_that_is_not_a_number_is_the_authors_error():
    @dataclass
    class Wrong:
        RANGES: ClassVar[dict[str, Range]] = {"name": Range(ge=0)}

        name: str = "x"

    with pytest.raises(TypeError, match="Wrong.RANGES names 'name', which is not a numeric field"):
        check_ranges(Wrong())


# --------------------------------------------------------------------------------------------------------
# Every config of the project
# --------------------------------------------------------------------------------------------------------
#: The project's config dataclasses besides the agents' (found through the registry): stages, env, sampler.
STAGE_CONFIGS = {
    "text_env.config": "EnvConfig",
    "text_env.sampling": "SamplingOptions",
    "text_env.speed": "SpeedOptions",
    "text_env.tasks.reviews.model": "TinyConfig",
    "text_env.tasks.reviews.pretrain": "PretrainConfig",
    "reward_models.train": "RewardTrainConfig",
    "rlhf_gym.label": "LabelConfig",
    "rlhf_gym.sft": "SFTConfig",
    "rlhf_gym.sweep": "SweepConfig",
    "rlhf_gym.pipeline": "PipelineConfig",
    "rlhf_gym.rm_scaling": "RMScalingConfig",
    "rlhf_base.lora": "LoraConfig",
}
PACKAGES = ("agents", "text_env", "reward_models", "rlhf_gym", "rlhf_base")


def _is_dataclass_decorator(node: ast.expr) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    return (isinstance(target, ast.Name) and target.id == "dataclass") or (
        isinstance(target, ast.Attribute) and target.attr == "dataclass"
    )


def scanned_configs() -> set[tuple[str, str]]:
    """(module, class) of every dataclass named *Config or *Options in the project's packages' source."""
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (
                    isinstance(node, ast.ClassDef)
                    and node.name.endswith(("Config", "Options"))
                    and any(_is_dataclass_decorator(d) for d in node.decorator_list)
                ):
                    found.add((module, node.name))
    return found


def agent_configs() -> dict[tuple[str, str], type]:
    """The built-in agents' Config classes, through the registry."""
    from agents.registry import available, get_agent_class

    configs = {}
    for name in available():
        config_cls = get_agent_class(name).Config
        if config_cls.__module__.partition(".")[0] in PACKAGES:  # not an installed plugin's
            configs[(config_cls.__module__, config_cls.__name__)] = config_cls
    return configs


def project_configs() -> dict[tuple[str, str], type]:
    import importlib

    configs = agent_configs()
    for module, name in STAGE_CONFIGS.items():
        configs[(module, name)] = getattr(importlib.import_module(module), name)
    return configs


def test_the_list_of_configs_is_complete():
    """A new config dataclass must join the checks below: it is either an agent's or listed here."""
    import importlib

    listed = set(project_configs())
    scanned = scanned_configs()
    # a base class an agent's Config extends (SB3Config) is checked through its subclasses
    bases = {
        (c.__module__, c.__name__)
        for cls in project_configs().values()
        for c in cls.__mro__[1:]
        if c is not object
    }
    assert scanned - listed - bases == set(), "config dataclasses missing from STAGE_CONFIGS"
    assert listed <= scanned
    for module, name in scanned - listed:
        assert dataclasses.is_dataclass(getattr(importlib.import_module(module), name))


@pytest.mark.parametrize("key", sorted(project_configs()), ids=lambda key: key[1])
def test_every_numeric_field_declares_its_range(key):
    config_cls = project_configs()[key]
    missing = [name for name in numeric_fields(config_cls) if name not in declared_ranges(config_cls)]
    assert missing == [], f"{config_cls.__name__}: numeric fields without a RANGES entry: {missing}"
    config_cls()  # the defaults lie in their ranges


def _bad_values(declared: Range, kind: type) -> list[Any]:
    """Values outside `declared`: at or past each bound, a string, NaN, and a float for an int."""
    bad: list[Any] = ["abc", math.nan if kind is float else 1.5]
    if declared.gt is not None:
        bad.append(kind(declared.gt) if kind is float else math.floor(declared.gt))
    if declared.ge is not None:
        bad.append(declared.ge - 1 if kind is int else float(declared.ge) - 0.5)
    if declared.lt is not None:
        bad.append(kind(declared.lt) if kind is float else math.ceil(declared.lt))
    if declared.le is not None:
        bad.append(declared.le + 1 if kind is int else float(declared.le) + 0.5)
    return bad


def _cases() -> list[tuple[type, str, Any, bool]]:
    from rlhf_base.ranges import _shapes

    cases = []
    for config_cls in project_configs().values():
        for name, declared in declared_ranges(config_cls).items():
            shape = _shapes(config_cls)[name]
            for value in _bad_values(declared, shape.kind):
                cases.append((config_cls, name, value, shape.sequence))
    return cases


def _text(value: Any) -> str:
    """`value` as typed in an override."""
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    return value if isinstance(value, str) else repr(value)


@pytest.mark.parametrize(
    ("config_cls", "name", "value", "sequence"),
    _cases(),
    ids=lambda x: x.__name__ if isinstance(x, type) else _text(x) if not isinstance(x, bool) else "",
)
def test_every_out_of_range_value_is_refused_naming_key_value_and_range(config_cls, name, value, sequence):
    valid = range_text(config_cls, name)
    given = [value] if sequence else value
    subject = f"{config_cls.__name__}.{name}" + ("[0]" if sequence else "") + f" = {value!r}"

    with pytest.raises(ConfigError) as info:  # in Python
        config_cls(**{name: given})
    message = str(info.value)
    assert message.startswith(subject + ": must be ") and f"(valid range {valid})" in message, message

    override = f"{name}=[{_text(value)}]" if sequence else f"{name}={_text(value)}"
    with pytest.raises(ConfigError) as info:  # from a command line
        load_config(config_cls, None, [override])
    message = str(info.value)
    assert f"override {override!r}" in message and valid in message and name in message, message
    assert _text(value) in message or repr(value) in message, message


# --------------------------------------------------------------------------------------------------------
# The reported cases, through the commands: one line, exit 2, before any model loads
# --------------------------------------------------------------------------------------------------------
@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if anything builds an env (which loads pi_ref and the reward model)."""
    from text_env.config import EnvConfig

    def make(self):
        raise AssertionError("an env was built: the config should have been refused before")

    monkeypatch.setattr(EnvConfig, "make", make)


@pytest.mark.parametrize(
    ("agent", "override", "says"),
    [
        ("reinforce", "max_grad_norm=-1", "ReinforceConfig.max_grad_norm = -1.0 in override 'max_grad_norm=-1': "
         "must be > 0 (valid range (0, inf))"),
        ("reinforce", "ema_decay=7", "ReinforceConfig.ema_decay = 7.0 in override 'ema_decay=7': "
         "must be >= 0 and <= 1 (valid range [0, 1])"),
        ("reinforce", "iterations=0", "ReinforceConfig.iterations = 0 in override 'iterations=0': "
         "must be >= 1 (valid range [1, inf))"),
        ("ppo", "env.temperature=0", "EnvConfig.temperature = 0.0 in override 'temperature=0': "
         "must be > 0 (valid range (0, inf))"),
        ("ppo", "env.temperature=-1", "EnvConfig.temperature = -1.0 in override 'temperature=-1': "
         "must be > 0 (valid range (0, inf))"),
        ("ppo", "env.beta=-0.1", "EnvConfig.beta = -0.1 in override 'beta=-0.1': must be >= 0 (valid range [0, inf))"),
        ("raft", "temperature=0", "RAFTConfig.temperature = 0.0 in override 'temperature=0': "
         "must be > 0 (valid range (0, inf), or None)"),
        ("grpo", "samples_per_prompt=3", "num_envs=64 is not divisible by samples_per_prompt=3"),
        ("reinforce", "samples_per_prompt=5", "num_envs=64 is not divisible by samples_per_prompt=5"),
        ("online_dpo", "env.num_envs=5", "online_dpo samples two responses per prompt, so num_envs must be even, got 5"),
    ],
)  # fmt: skip
def test_train_refuses_a_bad_value_in_one_line_before_any_model_loads(
    tmp_path, capsys, no_model, agent, override, says
):
    from rlhf_gym import cli

    run_dir = tmp_path / "run"
    assert cli.main(["train", "--agent", agent, "--run-dir", str(run_dir), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rlhf-gym train: error: {says}") and err.count("\n") == 1, err
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("betas=[0.05,-0.1]", "SweepConfig.betas[1] = -0.1 in override 'betas=[0.05,-0.1]': must be >= 0"),
        ("eval_episodes=0", "SweepConfig.eval_episodes = 0 in override 'eval_episodes=0': must be >= 1"),
        ("env.num_envs=0", "EnvConfig.num_envs = 0 at 'env.num_envs' in override 'env.num_envs=0': must be >= 1"),
        ("seeds=[-1]", "SweepConfig.seeds[0] = -1 in override 'seeds=[-1]': must be >= 0 and < 4294967296"),
        ("overrides=[agent.max_grad_norm=-1]", "PPOConfig.max_grad_norm = -1.0 in override "
         "'max_grad_norm=-1': must be > 0 (valid range (0, inf))"),
        ("grid={reinforce.samples_per_prompt: [4, 3]}", "num_envs=64 is not divisible by samples_per_prompt=3"),
        ("grid={env.temperature: [1.0, 0.0]}", "EnvConfig.temperature = 0.0 in the sweep's env overrides: must be > 0"),
    ],
)  # fmt: skip
def test_sweep_refuses_a_bad_value_in_one_line_before_any_cell_runs(
    tmp_path, capsys, no_model, override, says
):
    from rlhf_gym import cli

    argv = ["sweep", f"runs_root={tmp_path}", "agents=[ppo,reinforce]", override]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf-gym sweep: error: ") and says in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir()), "nothing may run (or be written) before the grid is checked"


def test_the_sweep_workers_option_is_checked_too(tmp_path, capsys, no_model):
    from rlhf_gym import cli

    assert cli.main(["sweep", f"runs_root={tmp_path}", "--workers", "0"]) == 2
    assert "SweepConfig.workers = 0: must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"temperature": 0.0}, "SamplingOptions.temperature = 0.0: must be > 0 (valid range (0, inf))"),
        ({"temperature": -1.0}, "SamplingOptions.temperature = -1.0: must be > 0 (valid range (0, inf))"),
        ({"top_p": 0.0}, "SamplingOptions.top_p = 0.0: must be > 0 and <= 1 (valid range (0, 1])"),
        ({"top_p": 1.5}, "SamplingOptions.top_p = 1.5: must be > 0 and <= 1 (valid range (0, 1])"),
        ({"top_k": -1}, "SamplingOptions.top_k = -1: must be >= 0 (valid range [0, inf))"),
    ],
)
def test_the_samplers_arguments_are_refused_before_a_token_is_drawn(core, options, says):
    import text_env

    envs = text_env.TextGenVectorEnv(num_envs=2, core=core)
    with pytest.raises(ConfigError) as info:
        text_env.rollout(envs, **options)
    assert str(info.value) == says
