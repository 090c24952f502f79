"""The agent registry: built-in names, a user's agent registered in code, and one from an entry point."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import textwrap
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

import agents
import text_env
from agents.base import METRIC_KEYS, act_with_policy, evaluate_policy, rollout_metrics
from agents.registry import resolve_config
from rlhf_base.config import ConfigError


@dataclasses.dataclass
class SampleOnlyConfig:
    iterations: int = 2  # rollouts per learn() call
    seed: int = 0  # sampling seed


class SampleOnlyAgent:
    """A user's agent: it only samples, but it reports the shared metrics like any built-in agent."""

    name = "sample_only"
    Config = SampleOnlyConfig

    def __init__(self, envs, config):
        self.envs, self.config, self.history = envs, config, []

    def learn(self, iterations=None, callback=None):
        start, tokens, out = time.perf_counter(), 0, []
        gen = torch.Generator().manual_seed(self.config.seed)
        for it in range(1, (iterations or self.config.iterations) + 1):
            batch = text_env.rollout(self.envs, generator=gen)
            tokens += batch.num_tokens
            out.append(rollout_metrics(batch, it, time.perf_counter() - start, tokens))
        self.history += out
        return out

    def act(self, obs):
        return act_with_policy(self.envs.policy, obs)

    def evaluate(self, num_episodes=256, seed=0):
        return evaluate_policy(self.envs, num_episodes, seed)

    def save(self, path): ...

    def load(self, path): ...


@pytest.fixture()
def envs(core):
    return text_env.TextGenVectorEnv(num_envs=8, core=core)


def test_builtin_agents_are_available():
    assert {"ppo", "reinforce", "best_of_n", "raft", "sb3_ppo", "sb3_a2c"} <= set(agents.available())


def test_unknown_agent_lists_the_available_ones(envs):
    with pytest.raises(ValueError, match=r"unknown agent 'dqn'; available agents: \[.*'ppo'.*\]"):
        agents.make_agent("dqn", envs)


def test_user_agent_registered_in_code_runs_with_the_shared_metrics(envs):
    agents.register_agent("sample_only", SampleOnlyAgent, overwrite=True)
    agent = agents.make_agent("sample_only", envs, {"iterations": 2})
    assert isinstance(agent, agents.Agent)
    history = agent.learn()
    assert len(history) == 2 and set(METRIC_KEYS) <= set(history[-1])
    assert history[-1]["tokens"] > history[0]["tokens"] > 0
    assert np.isfinite(history[-1]["gold_score"])
    obs, _ = envs.reset(seed=0)
    assert agent.act(obs).shape == (8,)
    with pytest.raises(ValueError, match="already registered"):
        agents.register_agent("sample_only", SampleOnlyAgent)


def test_unknown_config_key_is_named(envs):
    agents.register_agent("sample_only", SampleOnlyAgent, overwrite=True)
    with pytest.raises(ConfigError, match=r"unknown key 'iteratons'.*did you mean 'iterations'"):
        agents.make_agent("sample_only", envs, {"iteratons": 3})


def test_a_single_env_is_batched_for_the_agent(core):
    agents.register_agent("sample_only", SampleOnlyAgent, overwrite=True)
    agent = agents.make_agent("sample_only", text_env.TextGenEnv(core=core))
    assert isinstance(agent.envs, text_env.TextGenVectorEnv) and agent.envs.core is core
    assert agent.envs.num_envs == 64, "the env config's default batch size"
    wrapped = gym.make("text_env/TextGen-v0", core=core)
    assert agents.make_agent("sample_only", wrapped, num_envs=6).envs.num_envs == 6
    with pytest.raises(TypeError, match="TextGenVectorEnv or TextGenEnv, got CartPoleEnv"):
        agents.make_agent("sample_only", gym.make("CartPole-v1"))


def test_the_batch_size_is_the_envs_a_vector_env_keeps_its_own(envs):
    agents.register_agent("sample_only", SampleOnlyAgent, overwrite=True)
    assert agents.make_agent("sample_only", envs, num_envs=8).envs is envs
    with pytest.raises(
        ValueError, match="num_envs=4 given for a vector env of 8 rows: a vector env keeps its own"
    ):
        agents.make_agent("sample_only", envs, num_envs=4)


