"""ReMax: the greedy baseline by hand, one iteration's greedy rollout, baseline and loss against a hand
computation, the config's errors, and that it trains and learns."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

import agents
import agents.remax
import text_env
from agents.base import METRIC_KEYS, evaluate_policy
from agents.remax import ReMaxAgent, greedy_reward
from rlhf_base.config import ConfigError
from tests.helpers import fresh_envs, params
from tests.test_agent_wiring import BETA, TOL, hand_forward, hand_score, moved_envs, snapshot, spy
from text_env.core import EnvCore

JUNK = 9.0  # at padding: would change any result it leaked into


@pytest.fixture(scope="module")
def core8() -> EnvCore:
    """Our own core (responses of at most 8 tokens, beta 0.3): training here never touches other tests."""
    return EnvCore(max_new_tokens=8, beta=BETA)


def test_greedy_reward_and_the_advantage_by_hand():
    # Greedy response 0: two tokens, log-ratios 0.5 and -0.1 (k1 sum 0.4); response 1: one token, 1.0.
    rm_scores = torch.tensor([1.0, 0.5])
    logprobs = torch.tensor([[-0.5, -1.0, JUNK], [-0.2, JUNK, JUNK]])
    ref_logprobs = torch.tensor([[-1.0, -0.9, 0.0], [-1.2, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    baseline = greedy_reward(rm_scores, logprobs, ref_logprobs, mask, beta=0.5)
    torch.testing.assert_close(baseline, torch.tensor([1.0 - 0.5 * 0.4, 0.5 - 0.5 * 1.0]))
    # ReMax's advantage: the sampled response's env reward minus its prompt's greedy reward.
    sampled_rewards = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(sampled_rewards - baseline, torch.tensor([0.2, 0.0]))


@torch.no_grad()
def greedy_tokens_are_the_argmax(policy: torch.nn.Module, batch: text_env.Rollout, i: int) -> bool:
    """Each response token of row i is the argmax of the policy's logits after its prefix (one forward)."""
    real = batch.attention_mask[i].bool()
    ids = batch.input_ids[i, real]
    prompt_len = int(real[: batch.response_start].sum())
    length = int(batch.response_mask[i].sum())
    logits = policy(input_ids=ids[None]).logits[0, prompt_len - 1 : prompt_len + length - 1]  # (length, V)
    return torch.equal(logits.argmax(-1), ids[prompt_len:])


def test_remax_update_sees_the_greedy_baseline_and_the_hand_computed_loss(core8, monkeypatch):
    envs = moved_envs(core8)  # policy off pi_ref: KL far from 0, beta 0.3
    agent = agents.make_agent("remax", envs)
    policy = snapshot(envs.policy)  # before the update
    rollout = spy(monkeypatch, text_env, "rollout")
    loss_fn = spy(monkeypatch, agents.remax, "reinforce_loss")

    (metrics,) = agent.learn(1)

    batch, greedy = rollout.results
    every = range(envs.num_envs)
    assert len(set(batch.prompt_indices.tolist())) == envs.num_envs, "one sample per prompt, distinct prompts"
    assert (greedy.prompt_indices == batch.prompt_indices).all(), (
        "the greedy responses answer the same prompts"
    )
    assert all(greedy_tokens_are_the_argmax(policy, greedy, i) for i in every)
    # The baseline: the greedy response's env reward with the policy's log-probs (not the sampler's 0).
    greedy_logprobs = [hand_forward(policy, None, greedy, i)[0] for i in every]
    baselines = [
        float(greedy.rm_scores[i]) - BETA * float((lp - greedy.ref_logprobs[i, : len(lp)]).sum())
        for i, lp in enumerate(greedy_logprobs)
    ]
    assert max(abs(b - float(r)) for b, r in zip(baselines, greedy.rewards, strict=True)) > 1e-2, (
        "the sampler's greedy rollout pays the KL of a point mass; the baseline must not be that reward"
    )
    want = [hand_score(batch, i, BETA) - baselines[i] for i in every]  # R - R_greedy
    (call,) = loss_fn.calls
    torch.testing.assert_close(call["advantages"], torch.tensor(want), **TOL)
    torch.testing.assert_close(call["mask"], batch.response_mask)
    assert metrics["baseline"] == pytest.approx(statistics.fmean(baselines), rel=1e-4, abs=1e-5)
    # The loss: -mean_i(A_i * sum_t log pi_it) over the sampled responses only.
    logprobs = [hand_forward(policy, None, batch, i)[0] for i in every]
    loss = -statistics.fmean(a * float(lp.sum()) for a, lp in zip(want, logprobs, strict=True))
    assert metrics["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-5)
    assert metrics["tokens"] == batch.num_tokens + greedy.num_tokens  # the greedy rollout is paid for too


def test_remax_is_registered(core8):
    assert "remax" in agents.available()
    agent = agents.make_agent("remax", text_env.TextGenVectorEnv(num_envs=4, core=core8))
    assert isinstance(agent, ReMaxAgent) and isinstance(agent, agents.Agent) and agent.name == "remax"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"clip_range": -0.1}, r"ReMaxConfig\.clip_range = -0\.1 .*: must be > 0"),
        ({"epochs": 0}, r"ReMaxConfig\.epochs = 0 .*: must be >= 1"),
        ({"learning_rate": 0.0}, r"ReMaxConfig\.learning_rate = 0\.0 .*: must be > 0"),
        ({"beta": 0.1}, "the env owns the KL coefficient"),
        ({"samples_per_prompt": 2}, "samples_per_prompt"),  # one sample per prompt: no such key
    ],
)
def test_bad_config_values_are_errors_naming_the_key(core8, overrides, message):
    envs = text_env.TextGenVectorEnv(num_envs=4, core=core8)
    with pytest.raises(ConfigError, match=message):
        agents.make_agent("remax", envs, overrides)


@pytest.mark.parametrize(
    "config", [{}, {"epochs": 2, "token_mean": True}], ids=["plain", "clipped_two_steps"]
)
def test_an_iteration_is_finite_and_trains_every_parameter(core8, config):
    envs = fresh_envs(core8, 8)
    agent = agents.make_agent("remax", envs, {"learning_rate": 1e-3, **config})
    before = params(envs.policy)
    history = agent.learn(2)
    for m in history:
        assert set(METRIC_KEYS) | {"loss", "baseline", "greedy_rm_score", "greedy_kl"} <= set(m)
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values()), m
    changed = [not torch.equal(a, b) for a, b in zip(before, envs.policy.parameters(), strict=True)]
    assert all(changed), f"{changed.count(False)} parameter tensors did not change"


def test_remax_raises_the_reward_model_score_above_pi_ref():
    """The default task, 64 prompts, 16-token responses: 10 iterations (~1.3 s each, two rollouts) lift
    fresh samples' mean rm_score (seed 0: from -0.10 to 0.09)."""
    envs = fresh_envs(EnvCore(max_new_tokens=16), 64)
    before = evaluate_policy(envs, num_episodes=128, seed=123)
    agents.make_agent("remax", envs, {"learning_rate": 1e-3}).learn(10)
    after = evaluate_policy(envs, num_episodes=128, seed=123)
    assert after["rm_score"] > before["rm_score"] + 0.1, (before["rm_score"], after["rm_score"])
