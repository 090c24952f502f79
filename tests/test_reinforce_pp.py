"""REINFORCE++: the whitened token returns by hand (and as PPO's GAE with V = 0, lambda = 1), one iteration's
inputs against a hand computation, the config's errors, and that it trains and learns."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

import agents
import agents.reinforce_pp
import text_env
from agents.base import METRIC_KEYS, evaluate_policy
from agents.ppo import token_rewards
from agents.reinforce_pp import ReinforcePPAgent, reinforce_pp_advantages
from rlhf_base.config import ConfigError
from rlhf_base.maths import gae, kl_penalty, masked_whiten
from tests.helpers import fresh_envs, params
from tests.test_agent_wiring import BETA, assert_rows, hand_forward, hand_whiten, moved_envs, snapshot, spy
from text_env.core import EnvCore

JUNK = 9.0  # at padding: would change any result it leaked into


@pytest.fixture(scope="module")
def core8() -> EnvCore:
    """Our own core (responses of at most 8 tokens, beta 0.3): training here never touches other tests."""
    return EnvCore(max_new_tokens=8, beta=BETA)


def test_advantages_are_whitened_reward_to_go_with_the_kl_per_token_by_hand():
    # Response 0: two tokens, log-ratios (0.2, -0.4), rm_score 1. Response 1: three, (0.1, 0, 0.3), rm -1.
    log_ratio = torch.tensor([[0.2, -0.4, 0.0], [0.1, 0.0, 0.3]])
    ref_logprobs = torch.tensor([[-1.0, -2.0, JUNK], [-0.5, -1.5, -1.0]])
    logprobs = ref_logprobs + log_ratio
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages, returns = reinforce_pp_advantages(
        torch.tensor([1.0, -1.0]), logprobs, ref_logprobs, mask, 0.5
    )
    # Token rewards -beta * l_t, the rm_score added at the last: (-0.1, 0.2 + 1) and (-0.05, 0, -0.15 - 1).
    # Reward-to-go (gamma 1): (1.1, 1.2) and (-1.2, -1.15, -1.15); G_0 is each response's env reward.
    want = [[1.1, 1.2], [-1.2, -1.15, -1.15]]
    torch.testing.assert_close(returns, torch.tensor([[1.1, 1.2, 0.0], [-1.2, -1.15, -1.15]]))
    # Whitened over all five valid tokens of the batch (not per response, not per prompt).
    flat = [x for row in want for x in row]
    mean, std = statistics.fmean(flat), statistics.stdev(flat)
    expected = [[(x - mean) / std for x in row] + [0.0] * (3 - len(row)) for row in want]
    torch.testing.assert_close(advantages, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_advantages_equal_ppo_gae_with_a_zero_critic_and_lambda_one():
    """REINFORCE++ is the option combination gamma = lambda = 1, V = 0, whitened advantages of PPO."""
    g = torch.Generator().manual_seed(0)
    logprobs, ref_logprobs = -torch.rand(4, 6, generator=g), -torch.rand(4, 6, generator=g)
    mask = (torch.arange(6) < torch.tensor([[6], [2], [4], [1]])).float()
    rm_scores, beta = torch.randn(4, generator=g), 0.3
    ours, _ = reinforce_pp_advantages(rm_scores, logprobs, ref_logprobs, mask, beta)
    rewards = token_rewards(rm_scores, kl_penalty(logprobs, ref_logprobs, mask), mask, beta, "per_token")
    ppo, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ours, masked_whiten(ppo, mask))


def test_reinforce_pp_update_sees_the_hand_computed_advantages(core8, monkeypatch):
    envs = moved_envs(core8)  # policy off pi_ref: KL far from 0, beta 0.3
    agent = agents.make_agent("reinforce_pp", envs, {"num_minibatches": 2})
    policy = snapshot(envs.policy)  # before the update
    rollout = spy(monkeypatch, text_env, "rollout")
    take = spy(monkeypatch, agents.reinforce_pp, "take_rows")
    loss_fn = spy(monkeypatch, agents.reinforce_pp, "ppo_policy_loss")

    agent.learn(1)

    (batch,) = rollout.results
    every = range(envs.num_envs)
    assert batch.kl.abs().mean() > 0.05, "the setup needs a KL far from 0 to see the KL term's wiring"
    returns = []
    for i in every:  # -beta * (log q - log pi_ref) per token, rm_score at the last; then the sum to go
        length = int(batch.response_mask[i].sum())
        rewards = [-BETA * float(batch.logprobs[i, t] - batch.ref_logprobs[i, t]) for t in range(length)]
        rewards[-1] += float(batch.rm_scores[i])
        returns.append([sum(rewards[t:]) for t in range(length)])
        assert returns[i][0] == pytest.approx(float(batch.rewards[i]), abs=1e-5)  # the env's reward
    advantages = hand_whiten(returns)  # over every valid token of the batch
    old_logprobs = [hand_forward(policy, None, batch, i)[0] for i in every]
    assert len(loss_fn.calls) == 2 == len(take.calls)  # one epoch of two minibatches
    seen = []
    for call, taken in zip(loss_fn.calls, take.calls, strict=True):
        rows = taken["rows"].tolist()
        seen += rows
        assert_rows(call["advantages"], advantages, rows, "whitened token returns into the loss")
        assert_rows(call["old_logprobs"], old_logprobs, rows, "the rollout policy's log-probs")
        torch.testing.assert_close(call["mask"], batch.response_mask[rows])
        assert call["clip_range"] == agent.config.clip_range
    assert sorted(seen) == list(every)
    assert_rows(loss_fn.calls[0]["logprobs"], old_logprobs, take.calls[0]["rows"].tolist(), "first step")


def test_reinforce_pp_is_registered(core8):
    assert "reinforce_pp" in agents.available()
    agent = agents.make_agent("reinforce_pp", text_env.TextGenVectorEnv(num_envs=4, core=core8))
    assert isinstance(agent, ReinforcePPAgent) and isinstance(agent, agents.Agent)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"clip_range": 0.0}, r"ReinforcePPConfig\.clip_range = 0\.0 .*: must be > 0"),
        ({"epochs": 0}, r"ReinforcePPConfig\.epochs = 0 .*: must be >= 1"),
        ({"num_minibatches": 0}, r"ReinforcePPConfig\.num_minibatches = 0 .*: must be >= 1"),
        ({"beta": 0.1}, "the env owns the KL coefficient"),
    ],
)
def test_bad_config_values_are_errors_naming_the_key(core8, overrides, message):
    envs = text_env.TextGenVectorEnv(num_envs=4, core=core8)
    with pytest.raises(ConfigError, match=message):
        agents.make_agent("reinforce_pp", envs, overrides)


def test_one_env_cannot_be_whitened(core8):
    with pytest.raises(ValueError, match="num_envs >= 2"):
        agents.make_agent("reinforce_pp", text_env.TextGenVectorEnv(num_envs=1, core=core8))


@pytest.mark.parametrize("config", [{}, {"epochs": 2, "num_minibatches": 1}], ids=["default", "two_epochs"])
def test_an_iteration_is_finite_and_trains_every_parameter(core8, config):
    envs = fresh_envs(core8, 8)
    agent = agents.make_agent("reinforce_pp", envs, {"learning_rate": 1e-3, **config})
    before = params(envs.policy)
    history = agent.learn(2)
    for m in history:
        assert set(METRIC_KEYS) | {"policy_loss", "clip_fraction", "approx_kl", "kl_objective"} <= set(m)
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values()), m
        assert m["kl_objective"] == pytest.approx(m["kl"])  # k1 in the reward: the env's own
    changed = [not torch.equal(a, b) for a, b in zip(before, envs.policy.parameters(), strict=True)]
    assert all(changed), f"{changed.count(False)} parameter tensors did not change"


def test_reinforce_pp_raises_the_reward_model_score_above_pi_ref():
    """The default task, 64 prompts, 16-token responses: 10 iterations (~0.8 s each, 4 minibatch steps) lift
    fresh samples' mean rm_score (seed 0: from -0.10 to 0.25)."""
    envs = fresh_envs(EnvCore(max_new_tokens=16), 64)
    before = evaluate_policy(envs, num_episodes=128, seed=123)
    agents.make_agent("reinforce_pp", envs, {"learning_rate": 1e-3}).learn(10)
    after = evaluate_policy(envs, num_episodes=128, seed=123)
    assert after["rm_score"] > before["rm_score"] + 0.15, (before["rm_score"], after["rm_score"])
