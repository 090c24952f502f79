"""A user's own reward, task, prompts and agent wherever the built-ins go: Python, YAML, the CLI and sweeps.

The plugin package is real: a folder on PYTHONPATH with a `*.dist-info` holding `entry_points.txt`, which
`importlib.metadata` reads exactly as it reads a pip-installed package's, so the sweep's spawned workers
find the agent the way they would find an installed one. Its agent is the README's example, as written.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

import text_env
from agents.registry import CONTRACT, get_agent_class
from rlhf_base.config import load_config
from rlhf_base.plugins import PluginError, is_import_spec, load_object
from rlhf_gym.sweep import (
    FAILURES,
    CellsFailed,
    SweepConfig,
    cell_configs,
    expand_cells,
    run_sweep,
    sweep_notes,
)
from text_env.config import EnvConfig
from text_env.rewards import resolve_reward
from text_env.tasks import get_task, load_prompts

ROOT = Path(__file__).resolve().parents[1]
TINY_ENV = {"num_envs": 4, "max_new_tokens": 6}

USER_MODULE = """
import math
from text_env.tasks import Task

PROMPTS = ["my cat", "the weather today", "a short story"]

def prompts():
    return ["hello there", "my cat"]

def brevity(prompts, responses):
    return [-len(r.split()) / 4 for r in responses]

def one_arg(prompts):
    return [0.0]

def nan_on_second(prompts, responses):
    return [math.nan if i == 1 else 0.0 for i in range(len(responses))]

def too_few(prompts, responses):
    return [0.0]

def words(prompts, responses):
    return ["many"] * len(responses)

class Scorer:
    def score(self, prompts, responses):
        return [1.0] * len(responses)

class NeedsPath:
    def __init__(self, path):
        self.path = path
    def __call__(self, prompts, responses):
        return [0.0] * len(responses)

def task():
    return Task("greetings", tuple(PROMPTS), gold_reward=lambda p, r: [len(x) / 10 for x in r])

NOT_A_TASK = 3
"""


def readme_agent() -> str:
    """The README's example agent, between its markers."""
    text = (ROOT / "README.md").read_text()
    block = re.search(
        r"<!-- example-agent: start -->\n```python\n(.*?)```\n<!-- example-agent: end -->", text, re.S
    )
    assert block, "the README's example agent block (with its markers) is missing"
    return block.group(1)


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_rlhf.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_rlhf", None)
    yield "user_rlhf"
    sys.modules.pop("user_rlhf", None)


# --------------------------------------------------------------------------------------------------------
# Naming a Python object
# --------------------------------------------------------------------------------------------------------
def test_import_specs_and_their_errors(user_module, tmp_path):
    assert load_object("user_rlhf:brevity", "x")([""], ["a b c d"]) == [-1.0]
    assert (
        is_import_spec("user_rlhf:brevity") and not is_import_spec("runs/rm") and not is_import_spec("a:b:c")
    )
    (tmp_path / "a:b").mkdir()
    os.chdir(tmp_path)  # an existing path wins over the module:attr reading
    assert not is_import_spec("a:b")
    with pytest.raises(
        PluginError, match=r"env.reward_model: no module named 'nope_pkg' \(from 'nope_pkg.mod:f'\)"
    ):
        load_object("nope_pkg.mod:f", "env.reward_model")
    with pytest.raises(PluginError, match=r"'user_rlhf' has no attribute 'brevty'.*it has: \[.*'brevity'"):
        load_object("user_rlhf:brevty", "env.reward_model")
    (tmp_path / "broken_mod.py").write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(PluginError, match=r"importing 'broken_mod' .*failed: RuntimeError: boom at import"):
        load_object("broken_mod:f", "env.task")


