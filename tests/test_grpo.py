"""GRPO and Dr. GRPO: the group advantages and the loss by hand, one iteration's inputs against a hand
computation, the config's errors, and that both train and learn."""

from __future__ import annotations

import csv
import math
import statistics

import pytest
import torch

import agents
import agents.grpo
import text_env
from agents.base import METRIC_KEYS, evaluate_policy, take_rows
from agents.grpo import DrGRPOAgent, DrGRPOConfig, GRPOAgent, GRPOConfig, group_advantages, grpo_loss
from rlhf_base.config import ConfigError
from tests.helpers import fresh_envs, params
from tests.test_agent_wiring import BETA, TOL, hand_forward, moved_envs, snapshot, spy
from text_env.config import EnvConfig
from text_env.core import EnvCore

LN2 = math.log(2.0)
JUNK = 9.0  # at padding: would change any result it leaked into


@pytest.fixture(scope="module")
def core8() -> EnvCore:
    """Our own core (responses of at most 8 tokens, beta 0.3): training here never touches other tests."""
    return EnvCore(max_new_tokens=8, beta=BETA)


# ---------------------------------------------------------------------------------------------------------
# Advantages and loss by hand
# ---------------------------------------------------------------------------------------------------------
def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0])  # groups of 2: (1, 0) and (3, 2)
    # Group means 0.5 and 2.5; unbiased std of each: sqrt((0.5^2 + 0.5^2) / 1) = sqrt(0.5).
    grpo = group_advantages(rewards, 2, scale=True, eps=1e-4)
    torch.testing.assert_close(grpo, torch.tensor([0.5, -0.5, 0.5, -0.5]) / (math.sqrt(0.5) + 1e-4))
    dr = group_advantages(rewards, 2, scale=False)
    torch.testing.assert_close(dr, torch.tensor([0.5, -0.5, 0.5, -0.5]))
    # Groups of 4 with different spreads: the std scales each group on its own, Dr. GRPO keeps the scale.
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 1.0, 1.0])
    centred = [-2.0, -1.0, 0.0, 3.0, -0.5, -0.5, 0.5, 0.5]  # means 3 and 0.5
    stds = [math.sqrt(14 / 3)] * 4 + [math.sqrt(1 / 3)] * 4  # unbiased: (4+1+0+9)/3 and (4 * 0.25)/3
    torch.testing.assert_close(
        group_advantages(rewards, 4, True, 0.0), torch.tensor(centred) / torch.tensor(stds)
    )
    torch.testing.assert_close(group_advantages(rewards, 4, False), torch.tensor(centred))
    # A group whose rewards are all equal teaches nothing: advantages 0, finite.
    torch.testing.assert_close(group_advantages(torch.tensor([2.0, 2.0]), 2), torch.zeros(2))
    with pytest.raises(ValueError, match="k >= 2 dividing B"):
        group_advantages(torch.ones(6), 4)


def loss_case() -> tuple[torch.Tensor, ...]:
    """Two responses of unequal length, on-policy (ratio 1), with known log-ratios l = log pi - log pi_ref.

    Row 0: one token, l = ln 2, advantage +1. Row 1: three tokens, l = (0, -ln 2, ln 2), advantage -1.
    k3(l) = exp(-l) - 1 + l: k3(ln 2) = ln 2 - 1/2, k3(0) = 0, k3(-ln 2) = 1 - ln 2.
    """
    logprobs = torch.tensor([[-1.0, JUNK, JUNK], [-2.0, -1.5, -0.5]], dtype=torch.float64, requires_grad=True)
    log_ratio = torch.tensor([[LN2, 0.0, 0.0], [0.0, -LN2, LN2]], dtype=torch.float64)
    ref_logprobs = logprobs.detach() - log_ratio
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    return logprobs, logprobs.detach().clone(), ref_logprobs, advantages, mask


