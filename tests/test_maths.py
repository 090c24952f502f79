"""Tests for ``rlhf_base.maths`` against hand computations (STYLE.md guideline 6, after SB3's ``test_gae.py``).

Padding positions deliberately hold junk (``JUNK``, or ``inf``) so that every test also checks that padding
cannot leak into a result.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_base.maths import (
    KL_ESTIMATORS,
    KL_GRANULARITIES,
    KL_PLACEMENTS,
    best_of_n_kl,
    clipped_surrogate,
    discounted_returns,
    entropy_from_logits,
    gae,
    kl_penalty,
    kl_per_token,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_baseline,
    sequence_kl,
)

JUNK = 9.0  # a value at padding that would change any result it leaked into


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def assert_close(actual: torch.Tensor, expected: list | float, atol: float = 1e-10) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0.0, atol=atol)


# Two right-padded rows of different lengths: row 0 has 3 valid tokens, row 1 has 2.
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)  # (B, T)


# ---------------------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------------------
def test_masked_sum_and_mean_by_hand():
    x = t([[1.0, 2.0, 3.0, JUNK], [4.0, 5.0, JUNK, JUNK]])
    assert_close(masked_sum(x, MASK), 15.0)
    assert_close(masked_sum(x, MASK, dim=-1), [6.0, 9.0])
    assert_close(masked_mean(x, MASK), 3.0)  # (1 + 2 + 3 + 4 + 5) / 5
    assert_close(masked_mean(x, MASK, dim=-1), [2.0, 4.5])
    assert_close(masked_mean(x, MASK.float(), dim=0), [2.5, 3.5, 3.0, 0.0])  # float mask; empty column -> 0


def test_masked_mean_ignores_inf_at_padding():
    x = t([[1.0, float("inf")], [2.0, float("nan")]])
    mask = torch.tensor([[1, 0], [1, 0]])
    assert_close(masked_mean(x, mask), 1.5)


def test_masked_var_by_hand():
    x = t([[1.0, 2.0, 3.0, JUNK]])
    mask = MASK[:1]
    assert_close(masked_var(x, mask), 1.0)  # ((1-2)^2 + 0 + (3-2)^2) / (3 - 1)
    assert_close(masked_var(x, mask, unbiased=False), 2.0 / 3.0)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([[1, 0, 0, 0]]))
    assert_close(masked_var(x, torch.tensor([[1, 0, 0, 0]]), unbiased=False), 0.0)


def test_masked_whiten_by_hand():
    x = t([[1.0, 2.0, 3.0, JUNK]])
    # mean 2, unbiased std 1 -> [-1, 0, 1], padding 0
    assert_close(masked_whiten(x, MASK[:1]), [[-1.0, 0.0, 1.0, 0.0]], atol=1e-7)
    # shift_mean=False only rescales: (x - 2) / 1 + 2
    assert_close(masked_whiten(x, MASK[:1], shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], atol=1e-7)


def test_masked_whiten_statistics_over_valid_positions():
    gen = torch.Generator().manual_seed(0)
    x = 3.0 + 5.0 * torch.randn(4, 7, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 5, 1])
    mask = torch.arange(7)[None, :] < lengths[:, None]  # (B, T)
    x[~mask] = 1e6
    whitened = masked_whiten(x, mask)
    valid = whitened[mask]
    assert abs(valid.mean().item()) < 1e-10
    assert abs(valid.std().item() - 1.0) < 1e-6
    assert (whitened[~mask] == 0).all()


# ---------------------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------------------
def test_kl_estimators_by_hand():
    log_ratio = torch.tensor([math.log(2.0), -math.log(2.0), 0.0], dtype=torch.float64)  # log pi - log ref
    ref_logprobs = torch.full_like(log_ratio, -1.5)
    logprobs = ref_logprobs + log_ratio
    ln2 = math.log(2.0)
    assert_close(kl_per_token(logprobs, ref_logprobs, "k1"), [ln2, -ln2, 0.0])
    assert_close(kl_per_token(logprobs, ref_logprobs, "k2"), [0.5 * ln2**2, 0.5 * ln2**2, 0.0])
    # k3 = (r - 1) - log r with r = ref / pi: r = 1/2 -> -1/2 + ln 2; r = 2 -> 1 - ln 2
    assert_close(kl_per_token(logprobs, ref_logprobs, "k3"), [ln2 - 0.5, 1.0 - ln2, 0.0])
    assert_close(kl_per_token(logprobs, ref_logprobs), [ln2, -ln2, 0.0])  # k1 by default


def test_kl_unknown_estimator():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_per_token(x, x, "k4")
    assert KL_ESTIMATORS == ("k1", "k2", "k3")


P = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
Q = torch.tensor([0.2, 0.3, 0.25, 0.25], dtype=torch.float64)


def exact_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True))


def test_kl_estimators_unbiased_in_exact_expectation():
    """E_p[k1] = E_p[k3] = KL(p || q) exactly; E_p[k2] is not (it is biased)."""
    kl = exact_kl(P, Q)
    assert kl > 0.1
    for estimator in ("k1", "k3"):
        assert_close((P * kl_per_token(P.log(), Q.log(), estimator)).sum(), kl, atol=1e-12)
    assert abs((P * kl_per_token(P.log(), Q.log(), "k2")).sum().item() - kl) > 1e-3


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_on_samples(estimator):
    """Sample means over tokens drawn from p approach their expectations (KL for k1, k3) within 5 std errors."""
    num_samples = 200_000
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.multinomial(P, num_samples, replacement=True, generator=gen)  # samples of pi = p
    logprobs = P.log()[tokens].view(1, -1)  # (1, N)
    ref_logprobs = Q.log()[tokens].view(1, -1)  # (1, N)
    kl = kl_per_token(logprobs, ref_logprobs, estimator)  # (1, N)

    k_exact = kl_per_token(P.log(), Q.log(), estimator)  # the estimator's value at each outcome
    mean = (P * k_exact).sum().item()
    std_error = math.sqrt(((P * k_exact**2).sum().item() - mean**2) / num_samples)
    if estimator != "k2":
        assert mean == pytest.approx(exact_kl(P, Q), abs=1e-12)
    assert abs(kl.mean().item() - mean) < 5 * std_error
    # sequence_kl over one long "sequence" is the sum of the same per-token estimates
    mask = torch.ones_like(kl, dtype=torch.bool)
    assert_close(sequence_kl(logprobs, ref_logprobs, mask, estimator), kl.sum(dim=-1))
    if estimator in ("k2", "k3"):
        assert (kl >= 0).all()


def test_sequence_kl_by_hand_with_junk_padding():
    # at padding log_ratio = -1e4, so k3's exp(-log_ratio) would overflow to inf if padding reached it
    logprobs = t([[-1.0, -2.0, -0.5, -1e4], [-1.0, -3.0, -1e4, -1e4]])
    ref_logprobs = t([[-1.5, -1.0, -0.5, 0.0], [-2.0, -2.0, 0.0, 0.0]])
    # log ratios: row 0 [0.5, -1, 0], row 1 [1, -1]
    assert_close(sequence_kl(logprobs, ref_logprobs, MASK), [-0.5, 0.0])
    assert_close(sequence_kl(logprobs, ref_logprobs, MASK, "k2"), [0.5 * (0.25 + 1.0), 0.5 * (1.0 + 1.0)])

    def k3(lr):
        return math.exp(-lr) - 1 + lr

    expected_k3 = [k3(0.5) + k3(-1.0) + k3(0.0), k3(1.0) + k3(-1.0)]
    logprobs.requires_grad_(True)
    seq_kl = sequence_kl(logprobs, ref_logprobs, MASK, "k3")
    assert_close(seq_kl.detach(), expected_k3)
    seq_kl.sum().backward()
    assert torch.isfinite(logprobs.grad).all()
    assert (logprobs.grad[~MASK] == 0).all()


def k3(log_ratio: float) -> float:
    return math.exp(-log_ratio) - 1 + log_ratio


def test_kl_penalty_by_hand_per_token_and_per_sequence():
    # log-ratios: row 0 [0.5, -1, 0] (sum -0.5), row 1 [1, -1] (sum 0); junk at padding would overflow k3
    logprobs = t([[-1.0, -2.0, -0.5, -1e4], [-1.0, -3.0, -1e4, -1e4]])
    ref_logprobs = t([[-1.5, -1.0, -0.5, 0.0], [-2.0, -2.0, 0.0, 0.0]])
    per_token = {
        "k1": [[0.5, -1.0, 0.0, 0.0], [1.0, -1.0, 0.0, 0.0]],
        "k2": [[0.125, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]],
        "k3": [[k3(0.5), k3(-1.0), 0.0, 0.0], [k3(1.0), k3(-1.0), 0.0, 0.0]],
    }
    # per sequence: k of the summed log-ratio (-0.5 and 0), at the last valid token (columns 2 and 1)
    per_sequence = {
        "k1": [[0.0, 0.0, -0.5, 0.0], [0.0, 0.0, 0.0, 0.0]],
        "k2": [[0.0, 0.0, 0.125, 0.0], [0.0, 0.0, 0.0, 0.0]],
        "k3": [[0.0, 0.0, k3(-0.5), 0.0], [0.0, 0.0, 0.0, 0.0]],
    }
    for estimator in KL_ESTIMATORS:
        assert_close(kl_penalty(logprobs, ref_logprobs, MASK, estimator, "token"), per_token[estimator])
        assert_close(kl_penalty(logprobs, ref_logprobs, MASK, estimator, "sequence"), per_sequence[estimator])
        # per token, each row sums to sequence_kl's estimate
        assert_close(
            kl_penalty(logprobs, ref_logprobs, MASK, estimator).sum(-1),
            sequence_kl(logprobs, ref_logprobs, MASK, estimator),
        )
    assert KL_PLACEMENTS == ("reward", "loss") and KL_GRANULARITIES == ("token", "sequence")


def test_kl_penalty_at_the_last_token_of_a_row_with_a_nonzero_sum():
    # Row 1 with log-ratios [1, 0.5] (sum 1.5): its sequence term sits in column 1, the last valid one.
    logprobs = t([[-1.0, -2.0, -0.5, JUNK], [-1.0, -1.5, JUNK, JUNK]])
    ref_logprobs = t([[-1.5, -1.0, -0.5, JUNK], [-2.0, -2.0, JUNK, JUNK]])
    assert_close(
        kl_penalty(logprobs, ref_logprobs, MASK, "k2", "sequence"), [[0, 0, 0.125, 0], [0, 1.125, 0, 0]]
    )


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_kl_penalty_placement_decides_what_is_differentiated(granularity):
    """'reward' is detached (paid as reward); 'loss' differentiates through log pi, by hand:
    d k1/dl = 1, d k2/dl = l, d k3/dl = 1 - exp(-l); per token at its own log-prob, per sequence at every
    token of the response with l the summed log-ratio; never at padding."""
    ref_logprobs = t([[-1.5, -1.0, -0.5, 0.0], [-2.0, -2.0, 0.0, 0.0]])
    derivatives = {"k1": lambda x: 1.0, "k2": lambda x: x, "k3": lambda x: 1 - math.exp(-x)}
    for estimator, d in derivatives.items():
        logprobs = t([[-1.0, -2.0, -0.5, -1e4], [-1.0, -3.0, -1e4, -1e4]]).requires_grad_(True)
        detached = kl_penalty(logprobs, ref_logprobs, MASK, estimator, granularity, "reward")
        assert not detached.requires_grad
        kl_penalty(logprobs, ref_logprobs, MASK, estimator, granularity, "loss").sum().backward()
        if granularity == "token":  # log-ratios [0.5, -1, 0] and [1, -1]
            expected = [[d(0.5), d(-1.0), d(0.0), 0.0], [d(1.0), d(-1.0), 0.0, 0.0]]
        else:  # summed log-ratios -0.5 and 0
            expected = [[d(-0.5)] * 3 + [0.0], [d(0.0)] * 2 + [0.0, 0.0]]
        assert_close(logprobs.grad, expected)


def test_kl_penalty_unknown_choices_name_the_valid_ones():
    x, mask = torch.zeros(1, 2), torch.ones(1, 2)
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'; expected one of \('k1', 'k2', 'k3'\)"):
        kl_penalty(x, x, mask, "k4")
    with pytest.raises(ValueError, match=r"unknown KL granularity 'word'; expected one of \('token', 'seq"):
        kl_penalty(x, x, mask, "k1", "word")
    with pytest.raises(ValueError, match=r"unknown KL placement 'advantage'; expected one of \('reward', 'l"):
        kl_penalty(x, x, mask, "k1", "token", "advantage")


# ---------------------------------------------------------------------------------------------------------
# GAE and returns
# ---------------------------------------------------------------------------------------------------------
# Reward at EOS only; junk at padding in rewards and values.
REWARDS = t([[0.0, 0.0, 1.0, JUNK], [0.0, 2.0, JUNK, JUNK]])  # (B, T)
VALUES = t([[0.5, 0.6, 0.7, JUNK], [0.2, 0.4, JUNK, JUNK]])  # (B, T)


def test_gae_by_hand_gamma_1():
    # gamma = 1, lam = 0.95. delta_t = r_t + V_{t+1} - V_t with V after the last token = 0.
    # Row 0: delta_2 = 1 + 0 - 0.7 = 0.3, delta_1 = 0 + 0.7 - 0.6 = 0.1, delta_0 = 0 + 0.6 - 0.5 = 0.1
    #        A_2 = 0.3, A_1 = 0.1 + 0.95 * 0.3 = 0.385, A_0 = 0.1 + 0.95 * 0.385 = 0.46575
    # Row 1: delta_1 = 2 + 0 - 0.4 = 1.6, delta_0 = 0 + 0.4 - 0.2 = 0.2
    #        A_1 = 1.6, A_0 = 0.2 + 0.95 * 1.6 = 1.72
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=0.95)
    assert_close(advantages, [[0.46575, 0.385, 0.3, 0.0], [1.72, 1.6, 0.0, 0.0]])
    # returns = A + V: row 0 [0.96575, 0.985, 1.0], row 1 [1.92, 2.0]
    assert_close(returns, [[0.96575, 0.985, 1.0, 0.0], [1.92, 2.0, 0.0, 0.0]])


def test_gae_by_hand_gamma_09_lam_08():
    # gamma = 0.9, lam = 0.8, so gamma * lam = 0.72.
    # Row 0: delta_2 = 1 - 0.7 = 0.3, delta_1 = 0.9 * 0.7 - 0.6 = 0.03, delta_0 = 0.9 * 0.6 - 0.5 = 0.04
    #        A_2 = 0.3, A_1 = 0.03 + 0.72 * 0.3 = 0.246, A_0 = 0.04 + 0.72 * 0.246 = 0.21712
    # Row 1: delta_1 = 2 - 0.4 = 1.6, delta_0 = 0.9 * 0.4 - 0.2 = 0.16
    #        A_1 = 1.6, A_0 = 0.16 + 0.72 * 1.6 = 1.312
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.8)
    assert_close(advantages, [[0.21712, 0.246, 0.3, 0.0], [1.312, 1.6, 0.0, 0.0]])
    assert_close(returns, [[0.71712, 0.846, 1.0, 0.0], [1.512, 2.0, 0.0, 0.0]])


def test_gae_rows_are_independent_of_padding_and_each_other():
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.8)
    alone_adv, alone_ret = gae(REWARDS[1:, :2], VALUES[1:, :2], MASK[1:, :2], gamma=0.9, lam=0.8)
    assert_close(advantages[1:, :2], alone_adv)
    assert_close(returns[1:, :2], alone_ret)
    # different junk at padding changes nothing
    other_adv, _ = gae(REWARDS.masked_fill(~MASK, -100.0), VALUES.masked_fill(~MASK, 50.0), MASK, 0.9, 0.8)
    assert_close(other_adv, advantages)


def test_gae_limits_lam_1_and_lam_0():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    values = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    # lam = 1: Monte-Carlo, returns are the discounted reward-to-go whatever the values
    _, returns = gae(rewards, values, MASK, gamma=0.9, lam=1.0)
    assert_close(returns, discounted_returns(rewards, MASK, gamma=0.9))
    # lam = 0: one-step TD error, row 0 t=1: r_1 + 0.9 V_2 - V_1; row 1 t=1 (last): r_1 - V_1
    advantages, _ = gae(rewards, values, MASK, gamma=0.9, lam=0.0)
    assert_close(advantages[0, 1], rewards[0, 1] + 0.9 * values[0, 2] - values[0, 1])
    assert_close(advantages[1, 1], rewards[1, 1] - values[1, 1])


def test_discounted_returns_by_hand():
    rewards = t([[0.1, 0.0, 1.0, JUNK], [0.0, 2.0, JUNK, JUNK]])
    # gamma = 1: row 0 [0.1 + 0 + 1, 0 + 1, 1] = [1.1, 1, 1]; row 1 [2, 2]
    assert_close(discounted_returns(rewards, MASK), [[1.1, 1.0, 1.0, 0.0], [2.0, 2.0, 0.0, 0.0]])
    # gamma = 0.9: row 0 G_2 = 1, G_1 = 0 + 0.9 * 1 = 0.9, G_0 = 0.1 + 0.9 * 0.9 = 0.91; row 1 [1.8, 2]
    assert_close(discounted_returns(rewards, MASK, gamma=0.9), [[0.91, 0.9, 1.0, 0.0], [1.8, 2.0, 0.0, 0.0]])


# ---------------------------------------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------------------------------------
def test_ppo_policy_loss_by_hand():
    clip_range = 0.2
    ratios = [1.1, 1.5, 0.5, 0.5]  # inside; above 1.2; below 0.8; below 0.8
    advantages = t([[1.0, 2.0, -1.0, 1.0, JUNK]])
    old_logprobs = t([[-1.0, -2.0, -0.5, -3.0, -1.0]])
    # the junk log-ratio 1e3 at padding would overflow exp() and turn gradients into nan if not masked first
    logprobs = (old_logprobs + t([[math.log(r) for r in ratios] + [1e3]])).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   t0: max(-1.1, -1.1) = -1.1
    #   t1: max(-3.0, -2.4) = -2.4  (clipped: no gain from pushing r above 1.2)
    #   t2: max(0.5, 0.8) = 0.8     (clipped: no gain from pushing r below 0.8)
    #   t3: max(-0.5, -0.8) = -0.5  (unclipped: the pessimistic term is the raw one)
    # loss = (-1.1 - 2.4 + 0.8 - 0.5) / 4 = -0.8
    loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range)
    assert_close(loss.detach(), -0.8)
    assert stats["clip_fraction"] == pytest.approx(0.75)  # t1, t2, t3 have |r - 1| > 0.2
    expected_kl = sum((r - 1) - math.log(r) for r in ratios) / 4
    assert stats["approx_kl"] == pytest.approx(expected_kl, abs=1e-12)
    assert isinstance(stats["clip_fraction"], float) and isinstance(stats["approx_kl"], float)

    # d loss / d logprob_t = -A_t r_t / 4 where unclipped, 0 where clipped or padding
    loss.backward()
    assert_close(logprobs.grad, [[-1.0 * 1.1 / 4, 0.0, 0.0, -1.0 * 0.5 / 4, 0.0]])


def test_clipped_surrogate_per_token_by_hand_and_ppo_averages_it():
    # The case above, token by token: max(-A r, -A clip(r, 0.8, 1.2)) = [-1.1, -2.4, 0.8, -0.5], 0 at padding.
    ratios = [1.1, 1.5, 0.5, 0.5]
    advantages = t([[1.0, 2.0, -1.0, 1.0, JUNK]])
    old_logprobs = t([[-1.0, -2.0, -0.5, -3.0, -1.0]])
    logprobs = old_logprobs + t([[math.log(r) for r in ratios] + [1e3]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    losses, stats = clipped_surrogate(logprobs, old_logprobs, advantages, mask, 0.2)
    assert_close(losses, [[-1.1, -2.4, 0.8, -0.5, 0.0]])
    loss, ppo_stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)
    assert_close(loss, losses.sum() / 4)
    assert stats == ppo_stats


def test_ppo_policy_loss_on_policy_is_minus_mean_advantage():
    advantages = t([[1.0, -3.0, JUNK]])
    logprobs = t([[-1.0, -2.0, -3.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = ppo_policy_loss(logprobs, logprobs, advantages, mask, 0.2)
    assert_close(loss, 1.0)  # -(1 - 3) / 2
    assert stats == {"clip_fraction": 0.0, "approx_kl": 0.0}


def test_ppo_value_loss_by_hand():
    values = t([[1.0, 2.0, 1.9, JUNK]])
    old_values = t([[0.9, 1.0, 1.0, JUNK]])
    returns = t([[1.5, 1.5, 2.0, JUNK]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # unclipped (V - R)^2: [0.25, 0.25, 0.01] -> 0.5 * 0.51 / 3 = 0.085
    assert_close(ppo_value_loss(values, old_values, returns, mask, None), 0.085)
    # clipped V within old +- 0.2: [1.0, 1.2, 1.2] -> (V_clip - R)^2 = [0.25, 0.09, 0.64]
    # max per token: [0.25, 0.25, 0.64] -> 0.5 * 1.14 / 3 = 0.19
    assert_close(ppo_value_loss(values, old_values, returns, mask, 0.2), 0.19)


# ---------------------------------------------------------------------------------------------------------
# RLOO
# ---------------------------------------------------------------------------------------------------------
def test_rloo_baseline_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    # prompt 0: (2 + 3) / 2, (1 + 3) / 2, (1 + 2) / 2; prompt 1 likewise
    assert_close(rloo_baseline(rewards, 3), [2.5, 2.0, 1.5, 25.0, 20.0, 15.0], atol=1e-6)
    # k = 2: each sample's baseline is its sibling
    assert_close(rloo_baseline(rewards, 2), [2.0, 1.0, 10.0, 3.0, 30.0, 20.0], atol=1e-6)


@pytest.mark.parametrize("k", [0, 1, 4])
def test_rloo_baseline_rejects_bad_k(k):
    with pytest.raises(ValueError, match=f"B=6 and k={k}"):
        rloo_baseline(torch.arange(6.0), k)


def test_rloo_baseline_rejects_2d_rewards():
    with pytest.raises(ValueError, match="shape"):
        rloo_baseline(torch.zeros(2, 3), 3)


# ---------------------------------------------------------------------------------------------------------
# Logits
# ---------------------------------------------------------------------------------------------------------
def test_entropy_of_uniform_is_log_vocab():
    vocab_size = 11
    logits = torch.full((2, 3, vocab_size), 7.0, dtype=torch.float64)  # any constant is uniform
    assert_close(entropy_from_logits(logits), [[math.log(vocab_size)] * 3] * 2)


def test_entropy_by_hand_and_stability():
    # p = [1/2, 1/4, 1/4]: H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2, whatever shift the logits carry
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    assert_close(entropy_from_logits(p.log() + 1000.0), 1.5 * math.log(2.0), atol=1e-9)
    # a banned token (-inf logit) contributes 0, and gradients stay finite
    logits = torch.tensor([0.0, 0.0, float("-inf")], requires_grad=True)
    entropy = entropy_from_logits(logits)
    entropy.backward()
    assert_close(entropy.detach(), math.log(2.0), atol=1e-6)
    assert torch.isfinite(logits.grad).all()


def test_logprobs_from_logits_against_manual_log_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)  # (B, T, V)
    tokens = torch.randint(0, 5, (2, 3), generator=gen)  # (B, T)
    expected = [
        [
            logits[b, i, tokens[b, i]].item() - math.log(sum(math.exp(v) for v in logits[b, i].tolist()))
            for i in range(3)
        ]
        for b in range(2)
    ]
    assert_close(logprobs_from_logits(logits, tokens), expected)


# ---------------------------------------------------------------------------------------------------------
# Best-of-n
# ---------------------------------------------------------------------------------------------------------
def test_best_of_n_kl_by_hand():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2.0) - 0.5)
    assert best_of_n_kl(4) == pytest.approx(math.log(4.0) - 0.75)
    with pytest.raises(ValueError, match="n >= 1"):
        best_of_n_kl(0)


@pytest.mark.parametrize("n", [2, 4, 16])
def test_best_of_n_kl_bounds_the_exact_kl(n):
    """With M equally likely outcomes of distinct reward, best-of-n picks the i-th ranked one with
    probability (i/M)^n - ((i-1)/M)^n; its exact KL to uniform is below the formula and tends to it."""
    num_outcomes = 10_000
    i = torch.arange(1, num_outcomes + 1, dtype=torch.float64)
    best_probs = (i / num_outcomes) ** n - ((i - 1) / num_outcomes) ** n
    kl = (best_probs * torch.log(best_probs * num_outcomes)).sum().item()
    assert kl <= best_of_n_kl(n)
    assert kl == pytest.approx(best_of_n_kl(n), abs=5e-3)