def test_rewards_by_name_and_bad_rewards(user_module):
    assert resolve_reward("user_rlhf:brevity")(["p"], ["a b"]) == [-0.5]
    assert resolve_reward("user_rlhf:Scorer").score(["p"], ["a"]) == [1.0]  # a class is built, no arguments
    with pytest.raises(PluginError, match=r"one_arg\(prompts\) cannot be called as \(prompts, responses\)"):
        resolve_reward("user_rlhf:one_arg")
    with pytest.raises(PluginError, match=r"class 'user_rlhf:NeedsPath' cannot be built with no arguments"):
        resolve_reward("user_rlhf:NeedsPath")
    with pytest.raises(PluginError, match=r"a int is no reward"):
        resolve_reward("user_rlhf:NOT_A_TASK")
    with pytest.raises(FileNotFoundError, match=r"no reward model at runs/missing"):
        resolve_reward("runs/missing")


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "nan_on_second",
            r"reward_model user_rlhf:nan_on_second returned \d+ non-finite score\(s\) of 4 \(row 1: nan",
        ),
        ("too_few", r"reward_model user_rlhf:too_few returned scores of shape \(1,\); expected \(4,\)"),
        ("words", r"reward_model user_rlhf:words returned list that is not a sequence of numbers"),
    ],
)
def test_a_reward_that_returns_bad_scores_is_refused_naming_it(user_module, name, message):
    envs = EnvConfig(**TINY_ENV, reward_model=f"user_rlhf:{name}").make()
    with pytest.raises(ValueError, match=message):
        text_env.rollout(envs, seed=0)


# --------------------------------------------------------------------------------------------------------
# Tasks, prompts and gold
# --------------------------------------------------------------------------------------------------------
def test_tasks_and_prompt_sources_by_name(user_module, tmp_path):
    task = get_task("user_rlhf:task")
    assert task.name == "greetings" and task.prompts[0] == "my cat" and task.gold_reward is not None
    with pytest.raises(
        PluginError, match=r"task 'user_rlhf:NOT_A_TASK' is a int; expected a text_env.tasks.Task"
    ):
        get_task("user_rlhf:NOT_A_TASK")
    with pytest.raises(ValueError, match=r"unknown task 'reveiws'"):
        get_task("reveiws")
    assert load_prompts("user_rlhf:PROMPTS") == ("my cat", "the weather today", "a short story")
    assert load_prompts("user_rlhf:prompts") == ("hello there", "my cat")  # a function is called
    import datasets

    saved = tmp_path / "saved_prompts"
    datasets.Dataset.from_dict({"prompt": ["one two", "three"]}).save_to_disk(str(saved))
    assert load_prompts(str(saved)) == ("one two", "three")
    files = tmp_path / "hub_like"
    files.mkdir()
    (files / "train.jsonl").write_text('{"prompt": "from a dataset"}\n')
    assert load_prompts(f"hf:{files}") == ("from a dataset",)  # datasets.load_dataset, offline on a folder


def test_gold_runs_only_where_the_task_has_one(user_module):
    def gold_of(**kwargs) -> np.ndarray:
        return text_env.rollout(EnvConfig(**TINY_ENV, **kwargs).make(), seed=0).gold_scores.numpy()

    own = {"prompts": "user_rlhf:PROMPTS", "reward_model": "user_rlhf:brevity"}
    assert np.isnan(gold_of(**own)).all(), "the reviews gold does not judge the user's prompts"
    assert np.isfinite(gold_of(**own, gold_reward="task")).all()
    assert np.isnan(gold_of(gold_reward="none")).all()
    assert np.isfinite(gold_of(**own, gold_reward="user_rlhf:Scorer")).all()
    assert np.isfinite(gold_of(task="user_rlhf:task", reward_model="user_rlhf:brevity")).all()
    assert np.isfinite(gold_of(prompts="user_rlhf:PROMPTS")).all(), (
        "with no reward model of one's own, the task's gold is the reward and still logged"
    )