def test_grpo_loss_by_hand_with_the_k3_term_and_per_response_length_normalisation():
    logprobs, old, ref, adv, mask = loss_case()
    beta = 0.5
    # Per token L = -A * ratio + beta * k3: row 0 [-1 + (ln 2 - 1/2) / 2]; row 1 [1, 1 + (1 - ln 2) / 2,
    # 1 + (ln 2 - 1/2) / 2]. GRPO: the mean of each row's token mean: row 1's is 1 + (1/2) / 2 / 3 = 1 + 1/12.
    row0, row1 = -1 + beta * (LN2 - 0.5), 1 + 1 / 12
    loss, stats = grpo_loss(logprobs, old, ref, adv, mask, 0.2, beta, "grpo")
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-12)
    assert stats["clip_fraction"] == 0.0 and stats["approx_kl"] == pytest.approx(0.0, abs=1e-12)
    assert stats["kl_loss"] == pytest.approx(((LN2 - 0.5) + 0.5 / 3) / 2, abs=1e-12)
    loss.backward()
    # d/d logp: -A (ratio 1) + beta * (1 - exp(-l)), over |o_i| and the 2 rows; padding gets nothing.
    grad0 = (-1 + beta * (1 - 0.5)) / 1 / 2
    grad1 = [(1 + beta * (1 - 1)) / 3 / 2, (1 + beta * (1 - 2)) / 3 / 2, (1 + beta * (1 - 0.5)) / 3 / 2]
    torch.testing.assert_close(logprobs.grad, torch.tensor([[grad0, 0.0, 0.0], grad1], dtype=torch.float64))


def test_dr_grpo_loss_sums_tokens_over_a_constant_and_differs_from_grpo_on_unequal_lengths():
    logprobs, old, ref, adv, mask = loss_case()
    beta = 0.5
    # Dr. GRPO: each row's token sum over N = 4 (the env's max_new_tokens, not the mask's width 3):
    # row 0 (-1 + (ln 2 - 1/2) / 2) / 4, row 1 (3 + ((1 - ln 2) + (ln 2 - 1/2)) / 2) / 4 = 3.25 / 4.
    row0, row1 = (-1 + beta * (LN2 - 0.5)) / 4, 3.25 / 4
    dr, _ = grpo_loss(logprobs, old, ref, adv, mask, 0.2, beta, "dr_grpo", max_new_tokens=4)
    assert dr.item() == pytest.approx((row0 + row1) / 2, abs=1e-12)
    grpo, _ = grpo_loss(logprobs, old, ref, adv, mask, 0.2, beta, "grpo")
    assert abs(dr.item() - grpo.item()) > 0.1
    # Equal lengths of N tokens: the two normalisations agree.
    full = torch.ones_like(mask)
    same = [
        grpo_loss(logprobs, old, ref, adv, full, 0.2, beta, v, max_new_tokens=3)[0]
        for v in ("grpo", "dr_grpo")
    ]
    torch.testing.assert_close(same[0], same[1])


def test_grpo_loss_clips_the_ratio_off_policy():
    # One token, A = +1, ratio 1.5 > 1 + 0.2: the clipped term -1.2 is the pessimistic one, no gradient.
    logprobs = torch.tensor([[math.log(1.5)]], requires_grad=True)
    old, ref = torch.zeros(1, 1), torch.tensor([[math.log(1.5)]])  # l = 0: k3 = 0
    loss, stats = grpo_loss(logprobs, old, ref, torch.ones(1), torch.ones(1, 1), 0.2, 0.5, "grpo")
    assert loss.item() == pytest.approx(-1.2) and stats["clip_fraction"] == 1.0
    loss.backward()
    assert logprobs.grad.abs().item() == pytest.approx(0.0, abs=1e-7)  # k3's gradient 1 - exp(0) = 0 too


