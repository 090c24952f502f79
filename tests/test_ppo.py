"""PPO: the reward layout, GAE on it and the KL controller by hand; that an update trains; that it learns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import agents
import text_env
from agents.base import METRIC_KEYS, NonFiniteLossError, evaluate_policy
from agents.ppo import PPO_METRIC_KEYS, PPOAgent, PPOConfig, adaptive_beta, token_rewards
from rlhf_base.config import ConfigError, load_config
from rlhf_base.maths import gae, kl_penalty, kl_per_token
from tests.helpers import fresh_envs, params
from text_env.core import EnvCore

JUNK = 9.0  # at padding: would change any result it leaked into


@pytest.fixture(scope="module")
def core16() -> EnvCore:
    """Our own core (responses of at most 16 tokens): training here never touches the session's policy."""
    return EnvCore(max_new_tokens=16)


@pytest.fixture(autouse=True)
def _restore_beta(core16):
    """PPO's adaptive controller sets the env's beta, which lives on the shared core: put it back."""
    beta = core16.beta
    yield
    core16.beta = beta


def same(a: list[torch.Tensor], module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, module.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------------------
# Reward layout, GAE and the KL controller by hand
# ---------------------------------------------------------------------------------------------------------
# Row 0: three tokens (EOS last), per-token KL 0.2, 0.4, 0.1, rm_score 1. Row 1: two tokens, KL 1, -1, rm -0.5.
RM = torch.tensor([1.0, -0.5], dtype=torch.float64)
KL = torch.tensor([[0.2, 0.4, 0.1, JUNK], [1.0, -1.0, JUNK, JUNK]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
BETA = 0.5


def test_per_token_rewards_pay_kl_everywhere_and_the_score_at_eos():
    rewards = token_rewards(RM, KL, MASK, BETA, "per_token")
    expected = [[-0.1, -0.2, -0.05 + 1.0, 0.0], [-0.5, 0.5 - 0.5, 0.0, 0.0]]
    torch.testing.assert_close(rewards, torch.tensor(expected, dtype=torch.float64))


def test_terminal_rewards_pay_everything_at_eos():
    rewards = token_rewards(RM, KL, MASK, BETA, "terminal")
    expected = [[0.0, 0.0, 1.0 - 0.5 * 0.7, 0.0], [0.0, -0.5 - 0.5 * 0.0, 0.0, 0.0]]
    torch.testing.assert_close(rewards, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("placement", ["per_token", "terminal"])
def test_both_layouts_give_the_same_return_of_the_whole_response(placement):
    # With gamma = lambda = 1 and V = 0, the advantage of the first token is the response's whole return.
    rewards = token_rewards(RM, KL, MASK, BETA, placement)
    advantages, returns = gae(rewards, torch.zeros_like(rewards), MASK, gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns[:, 0], torch.tensor([0.65, -0.5], dtype=torch.float64))
    torch.testing.assert_close(advantages, returns)


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_k1_token_rewards_of_a_rollout_sum_to_the_env_reward(core16, granularity):
    """PPO's default KL term (k1 in the reward) adds up to the env's reward at either granularity; a k3 term
    is another number, while the env's `kl` stays k1 (issue 12)."""
    envs = fresh_envs(core16, 8)
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy off pi_ref so that the KL is not ~0
        for p in envs.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = text_env.rollout(envs, seed=0, generator=torch.Generator().manual_seed(0))
    mask = batch.response_mask
    kl = kl_penalty(batch.logprobs, batch.ref_logprobs, mask, "k1", granularity)
    rewards = token_rewards(batch.rm_scores, kl, mask, envs.beta, "per_token")
    torch.testing.assert_close(rewards.sum(-1), batch.rewards, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl.sum(-1), batch.kl, atol=1e-5, rtol=1e-5)
    assert batch.kl.abs().mean() > 0.1
    k3 = kl_penalty(batch.logprobs, batch.ref_logprobs, mask, "k3", granularity).sum(-1)
    assert (k3 - batch.kl).abs().max() > 1e-2


def test_gae_on_per_token_rewards_by_hand():
    # Row 0's rewards are (-0.1, -0.2, 0.95); V = 0.5 everywhere, gamma 1, lambda 0.5.
    # deltas: t2 = 0.95 - 0.5 = 0.45 (episode ends), t1 = -0.2 + 0.5 - 0.5 = -0.2, t0 = -0.1.
    # A2 = 0.45, A1 = -0.2 + 0.5 * 0.45 = 0.025, A0 = -0.1 + 0.5 * 0.025 = -0.0875; returns = A + V.
    rewards = token_rewards(RM, KL, MASK, BETA, "per_token")
    values = torch.full_like(rewards, 0.5)
    advantages, returns = gae(rewards, values, MASK, gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages[0], torch.tensor([-0.0875, 0.025, 0.45, 0.0], dtype=torch.float64))
    torch.testing.assert_close(returns[0], torch.tensor([0.4125, 0.525, 0.95, 0.0], dtype=torch.float64))


def test_adaptive_beta_by_hand():
    # Ziegler et al.: e = clip(kl / target - 1, -0.2, 0.2); beta *= 1 + e * n_steps / horizon.
    # KL 9 against target 6: e = 0.5 clipped to 0.2; with n_steps = horizon = 64, beta 0.1 -> 0.12.
    beta = adaptive_beta(0.1, kl=9.0, target=6.0, horizon=64, n_steps=64)
    assert beta == pytest.approx(0.12)
    # KL 5.4: e = -0.1, beta 0.12 -> 0.108.
    assert adaptive_beta(beta, kl=5.4, target=6.0, horizon=64, n_steps=64) == pytest.approx(0.108)
    # Ziegler's horizon of 10,000 episodes moves beta by at most 0.2 * 64 / 10,000 per batch of 64.
    assert adaptive_beta(0.1, 100.0, 6.0, 10_000, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10_000))


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------
def test_bad_values_name_the_key(core16):
    envs = text_env.TextGenVectorEnv(num_envs=4, core=core16)
    with pytest.raises(ConfigError, match="'kl_placement' was renamed to 'kl_granularity' in PPOConfig"):
        agents.make_agent("ppo", envs, {"kl_placement": "terminal"})
    with pytest.raises(
        ConfigError, match=r"'kl_granularity'.*expected one of 'token', 'sequence', got 'per_token'"
    ):
        agents.make_agent("ppo", envs, {"kl_granularity": "per_token"})
    hint = r"got 'terminal' \(the old kl_placement's 'terminal' is 'sequence'\)"
    with pytest.raises(ValueError, match=r"kl_granularity must be one of \['token', 'sequence'\], " + hint):
        PPOConfig(kl_granularity="terminal")
    with pytest.raises(ConfigError, match=r"'kl_in'.*expected one of 'reward', 'loss', got 'advantage'"):
        agents.make_agent("ppo", envs, {"kl_in": "advantage"})
    with pytest.raises(ValueError, match=r"kl_estimator must be one of \['k1', 'k2', 'k3'\], got 'k4'"):
        PPOConfig(kl_estimator="k4")
    with pytest.raises(ConfigError, match=r"PPOConfig\.learning_rate = 0\.0 .*: must be > 0"):
        agents.make_agent("ppo", text_env.TextGenVectorEnv(num_envs=4, core=core16), {"learning_rate": 0.0})


def test_beta_in_the_agent_config_is_an_error_that_names_the_envs_setting(core16):
    """One owner: the env's config holds beta; PPO's config no longer takes one (it used to: "None: the env's")."""
    envs = text_env.TextGenVectorEnv(num_envs=4, core=core16)
    with pytest.raises(
        ConfigError,
        match=r"key 'beta' in the config given for PPOAgent is not a PPOConfig setting: .*set env\.beta",
    ):
        agents.make_agent("ppo", envs, {"beta": 0.1})
    with pytest.raises(ConfigError, match=r"key 'beta' in override 'beta=0\.1' is not a PPOConfig setting"):
        load_config(PPOConfig, overrides=["beta=0.1"])


# ---------------------------------------------------------------------------------------------------------
# An update trains; metrics; early stops; save/load; NaN
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        {"kl_granularity": "token"},
        {"kl_granularity": "sequence", "adaptive_kl": True, "whiten_rewards": True, "clip_range_value": None},
        {"kl_in": "loss", "kl_estimator": "k2", "kl_granularity": "sequence"},
    ],
    ids=["token", "sequence+adaptive+whiten_rewards", "k2_loss_sequence"],
)
def test_an_iteration_trains_policy_and_value_head_and_reports_metrics(core16, overrides):
    envs = fresh_envs(core16, 8)
    agent = agents.make_agent(
        "ppo", envs, {"learning_rate": 1e-3, "num_minibatches": 2, "epochs": 2, **overrides}
    )
    assert isinstance(agent, agents.Agent) and isinstance(agent, PPOAgent)
    policy_before, head_before = params(envs.policy), params(agent.value_head)
    assert all((p == 0).all() for p in head_before)  # zero-initialised critic
    history = agent.learn(2)
    assert len(history) == 2 and [m["iteration"] for m in history] == [1.0, 2.0]
    for m in history:
        assert set(METRIC_KEYS) | set(PPO_METRIC_KEYS) <= set(m)
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values()), m
        if overrides.get("kl_estimator", "k1") == "k1":  # the KL term optimised is the logged one
            assert m["kl_objective"] == pytest.approx(m["kl"], abs=1e-4)
        else:  # k2 of the summed log-ratio, >= 0, while the logged kl stays the env's k1
            assert m["kl_objective"] >= 0
    if "kl_estimator" in overrides:  # the first update moved pi off pi_ref: k2 and k1 now differ
        assert abs(history[1]["kl_objective"] - history[1]["kl"]) > 1e-3, history[1]
    # Position embeddings past prompt + 16 tokens are never used, so compare tensors, not every element.
    changed = [not torch.equal(a, b) for a, b in zip(policy_before, envs.policy.parameters(), strict=True)]
    assert all(changed), f"{changed.count(False)} policy parameter tensors did not change"
    assert not any(torch.equal(a, b) for a, b in zip(head_before, agent.value_head.parameters(), strict=True))
    if overrides.get("adaptive_kl"):
        m = history[0]
        assert history[1]["beta"] == pytest.approx(adaptive_beta(m["beta"], m["kl"], 6.0, 10_000, 8))
    else:
        assert history[0]["beta"] == history[1]["beta"] == envs.beta