# --------------------------------------------------------------------------------------------------------
# The agent contract
# --------------------------------------------------------------------------------------------------------
def test_the_readme_agent_is_short_and_meets_the_contract(tmp_path, monkeypatch):
    source = readme_agent()
    assert len(source.strip().splitlines()) < 60
    (tmp_path / "readme_agent.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    agent_cls = get_agent_class("readme_agent:MeanBaselinePG")
    from agents import make_agent

    envs = EnvConfig(**TINY_ENV).make()
    agent = make_agent("readme_agent:MeanBaselinePG", envs, {"iterations": 2, "learning_rate": 1e-3})
    before = [p.detach().clone() for p in envs.policy.parameters()]
    history = agent.learn()
    assert isinstance(agent, agent_cls) and [row["iteration"] for row in history] == [1.0, 2.0]
    assert {"rm_score", "gold_score", "kl", "loss"} <= set(history[0]) and math.isfinite(history[-1]["loss"])
    assert any(not (a == b).all() for a, b in zip(before, envs.policy.parameters(), strict=True))


def test_an_agent_missing_a_piece_is_refused_with_the_contract(tmp_path, monkeypatch):
    (tmp_path / "half_agent.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass

            class NoEvaluate:
                @dataclass
                class Config:
                    iterations: int = 1
                def __init__(self, envs, config): ...
                def learn(self, iterations=None, callback=None): return []
                def save(self, path): ...

            class NoConfig:
                pass
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match=r"agent 'half_agent:NoEvaluate' cannot run: it has no evaluate\(\)"):
        get_agent_class("half_agent:NoEvaluate")
    with pytest.raises(
        TypeError, match=r"no `Config` dataclass attribute; it has no learn\(\), evaluate\(\), save\(\)"
    ):
        get_agent_class("half_agent:NoConfig")
    assert "__init__(self, envs, config)" in CONTRACT
    with pytest.raises(ValueError, match=r"unknown agent 'reinfroce'; did you mean 'reinforce'\?"):
        get_agent_class("reinfroce")
    # A sweep checks the contract before any cell runs.
    config = SweepConfig(agents=["reinforce", "half_agent:NoEvaluate"], seeds=[0], runs_root=str(tmp_path))
    with pytest.raises(ValueError, match=r"half_agent:NoEvaluate.*no evaluate\(\)"):
        run_sweep(config, progress=False)
    assert not (tmp_path / "sweep" / "results.csv").exists()


def test_the_sweep_sets_only_fields_an_agent_declares(tmp_path, monkeypatch):
    (tmp_path / "noseed.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass

            class NoSeed:
                @dataclass
                class Config:
                    iterations: int = 1
                def __init__(self, envs, config): ...
                def learn(self, iterations=None, callback=None): return []
                def evaluate(self, num_episodes=256, seed=0): return {}
                def save(self, path): ...
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = SweepConfig(
        agents=["noseed:NoSeed", "reinforce"], seeds=[0, 1], overrides=["agent.iterations=3"]
    )
    cells = expand_cells(config)
    _, _, cfg = cell_configs(cells[1], config)  # no "unknown key seed" about an override never written
    assert cfg.iterations == 3 and not hasattr(cfg, "seed")
    _, _, reinforce_cfg = cell_configs(cells[-1], config)
    assert reinforce_cfg.seed == 1
    (note,) = sweep_notes(config)
    assert note.startswith("agent 'noseed:NoSeed' declares no `seed` config field")


def test_a_failing_cell_is_recorded_and_the_others_go_on(tmp_path, monkeypatch):
    (tmp_path / "flaky.py").write_text(
        textwrap.dedent(
            """
            import os
            from agents.best_of_n import BestOfNAgent

            class Flaky(BestOfNAgent):
                def learn(self, iterations=None, callback=None):
                    if os.environ.get("FLAKY_FAIL") and self.config.seed == 1:
                        raise RuntimeError("cell blew up on purpose")
                    return super().learn(iterations, callback)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FLAKY_FAIL", "1")
    config = SweepConfig(
        name="flaky", runs_root=str(tmp_path / "runs"), agents=["flaky:Flaky"], seeds=[0, 1, 2], workers=1,
        env=EnvConfig(**TINY_ENV), eval_episodes=4,
        overrides=["agent.iterations=1", "agent.samples_per_prompt=2", "agent.prompts_per_iteration=2"],
    )  # fmt: skip
    with pytest.raises(CellsFailed, match=r"1 sweep cell\(s\) failed .*failures.jsonl") as caught:
        run_sweep(config, progress=False)
    run_dir = caught.value.run_dir
    with open(run_dir / "results.csv", newline="") as f:
        assert sorted(row["seed"] for row in csv.DictReader(f)) == ["0", "2"], "the other cells finished"
    (failure,) = [json.loads(line) for line in (run_dir / FAILURES).read_text().splitlines()]
    assert failure["seed"] == 1 and failure["error"] == "RuntimeError: cell blew up on purpose"
    assert "Traceback" in failure["traceback"] and failure["cell"] == caught.value.cells[0]
    monkeypatch.delenv("FLAKY_FAIL")
    lines = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    run_sweep(config, progress=True)  # the rerun retries only the failed cell
    assert any("3 cells, 2 done, 1 to run" in line for line in lines)
    assert not (run_dir / FAILURES).exists()
    with open(run_dir / "results.csv", newline="") as f:
        assert sorted(row["seed"] for row in csv.DictReader(f)) == ["0", "1", "2"]


# --------------------------------------------------------------------------------------------------------
# The whole path: a plugin package, YAML alone, the CLI, spawned workers
# --------------------------------------------------------------------------------------------------------
def _plugin_package(root: Path) -> None:
    package = root / "my_rlhf"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "agent.py").write_text(readme_agent())
    (package / "rewards.py").write_text(
        "def brevity(prompts, responses):\n    return [-len(r.split()) / 4 for r in responses]\n"
    )
    (package / "prompts.py").write_text('PROMPTS = ["my cat", "the weather today", "a short story"]\n')
    dist = root / "my_rlhf-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rlhf\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rlhf_gym.agents]\nmean_pg = my_rlhf.agent:MeanBaselinePG\n")


def test_a_users_agent_reward_and_prompts_in_a_sweep_from_yaml_alone(tmp_path):
    plugins = tmp_path / "site"
    plugins.mkdir()
    _plugin_package(plugins)
    sweep_yaml = tmp_path / "my_sweep.yaml"
    sweep_yaml.write_text(
        yaml.safe_dump(
            {
                "name": "mine",
                "runs_root": str(tmp_path / "runs"),
                "agents": ["reinforce", "mean_pg"],
                "seeds": [0],
                "workers": 2,
                "eval_episodes": 4,
                "env": {
                    **TINY_ENV,
                    "reward_model": "my_rlhf.rewards:brevity",
                    "prompts": "my_rlhf.prompts:PROMPTS",
                },
                "overrides": [
                    "agent.iterations=2",
                    "mean_pg.learning_rate=1e-4",
                    "reinforce.samples_per_prompt=2",
                ],
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugins), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-m", "rlhf_gym.cli", "sweep", "--config", str(sweep_yaml), "--report"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "mine"
    with open(run_dir / "results.csv", newline="") as f:
        rows = {row["agent"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"reinforce", "mean_pg"}
    for row in rows.values():
        assert (
            math.isfinite(float(row["rm_score"])) and float(row["rm_score"]) <= 0
        )  # brevity: minus words / 4
        assert row["gold_score"] in ("", "nan"), "no gold for the user's prompts and reward"
    assert load_config(SweepConfig, run_dir / "sweep.yaml").env.reward_model == "my_rlhf.rewards:brevity"
    assert "no gold reward in this sweep" in (run_dir / "report.md").read_text().lower()


def test_the_rollout_command_takes_any_env_setting(user_module, capsys):
    from rlhf_gym.cli import main

    code = main(["rollout", "--num-envs", "4", "--max-new-tokens", "6", "--show", "1",
                 "reward_model=user_rlhf:brevity", "prompts=user_rlhf:PROMPTS"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "reward user_rlhf:brevity" in out and "3 prompts" in out and "gold (no gold)" in out


def test_train_with_a_bad_reward_loses_nothing_already_written(user_module, tmp_path):
    from rlhf_gym.train import train

    run_dir = tmp_path / "run"
    train("best_of_n", run_dir, overrides=["iterations=1", "samples_per_prompt=2", "prompts_per_iteration=2",
                                          "env.num_envs=4", "env.max_new_tokens=6"], progress=False)  # fmt: skip
    written = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    with pytest.raises(PluginError, match=r"one_arg\(prompts\) cannot be called"):
        train("best_of_n", run_dir, overrides=["env.reward_model=user_rlhf:one_arg"], progress=False)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == written
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == checkpoints