# ---------------------------------------------------------------------------------------------------------
# One iteration, by hand (as tests/test_agent_wiring.py does for PPO and REINFORCE)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["grpo", "dr_grpo"])
def test_grpo_update_sees_the_hand_computed_advantages_and_loss(core8, monkeypatch, name):
    envs = moved_envs(core8)  # policy off pi_ref: KL far from 0, beta 0.3
    k = 4
    agent = agents.make_agent(name, envs, {"samples_per_prompt": k})
    policy = snapshot(envs.policy)  # before the update
    rollout = spy(monkeypatch, text_env, "rollout")
    loss_fn = spy(monkeypatch, agents.grpo, "grpo_loss")
    minibatch = spy(monkeypatch, agents.grpo, "take_rows")  # which rows, in which (shuffled) order

    (metrics,) = agent.learn(1)

    (batch,) = rollout.results
    groups = batch.prompt_indices.reshape(-1, k)
    assert (groups == groups[:, :1]).all(), "k consecutive samples of each prompt"
    assert batch.kl.abs().mean() > 0.05, "the setup needs a KL far from 0 to tell rm_score from the reward"
    scores = batch.rm_scores.tolist()  # GRPO's reward: the reward model's alone (the KL is in the loss)
    want = []
    for g in range(0, len(scores), k):
        group = scores[g : g + k]
        mean, std = statistics.fmean(group), statistics.stdev(group)
        want += [(r - mean) / (std + 1e-4) if name == "grpo" else r - mean for r in group]
    (call,), (taken,) = loss_fn.calls, minibatch.calls
    order = taken["rows"]  # one minibatch of every row, shuffled
    assert sorted(order.tolist()) == list(range(len(scores)))
    torch.testing.assert_close(call["advantages"], torch.tensor(want)[order], **TOL)
    assert (call["beta"], call["variant"], call["max_new_tokens"]) == (BETA, name, 8)
    torch.testing.assert_close(call["ref_logprobs"], batch.ref_logprobs[order])
    torch.testing.assert_close(call["mask"], batch.response_mask[order])
    # The loss from its definition: on-policy (one step), L_it = -A_i + beta * k3(log pi - log pi_ref).
    rows = []
    for i in range(len(scores)):
        logprobs = hand_forward(policy, None, batch, i)[0].double()
        ref = batch.ref_logprobs[i, : len(logprobs)].double()
        tokens = -want[i] + BETA * (torch.exp(ref - logprobs) - (ref - logprobs) - 1)
        rows.append(float(tokens.mean() if name == "grpo" else tokens.sum() / 8))
    assert metrics["loss"] == pytest.approx(statistics.fmean(rows), rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Registry, config and errors
# ---------------------------------------------------------------------------------------------------------
def test_grpo_and_dr_grpo_are_registered_with_their_variant(core8):
    assert {"grpo", "dr_grpo"} <= set(agents.available())
    envs = text_env.TextGenVectorEnv(num_envs=4, core=core8)
    grpo, dr = agents.make_agent("grpo", envs), agents.make_agent("dr_grpo", envs)
    assert isinstance(grpo, GRPOAgent) and grpo.config.variant == "grpo" and grpo.name == "grpo"
    assert isinstance(dr, DrGRPOAgent) and dr.config.variant == "dr_grpo" and dr.name == "dr_grpo"
    assert isinstance(dr.config, DrGRPOConfig) and isinstance(grpo, agents.Agent)
    assert GRPOConfig().variant == "grpo"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"samples_per_prompt": 1}, r"GRPOConfig\.samples_per_prompt = 1 .*: must be >= 2"),
        ({"clip_range": 0.0}, r"GRPOConfig\.clip_range = 0\.0 .*: must be > 0"),
        ({"epochs": 0}, r"GRPOConfig\.epochs = 0 .*: must be >= 1"),
        ({"num_minibatches": 0}, r"GRPOConfig\.num_minibatches = 0 .*: must be >= 1"),
        ({"learning_rate": -1e-3}, r"GRPOConfig\.learning_rate = -0\.001 .*: must be > 0"),
        ({"variant": "drgrpo"}, "variant"),
        ({"beta": 0.1}, "the env owns the KL coefficient"),
        ({"k": 4}, "'k' was renamed to 'samples_per_prompt'"),
    ],
)
def test_bad_config_values_are_errors_naming_the_key(core8, overrides, message):
    envs = text_env.TextGenVectorEnv(num_envs=4, core=core8)
    with pytest.raises(ConfigError, match=message):
        agents.make_agent("grpo", envs, overrides)


def test_num_envs_not_divisible_by_samples_per_prompt_is_a_clear_error(core8):
    envs = text_env.TextGenVectorEnv(num_envs=6, core=core8)
    with pytest.raises(ValueError, match="num_envs=6 is not divisible by samples_per_prompt=4"):
        agents.make_agent("dr_grpo", envs, {"samples_per_prompt": 4})