def test_the_adaptive_controller_sets_the_envs_beta_so_env_and_agent_pay_the_same_reward(core16):
    """PPO's KL controller owns the env's one beta: after each adaptive step the env pays
    rm_score - beta * kl with PPO's new beta, and every iteration's reward metric used that iteration's beta."""
    envs = fresh_envs(core16, 8)
    envs.beta = 0.2
    config = {"adaptive_kl": True, "kl_target": 0.05, "kl_horizon": 8, "epochs": 1, "learning_rate": 1e-3}
    agent = agents.make_agent("ppo", envs, config)
    history = agent.learn(3)
    betas = [m["beta"] for m in history] + [envs.beta]
    assert betas[0] == 0.2 and agent.beta == envs.beta
    for m, new in zip(history, betas[1:], strict=True):  # each step moves beta by up to 20 % (horizon = B)
        assert new == pytest.approx(adaptive_beta(m["beta"], m["kl"], 0.05, 8, 8)) and new != m["beta"]
    for m in history:  # means: reward = rm_score - beta * kl holds for the batch means too
        assert m["reward"] == pytest.approx(m["rm_score"] - m["beta"] * m["kl"], abs=1e-5)
    batch = text_env.rollout(envs, seed=0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(batch.rewards, batch.rm_scores - agent.beta * batch.kl, atol=1e-6, rtol=0)
    kl = kl_per_token(batch.logprobs, batch.ref_logprobs, envs.kl_estimator)
    ppo_rewards = token_rewards(batch.rm_scores, kl, batch.response_mask, agent.beta, "per_token")
    torch.testing.assert_close(ppo_rewards.sum(-1), batch.rewards, atol=1e-5, rtol=1e-5)


def test_first_minibatch_is_on_policy_and_target_kl_stops_the_epochs(core16):
    # The first minibatch sees ratio 1 (old log-probs come from the same forward), so its clip fraction is 0;
    # a target_kl of 0 then stops after the first epoch.
    agent = agents.make_agent(
        "ppo", fresh_envs(core16, 8), {"target_kl": 0.0, "epochs": 4, "learning_rate": 1e-3}
    )
    (m,) = agent.learn(1)
    assert m["ppo_epochs"] == 1.0
    zero_lr = agents.make_agent("ppo", fresh_envs(core16, 8), {"learning_rate": 1e-12, "num_minibatches": 1})
    (m,) = zero_lr.learn(1)
    assert m["clip_fraction"] == 0.0 and m["approx_kl"] == pytest.approx(0.0, abs=1e-9)


def test_callback_returning_false_stops_early(core16):
    agent = agents.make_agent("ppo", fresh_envs(core16, 4), {"epochs": 1})
    assert len(agent.learn(5, callback=lambda a, m: False)) == 1


def test_save_then_load_restores_policy_value_head_and_beta(core16, tmp_path):
    envs = fresh_envs(core16, 8)
    agent = agents.make_agent("ppo", envs, {"learning_rate": 1e-3, "adaptive_kl": True, "epochs": 1})
    agent.learn(1)
    agent.save(tmp_path / "ppo")
    saved_policy, saved_head, saved_beta = params(envs.policy), params(agent.value_head), agent.beta
    agent.learn(1)
    assert not same(saved_policy, envs.policy) and agent.beta != saved_beta
    agent.load(tmp_path / "ppo")
    assert same(saved_policy, envs.policy) and same(saved_head, agent.value_head) and agent.beta == saved_beta
    assert envs.beta == saved_beta, "a checkpoint's beta goes back into the env, which scores with it"


def test_non_finite_reward_stops_before_the_update_and_keeps_the_checkpoint(core16, tmp_path, monkeypatch):
    envs = fresh_envs(core16, 8)
    agent = agents.make_agent("ppo", envs, {"learning_rate": 1e-3, "epochs": 1})
    agent.learn(1)
    agent.save(tmp_path / "ppo")
    before = params(envs.policy)
    monkeypatch.setattr(core16.judge, "reward_fn", lambda prompts, responses: [math.nan] * len(responses))
    with pytest.raises(ValueError, match=r"non-finite score\(s\)"):  # refused where the env scores it
        agent.learn(1)
    assert same(before, envs.policy)  # stopped before optimizer.step()
    reloaded = agents.make_agent("ppo", fresh_envs(core16, 8), {})
    reloaded.load(tmp_path / "ppo")
    assert same(before, reloaded.envs.policy)


def test_infinite_learning_rate_is_caught_before_a_second_step(core16):
    # lr = inf turns the weights non-finite after the first step; the next loss is caught. A config refuses
    # an infinite learning rate, so it is set on the optimiser, as a diverging schedule would.
    with pytest.raises(ConfigError, match="learning_rate.*NaN or infinity"):
        agents.make_agent("ppo", fresh_envs(core16, 8), {"learning_rate": math.inf})
    agent = agents.make_agent("ppo", fresh_envs(core16, 8), {"num_minibatches": 2})
    for group in agent.optimizer.param_groups:
        group["lr"] = math.inf
    with pytest.raises(NonFiniteLossError, match="iteration 1"):
        agent.learn(1)


# ---------------------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------------------
def test_ppo_raises_the_reward_model_score_above_pi_ref(core16):
    """Default task, responses <= 16 tokens, 64 envs, default config, 8 iterations (~8 s a seed): fresh
    samples' mean rm_score rises under every seed, by +0.34 on average over seeds 0-2 (+0.14, +0.50, +0.39
    with one thread; the per-seed gains move with the thread count and library versions, which is why one
    seed alone made a brittle test), against the +0.2 asked here."""
    before = evaluate_policy(fresh_envs(core16, 64), num_episodes=128, seed=123)["rm_score"]
    gains = []
    for seed in (0, 1, 2):
        envs = fresh_envs(core16, 64)
        agents.make_agent("ppo", envs, {"seed": seed}).learn(8)
        gains.append(evaluate_policy(envs, num_episodes=128, seed=123)["rm_score"] - before)
    assert min(gains) > 0.0, gains
    assert np.mean(gains) > 0.2, gains


@pytest.mark.slow
def test_ppo_raises_the_gold_score_on_the_default_task():
    """Responses of up to 32 tokens and the default config (60 iterations, ~5 min on one core): gold rises
    from ~0.05 to ~0.6 (seeds 0-2), with KL ~4-5 nats."""
    envs = fresh_envs(EnvCore(max_new_tokens=32), 64)
    before = evaluate_policy(envs, num_episodes=256, seed=7)
    agent = agents.make_agent("ppo", envs)  # the default config
    agent.learn(60)
    after = evaluate_policy(envs, num_episodes=256, seed=7)
    assert after["gold_score"] > before["gold_score"] + 0.3, (before["gold_score"], after["gold_score"])
    assert after["kl"] < 20.0