@pytest.mark.parametrize("agent", ["ppo", "raft"])
def test_num_envs_in_an_agent_config_is_an_error_that_names_the_envs_setting(envs, agent):
    """Agent configs used to take num_envs (used only when batching a single env): the env owns it now."""
    with pytest.raises(ConfigError, match=r"key 'num_envs' .* not a \w+Config setting: .*set env\.num_envs"):
        agents.make_agent(agent, envs, {"num_envs": 8})
    with pytest.raises(ConfigError, match=r"make_agent\(name, env, config, num_envs=B\)"):
        resolve_config(agents.get_agent_class(agent), None, ["num_envs=8"])


def test_agent_from_an_entry_point_of_an_installed_package(tmp_path, monkeypatch, envs):
    """A third-party package declares `[rlhf_gym.agents] my_agent = my_agents_pkg:MyAgent` in its metadata."""
    (tmp_path / "my_agents_pkg.py").write_text(
        textwrap.dedent(
            """
            from tests.test_registry import SampleOnlyAgent

            class MyAgent(SampleOnlyAgent):
                name = "my_agent"
            """
        )
    )
    dist = tmp_path / "my_agents_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-agents-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rlhf_gym.agents]\nmy_agent = my_agents_pkg:MyAgent\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert "my_agent" in agents.available()
    agent = agents.make_agent("my_agent", envs, {"iterations": 1})
    assert type(agent).__name__ == "MyAgent"
    assert set(METRIC_KEYS) <= set(agent.learn()[0])
    sys.modules.pop("my_agents_pkg", None)


def test_train_command_writes_metrics_summary_and_policy(tmp_path):
    """`rlhf-gym train --agent NAME`: configs in, metrics (JSONL, CSV, TensorBoard) and a policy out."""
    import json

    from rlhf_gym.cli import main
    from rlhf_gym.train import train

    run_dir = tmp_path / "run"
    overrides = [
        "env.max_new_tokens=8",
        "env.num_envs=8",
        "iterations=2",
        "samples_per_prompt=2",
        "prompts_per_iteration=4",
    ]
    history = train("best_of_n", run_dir, overrides=overrides, progress=False)
    assert [m["iteration"] for m in history] == [1.0, 2.0]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["agent"] == "best_of_n"
    assert (run_dir / "metrics.csv").read_text().startswith("agent,iteration,")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(METRIC_KEYS) <= set(summary["final"]) and summary["final"]["kl_bound"] == pytest.approx(
        np.log(2) - 0.5
    )
    assert 0.0 < summary["final"]["kl"] <= summary["final"]["kl_bound"]  # best-of-n's kl: the estimate
    assert (run_dir / "policy" / "model.safetensors").is_file() and any((run_dir / "tensorboard").iterdir())
    with pytest.raises(SystemExit):
        main(["train", "--agent"])  # argparse names the missing value


@pytest.mark.parametrize("agent", ["reinforce", "best_of_n", "raft", "sb3_ppo"])
@pytest.mark.parametrize("key", ["beta", "num_envs"])
def test_every_agent_config_that_names_an_env_setting_says_where_it_lives(agent, key):
    """beta and num_envs have one owner, the env: any agent's config (not only PPO's, which lists them
    itself) that names one gets an error pointing at env.beta / env.num_envs, not a bare "unknown key"."""
    from agents.registry import get_agent_class, resolve_config
    from rlhf_base.config import ConfigError

    with pytest.raises(
        ConfigError, match=rf"key '{key}' .* is not a \w+ setting: the env owns .* env\.{key}"
    ):
        resolve_config(get_agent_class(agent), {key: 1})
    with pytest.raises(ConfigError, match=rf"in override '{key}=1' is not a \w+ setting: the env owns"):
        resolve_config(get_agent_class(agent), None, [f"{key}=1"])