def test_take_rows_indexes_every_per_row_field(core8):
    batch = text_env.rollout(text_env.TextGenVectorEnv(num_envs=4, core=core8), seed=0)
    rows = torch.tensor([2, 0])
    part = take_rows(batch, rows)
    assert part.prompts == [batch.prompts[2], batch.prompts[0]] and part.responses[0] == batch.responses[2]
    assert part.prompt_indices.tolist() == batch.prompt_indices[[2, 0]].tolist()
    for field in ("input_ids", "response_mask", "logprobs", "ref_logprobs", "rewards", "kl"):
        assert torch.equal(getattr(part, field), getattr(batch, field)[rows])
    assert part.response_start == batch.response_start


# ---------------------------------------------------------------------------------------------------------
# Behaviour
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        {"samples_per_prompt": 2},
        {"samples_per_prompt": 4, "variant": "dr_grpo"},
        {"samples_per_prompt": 2, "epochs": 2, "num_minibatches": 2},
    ],
    ids=["grpo", "dr_grpo", "two_epochs_two_minibatches"],
)
def test_an_iteration_is_finite_and_trains_every_parameter(core8, config):
    envs = fresh_envs(core8, 8)
    agent = agents.make_agent("grpo", envs, {"learning_rate": 1e-3, **config})
    before = params(envs.policy)
    history = agent.learn(2)
    assert [m["iteration"] for m in history] == [1.0, 2.0]
    for m in history:
        assert set(METRIC_KEYS) | {"loss", "kl_objective", "clip_fraction", "advantage_std"} <= set(m)
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values()), m
        assert m["kl_objective"] >= 0  # k3 is never negative
    changed = [not torch.equal(a, b) for a, b in zip(before, envs.policy.parameters(), strict=True)]
    assert all(changed), f"{changed.count(False)} parameter tensors did not change"
    if config.get("epochs", 1) > 1:
        assert history[-1]["clip_fraction"] > 0 or history[-1]["approx_kl"] > 0  # later steps off-policy


@pytest.mark.parametrize("name", ["grpo", "dr_grpo"])
def test_grpo_raises_the_reward_model_score_above_pi_ref(name):
    """The default task, 64 envs (16 groups of 4), 16-token responses: 10 iterations (~1 s each) lift fresh
    samples' mean rm_score (seed 0: from -0.10 to 0.24 for GRPO, 0.18 for Dr. GRPO)."""
    core = EnvCore(max_new_tokens=16)
    envs = fresh_envs(core, 64)
    before = evaluate_policy(envs, num_episodes=128, seed=123)
    agent = agents.make_agent(name, envs, {"learning_rate": 1e-3})
    agent.learn(10)
    after = evaluate_policy(envs, num_episodes=128, seed=123)
    assert after["rm_score"] > before["rm_score"] + 0.15, (before["rm_score"], after["rm_score"])


def test_the_critic_free_agents_run_in_a_sweep_and_its_report(tmp_path):
    """GRPO, Dr. GRPO, ReMax and REINFORCE++ through a sweep (worker process, CSVs) and the report."""
    from rlhf_gym.report import make_report
    from rlhf_gym.sweep import SweepConfig, run_sweep

    names = ["grpo", "dr_grpo", "remax", "reinforce_pp"]
    config = SweepConfig(
        agents=names,
        seeds=[0],
        env=EnvConfig(max_new_tokens=6, num_envs=4),
        overrides=["agent.iterations=2", "grpo.samples_per_prompt=2", "dr_grpo.samples_per_prompt=2"],
        eval_episodes=4,
        workers=1,
        runs_root=str(tmp_path),
        name="critic_free",
    )
    run_dir = run_sweep(config, progress=False)
    with open(run_dir / "results.csv", newline="") as f:
        rows = {r["agent"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(names)
    for row in rows.values():
        assert row["learns"] == "True" and row["iterations"] == "2"
        assert all(math.isfinite(float(row[key])) for key in ("rm_score", "kl", "reward", "length"))
    text = make_report(run_dir)["report"].read_text()
    assert all(f"| {name} |" in text for name in names)
