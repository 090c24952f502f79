"""REINFORCE / RLOO: the advantages and the loss against hand computations, its errors, and that it learns."""

from __future__ import annotations

import math

import pytest
import torch

import agents
import text_env
from agents.base import METRIC_KEYS, NonFiniteLossError, evaluate_policy
from agents.reinforce import (
    ReinforceAgent,
    ReinforceConfig,
    advantages,
    clipped_reinforce_loss,
    reinforce_loss,
)
from rlhf_base.config import ConfigError
from tests.helpers import fresh_envs, params
from text_env.core import EnvCore


@pytest.fixture(scope="module")
def core16() -> EnvCore:
    """Our own core (responses of at most 16 tokens): training here never touches the session's policy."""
    return EnvCore(max_new_tokens=16)


# ---------------------------------------------------------------------------------------------------------
# Advantages and loss by hand
# ---------------------------------------------------------------------------------------------------------
def test_rloo_advantages_by_hand():
    # Two prompts, k = 4 samples each. Each baseline is the mean of the other three rewards of its prompt.
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 1.0, 1.0])
    adv, base, ema = advantages(rewards, "rloo", k=4, ema_state=None)
    expected_base = [11 / 3, 10 / 3, 9 / 3, 6 / 3, 2 / 3, 2 / 3, 1 / 3, 1 / 3]
    expected_adv = [-8 / 3, -4 / 3, 0.0, 4.0, -2 / 3, -2 / 3, 2 / 3, 2 / 3]
    torch.testing.assert_close(base, torch.tensor(expected_base))
    torch.testing.assert_close(adv, torch.tensor(expected_adv))
    assert ema is None


def test_moving_average_advantages_by_hand():
    # First batch: no past, so b = its own mean (2); the average becomes 0.9 * 2 + 0.1 * 2 = 2.
    adv, base, ema = advantages(torch.tensor([1.0, 3.0]), "moving_average", ema_state=None, ema_decay=0.9)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(base, torch.tensor([2.0, 2.0]))
    assert ema == pytest.approx(2.0)
    # Second batch (mean 5): b = the past average 2, not this batch's mean; then 0.9 * 2 + 0.1 * 5 = 2.3.
    adv, base, ema = advantages(torch.tensor([4.0, 6.0]), "moving_average", ema_state=ema, ema_decay=0.9)
    torch.testing.assert_close(adv, torch.tensor([2.0, 4.0]))
    assert ema == pytest.approx(2.3)


def test_whiten_advantages_by_hand():
    # mean 3, unbiased variance (4 + 1 + 0 + 9) / 3 = 14 / 3.
    adv, base, _ = advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), "whiten")
    std = math.sqrt(14 / 3)
    torch.testing.assert_close(adv, torch.tensor([-2.0, -1.0, 0.0, 3.0]) / std)
    torch.testing.assert_close(base, torch.full((4,), 3.0))


def test_unknown_baseline_in_advantages_names_valid_ones():
    with pytest.raises(ValueError, match="valid: \\['moving_average', 'rloo', 'whiten'\\]"):
        advantages(torch.ones(4), "critic")


