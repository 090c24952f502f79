"""Best-of-n's KL (rlhf_base.best_of_n): the exact law against enumerated draws, the estimate against it.

Beirami et al. (2024, arXiv:2401.01879): pi_n(y) = F(y)^n - F^-(y)^n, and log n - (n-1)/n is an upper bound
on KL(pi_n || pi), reached as pi becomes atomless and far off when pi is peaked.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from rlhf_base.best_of_n import best_of_n_kl_estimate, best_of_n_kl_exact, best_of_n_probs
from rlhf_base.maths import best_of_n_kl


def _enumerated_law(probs: list[float], rewards: list[float], n: int) -> np.ndarray:
    """pi_n by brute force: every n-tuple of draws, its probability, and the first of its best samples."""
    law = np.zeros(len(probs))
    for draws in itertools.product(range(len(probs)), repeat=n):
        best = max(range(n), key=lambda i: (rewards[draws[i]], -i))  # the first of tied maxima (argmax)
        law[draws[best]] += math.prod(probs[d] for d in draws)
    return law


def _kl(q: np.ndarray, p: np.ndarray) -> float:
    keep = q > 0
    return float((q[keep] * np.log(q[keep] / p[keep])).sum())


# --------------------------------------------------------------------------------------------------------
# The exact law and KL of a finite pi
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rewards", [[0.3, 2.0, -1.0, 1.0], [1.0, 2.0, 1.0, 1.0]], ids=["distinct", "ties"])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_the_law_is_that_of_the_first_best_of_n_draws(rewards, n):
    probs = [0.1, 0.2, 0.3, 0.4]
    law = best_of_n_probs(probs, rewards, n)
    np.testing.assert_allclose(law, _enumerated_law(probs, rewards, n), rtol=1e-12, atol=1e-15)
    assert best_of_n_kl_exact(probs, rewards, n) == pytest.approx(_kl(law, np.array(probs)), abs=1e-12)


def test_exact_kl_by_hand():
    # rewards rank the outcomes 1 < 2 < 0: F = 0.3, 0.5, 1 -> pi_2 = 0.09, 0.25 - 0.09, 1 - 0.25
    law = best_of_n_probs([0.5, 0.3, 0.2], [3.0, 1.0, 2.0], 2)
    np.testing.assert_allclose(law, [0.75, 0.09, 0.16], rtol=1e-12)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.09 * math.log(0.09 / 0.3) + 0.16 * math.log(0.16 / 0.2)
    assert best_of_n_kl_exact([0.5, 0.3, 0.2], [3.0, 1.0, 2.0], 2) == pytest.approx(expected, abs=1e-14)
    assert best_of_n_kl_exact([0.5, 0.3, 0.2], [3.0, 1.0, 2.0], 1) == 0.0  # best-of-1 is pi itself


@pytest.mark.parametrize("n", [2, 4, 16, 64])
def test_exact_kl_is_below_the_bound_and_meets_it_for_many_equiprobable_outcomes(n):
    m = 100_000
    uniform = best_of_n_kl_exact(np.full(m, 1 / m), np.arange(m), n)
    assert uniform <= best_of_n_kl(n)
    assert uniform == pytest.approx(best_of_n_kl(n), abs=n / m)  # the gap shrinks as 1/m
    probs = np.random.default_rng(n).dirichlet(np.ones(50))
    assert best_of_n_kl_exact(probs, np.arange(50), n) < best_of_n_kl(n)


def test_exact_kl_rejects_what_is_not_a_distribution():
    with pytest.raises(ValueError, match="sum to 1"):
        best_of_n_kl_exact([0.5, 0.4], [0.0, 1.0], 2)
    with pytest.raises(ValueError, match="n >= 1"):
        best_of_n_kl_exact([0.5, 0.5], [0.0, 1.0], 0)


@pytest.mark.parametrize("eps", [0.01, 0.2, 0.7])
def test_one_known_top_completion_over_atomless_mass_is_beirami_et_al_s_closed_form(eps):
    """The form of Beirami et al.'s estimator: an atom eps at the top over atomless mass, as the limit of
    ever finer atoms below it."""
    n, m = 8, 200_000
    probs = np.append(np.full(m, (1 - eps) / m), eps)
    below = (1 - eps) ** n
    closed = below * (math.log(n) + (n - 1) * math.log(1 - eps) - (n - 1) / n) + (1 - below) * math.log(
        (1 - below) / eps
    )
    assert best_of_n_kl_exact(probs, np.arange(m + 1), n) == pytest.approx(closed, abs=1e-4)


# --------------------------------------------------------------------------------------------------------
# The estimate from samples
# --------------------------------------------------------------------------------------------------------
def _pool(probs: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(len(probs), size=size, p=probs)


def test_the_estimate_is_the_exact_kl_once_every_outcome_is_seen():
    """(a): the plug-in holds the seen completions at their exact probabilities, so a pool that has seen
    them all gives the exact KL, and any pool gives at most the bound."""
    rng = np.random.default_rng(0)
    probs, rewards = rng.dirichlet(np.ones(6)), rng.permutation(6).astype(float)
    n = 4
    exact = best_of_n_kl_exact(probs, rewards, n)
    assert best_of_n_kl_estimate(np.log(probs), rewards, n) == pytest.approx(exact, abs=1e-12)
    errors = []
    for size in (1, 4, 16, 64, 1024):
        draws = _pool(probs, size, rng)
        estimate = best_of_n_kl_estimate(np.log(probs[draws]), rewards[draws], n, completions=list(draws))
        assert 0.0 <= estimate <= best_of_n_kl(n) + 1e-12
        errors.append(abs(estimate - exact))
    assert len(set(draws)) == 6 and errors[-1] == pytest.approx(0.0, abs=1e-12)
    assert errors == sorted(errors, reverse=True) and errors[0] > 1e-3  # from 1 sample (8e-3) down to 0


@pytest.mark.parametrize("n", [4, 16, 64])
def test_the_estimate_meets_the_bound_when_completions_are_distinct_and_improbable(n):
    """(b): m >> n equiprobable outcomes of distinct reward: the truth, and the estimate, are the bound."""
    m = 10**7
    rng = np.random.default_rng(n)
    draws = rng.choice(m, size=n, replace=False)
    estimate = best_of_n_kl_estimate(np.full(n, -math.log(m)), draws.astype(float), n)
    exact = best_of_n_kl_exact(np.full(10**5, 1e-5), np.arange(10**5), n)  # m = 1e5 is already within n/m
    assert estimate <= best_of_n_kl(n) + 1e-12
    assert estimate == pytest.approx(best_of_n_kl(n), abs=1e-4)
    assert exact == pytest.approx(best_of_n_kl(n), abs=n * 1e-5)


@pytest.mark.parametrize(
    "order, below", [("likely_scores_best", 0.4), ("random", 0.9)], ids=["likely-best", "random-order"]
)
def test_the_estimate_tracks_a_peaked_policy_far_below_the_bound(order, below):
    """(c): pi repeats a few likely completions (pi(y_i) ~ 2^-i). Its KL is well below the bound, most when
    the likeliest completion also scores best; the estimate from the n samples of each of many prompts
    (the agent's case) averages close to it, and never exceeds the bound."""
    n, m = 16, 40
    rng = np.random.default_rng(1)
    probs = 0.5 ** np.arange(1, m + 1)
    probs /= probs.sum()
    rewards = (
        -np.arange(m, dtype=float) if order == "likely_scores_best" else rng.permutation(m).astype(float)
    )
    exact = best_of_n_kl_exact(probs, rewards, n)
    assert exact < below * best_of_n_kl(n)  # log 2 = 0.693 and 1.615, against 1.835
    estimates = []
    for _ in range(300):
        draws = _pool(probs, n, rng)
        estimates.append(best_of_n_kl_estimate(np.log(probs[draws]), rewards[draws], n, list(draws)))
    assert max(estimates) <= best_of_n_kl(n) + 1e-12
    assert np.mean(estimates) == pytest.approx(exact, abs=0.05 * best_of_n_kl(n))


def test_the_unseen_mass_sits_beside_the_rarest_completions_by_hand():
    """a (pi 0.2, reward 1) and b (pi 0.3, reward 2); the unseen 0.5 is atomless, density ratio n u^(n-1)."""
    n = 4

    def g(u: float) -> float:  # an antiderivative of n u^(n-1) log(n u^(n-1)), 0 at u = 0
        return u**n * (math.log(n) + (n - 1) * (math.log(u) - 1 / n)) if u > 0 else 0.0

    def continuum(low: float, high: float) -> float:
        return g(high) - g(low)

    def atom(low: float, high: float) -> float:  # q log(q / p), q = F^n - (F^-)^n
        q = high**n - low**n
        return q * math.log(q / (high - low))

    # a drawn twice, b once: b is the rarest; the unseen 0.5 goes half between a and b, half above b
    expected = atom(0, 0.2) + continuum(0.2, 0.45) + atom(0.45, 0.75) + continuum(0.75, 1.0)
    twice = best_of_n_kl_estimate(np.log([0.2, 0.2, 0.3]), [1.0, 1.0, 2.0], n, ["a", "a", "b"])
    assert twice == pytest.approx(expected, abs=1e-14)
    # each drawn once: both rarest, halves on either side of each: 1/4 below a, 1/2 between, 1/4 above b
    expected = continuum(0, 0.125) + atom(0.125, 0.325) + continuum(0.325, 0.575) + atom(0.575, 0.875)
    expected += continuum(0.875, 1.0)
    assert best_of_n_kl_estimate(np.log([0.2, 0.3]), [1.0, 2.0], n) == pytest.approx(expected, abs=1e-14)


def test_duplicates_are_one_outcome_and_tied_rewards_one_block():
    lp = np.log([0.2, 0.3, 0.1])
    with pytest.raises(ValueError, match="sum to 1.2 > 1"):  # the same completion three times, unmerged
        best_of_n_kl_estimate(np.log([0.4, 0.4, 0.4]), [1.0, 1.0, 1.0], 4)
    # two distinct completions of equal reward are selected as one block of their total mass
    assert best_of_n_kl_estimate(lp[[0, 2]], [1.0, 1.0], 4) == pytest.approx(
        best_of_n_kl_estimate([math.log(0.3)], [1.0], 4), abs=1e-12
    )
    assert best_of_n_kl_estimate(lp, [1.0, 2.0, 3.0], 1) == 0.0  # best-of-1 is pi itself


def test_tiny_probabilities_keep_their_selection_mass():
    """A 40-token response can have probability 1e-40: F^n - (F - p)^n must not cancel to 0 in floats."""
    n = 16
    law = best_of_n_probs([0.5, 1e-40, 0.5], [0.0, 1.0, 2.0], n)
    assert law[1] == pytest.approx(n * 0.5 ** (n - 1) * 1e-40, rel=1e-9)  # d/dF F^n at F = 1/2, times p


def test_the_estimate_rejects_bad_input():
    with pytest.raises(ValueError, match="n >= 1"):
        best_of_n_kl_estimate([-1.0], [0.0], 0)
    with pytest.raises(ValueError, match="one length"):
        best_of_n_kl_estimate([-1.0, -2.0], [0.0], 2)
    with pytest.raises(ValueError, match="2 completion ids for 3 samples"):
        best_of_n_kl_estimate([-1.0, -2.0, -3.0], [0.0, 1.0, 2.0], 2, ["a", "b"])