def test_reinforce_loss_by_hand_and_its_gradient():
    # Sequence 0: two tokens (log-probs -1, -2; its padding holds junk), advantage +2.
    # Sequence 1: three tokens (-0.5, -0.5, -1), advantage -1.
    logprobs = torch.tensor([[-1.0, -2.0, 99.0], [-0.5, -0.5, -1.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([2.0, -1.0])
    # Sequence sums -3 and -2: loss = -((2 * -3) + (-1 * -2)) / 2 = 2.
    loss = reinforce_loss(logprobs, adv, mask)
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    # d loss / d log pi_it = -A_i / B on valid tokens, 0 at padding: descending raises the log-probs of the
    # sequence with a positive advantage and lowers those of the negative one.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.0, -1.0, 0.0], [0.5, 0.5, 0.5]]))
    # Token mean: -(2 * (-1 - 2) + (-1) * (-0.5 - 0.5 - 1)) / 5 tokens = -(-6 + 2) / 5 = 0.8.
    assert reinforce_loss(logprobs, adv, mask, token_mean=True).item() == pytest.approx(0.8)


@pytest.mark.parametrize("token_mean", [False, True])
def test_clipped_loss_has_the_reinforce_gradient_at_the_rollout_policy(token_mean):
    torch.manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    adv = torch.tensor([1.5, -0.5, -1.0])
    plain = torch.randn(3, 4).requires_grad_()
    clipped = plain.detach().clone().requires_grad_()
    reinforce_loss(plain, adv, mask, token_mean).backward()
    clipped_reinforce_loss(clipped, clipped.detach(), adv, mask, 0.2, token_mean).backward()
    torch.testing.assert_close(clipped.grad, plain.grad)


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------
def test_num_envs_not_divisible_by_k_is_a_clear_error(core16):
    envs = text_env.TextGenVectorEnv(num_envs=6, core=core16)
    with pytest.raises(ValueError, match="num_envs=6 is not divisible by samples_per_prompt=4"):
        agents.make_agent("reinforce", envs, {"baseline": "rloo", "samples_per_prompt": 4})
    with pytest.raises(ValueError, match="baseline 'rloo' needs samples_per_prompt >= 2"):
        agents.make_agent("reinforce", envs, {"baseline": "rloo", "samples_per_prompt": 1})


def test_bad_kl_settings_name_the_key_and_the_valid_values(core16):
    envs = text_env.TextGenVectorEnv(num_envs=8, core=core16)
    with pytest.raises(ConfigError, match=r"'kl_in'.*expected one of 'reward', 'loss', got 'both'"):
        agents.make_agent("reinforce", envs, {"kl_in": "both"})
    with pytest.raises(
        ValueError, match=r"kl_granularity must be one of \['token', 'sequence'\], got 'word'"
    ):
        ReinforceConfig(kl_granularity="word")


def test_unknown_baseline_via_make_agent_names_valid_ones(core16):
    envs = text_env.TextGenVectorEnv(num_envs=8, core=core16)
    with pytest.raises(ConfigError, match="baseline.*'moving_average', 'rloo', 'whiten'.*'nope'"):
        agents.make_agent("reinforce", envs, {"baseline": "nope"})


def test_non_finite_reward_stops_before_the_update(core16):
    nan_core = EnvCore(reward_model=lambda prompts, responses: [math.nan] * len(responses), max_new_tokens=4)
    agent = agents.make_agent("reinforce", text_env.TextGenVectorEnv(num_envs=8, core=nan_core), {})
    before = params(agent.envs.policy)
    # The env refuses a NaN reward where it is scored, naming the rows (before any loss is formed).
    with pytest.raises(ValueError, match=r"non-finite score\(s\) of 8 \(row 0: nan"):
        agent.learn(1)
    assert all(torch.equal(a, b) for a, b in zip(before, agent.envs.policy.parameters(), strict=True))


def test_an_infinite_gradient_under_a_finite_loss_stops_before_the_step(core16):
    """The loss can be finite while a gradient is not (here a hook makes one weight's gradient inf): the
    norm's guard must stop the step, or the clip would turn the weights into NaN."""
    envs = fresh_envs(core16, 8)
    agent = agents.make_agent("reinforce", envs, {})
    first = next(envs.policy.parameters())
    first.register_hook(lambda grad: grad * math.inf)
    before = params(envs.policy)
    with pytest.raises(NonFiniteLossError, match="gradient norm.*iteration 1"):
        agent.learn(1)
    assert all(torch.equal(a, b) for a, b in zip(before, envs.policy.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------------------
# Behaviour
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        {"baseline": "rloo", "samples_per_prompt": 2},
        {"baseline": "moving_average"},
        {"baseline": "whiten", "token_mean": True, "ent_coef": 0.01},
        {"baseline": "rloo", "samples_per_prompt": 4, "epochs": 2},
        {"kl_in": "loss", "kl_estimator": "k2", "kl_granularity": "sequence", "token_mean": True},
    ],
    ids=["rloo", "moving_average", "whiten+token_mean+entropy", "clipped_two_updates", "k2_loss"],
)
def test_every_variant_trains_every_parameter_and_reports_metrics(core16, overrides):
    envs = fresh_envs(core16, 8)
    agent = agents.make_agent("reinforce", envs, {"learning_rate": 1e-3, **overrides})
    assert isinstance(agent, agents.Agent) and isinstance(agent, ReinforceAgent)
    before = params(envs.policy)
    history = agent.learn(2)
    assert len(history) == 2 and len(agent.history) == 2
    for m in history:
        assert set(METRIC_KEYS) | {"loss", "advantage_std", "baseline"} <= set(m)
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    assert [m["iteration"] for m in history] == [1.0, 2.0]
    assert history[1]["tokens"] > history[0]["tokens"] > 0
    changed = [not torch.equal(a, b) for a, b in zip(before, envs.policy.parameters(), strict=True)]
    assert all(changed), f"{changed.count(False)} parameter tensors did not change"


@pytest.mark.parametrize(
    ("kl_settings", "sequence_reward"),
    [
        ({}, "env"),  # the default: k1 in the reward is the env's own reward
        ({"kl_estimator": "k3", "kl_granularity": "sequence"}, "rm_score - beta * kl_objective"),
        ({"kl_estimator": "k2", "kl_in": "loss"}, "rm_score"),
    ],
    ids=["k1_reward", "k3_reward_sequence", "k2_loss"],
)
def test_the_kl_settings_decide_the_sequence_reward(core16, kl_settings, sequence_reward):
    """RLOO's baselines average to the batch's mean sequence reward, so the `baseline` metric shows which
    reward the advantages were built from; the logged `kl` stays the env's k1 whatever is optimised."""
    envs = fresh_envs(core16, 8)
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy off pi_ref so that the KL is not ~0
        for p in envs.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    beta, envs.beta = envs.beta, 0.5  # a KL term large enough to tell the rewards apart
    try:
        agent = agents.make_agent("reinforce", envs, {"samples_per_prompt": 2, **kl_settings})
        (m,) = agent.learn(1)
    finally:
        envs.beta = beta  # the beta of the module's shared core
    expected = {
        "env": m["reward"],
        "rm_score - beta * kl_objective": m["rm_score"] - 0.5 * m["kl_objective"],
        "rm_score": m["rm_score"],
    }[sequence_reward]
    assert m["baseline"] == pytest.approx(expected, abs=1e-5)
    assert m["reward"] == pytest.approx(m["rm_score"] - 0.5 * m["kl"], abs=1e-5)  # the env's: k1
    if kl_settings:  # another estimator: another number than the logged k1
        assert abs(m["kl_objective"] - m["kl"]) > 1e-3 and m["kl_objective"] >= 0
        assert abs(m["baseline"] - m["reward"]) > 1e-3
    else:
        assert m["kl_objective"] == pytest.approx(m["kl"], abs=1e-5)


def test_rloo_rollout_holds_k_consecutive_samples_per_prompt(core16):
    agent = ReinforceAgent(fresh_envs(core16, 8), ReinforceConfig(samples_per_prompt=4))
    indices = agent._prompt_indices()
    assert indices.shape == (8,) and (indices[:4] == indices[0]).all() and (indices[4:] == indices[4]).all()


def test_callback_returning_false_stops_early(core16):
    agent = agents.make_agent("reinforce", fresh_envs(core16, 8), {})
    assert len(agent.learn(5, callback=lambda a, m: False)) == 1


def test_save_then_load_restores_the_policy(core16, tmp_path):
    envs = fresh_envs(core16, 8)
    agent = agents.make_agent("reinforce", envs, {"learning_rate": 1e-3})
    agent.learn(1)
    agent.save(tmp_path / "policy")
    saved = params(envs.policy)
    agent.learn(1)
    agent.load(tmp_path / "policy")
    assert all(torch.equal(a, b) for a, b in zip(saved, envs.policy.parameters(), strict=True))


def test_rloo_raises_the_reward_model_score_above_pi_ref(core16):
    """The default task, 64 envs, k = 4: about 20 iterations of 0.5 s lift fresh samples' mean rm_score."""
    envs = fresh_envs(core16, 64)
    before = evaluate_policy(envs, num_episodes=128, seed=123)
    agent = agents.make_agent(
        "reinforce", envs, {"baseline": "rloo", "samples_per_prompt": 4, "learning_rate": 1e-3}
    )
    agent.learn(20)
    after = evaluate_policy(envs, num_episodes=128, seed=123)
    assert after["rm_score"] > before["rm_score"] + 0.15, (before["rm_score"], after["rm_score"])


@pytest.mark.slow
def test_rloo_raises_the_gold_score_on_the_default_task():
    """Responses of up to 32 tokens, the default config's lr: gold rises well above pi_ref's in ~100 steps.

    The tests' reward model is the gold reward itself until a learned one lands; with a learned reward model
    this is the check that optimising the proxy also moves the gold score.
    """
    core = EnvCore(max_new_tokens=32)
    envs = text_env.TextGenVectorEnv(num_envs=64, core=core)
    before = evaluate_policy(envs, num_episodes=256, seed=123)
    agent = agents.make_agent("reinforce", envs)  # the default config
    agent.learn(100)
    after = evaluate_policy(envs, num_episodes=256, seed=123)
    assert after["gold_score"] > before["gold_score"] + 0.3, (before["gold_score"], after["gold_score"])
    assert 0 < after["kl"] < 20
