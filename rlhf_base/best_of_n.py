"""Best-of-n's distribution and its KL to the sampling policy, exactly on a finite space and estimated.

Best-of-n draws n samples from pi and keeps the one of highest reward. Beirami et al. (2024, "Theoretical
guarantees on the best-of-n alignment policy", arXiv:2401.01879) derive its distribution: with outcomes
ranked by reward, F(y) = P_pi(r(Y) <= r(y)) and F^-(y) = P_pi(r(Y) < r(y)),

    pi_n(y) = F(y)^n - F^-(y)^n                                      (y of a reward no other outcome has)

so KL(pi_n || pi) = sum_y pi_n(y) log(pi_n(y) / pi(y)). They prove the formula everyone quotes,
``log n - (n - 1) / n`` (:func:`rlhf_base.maths.best_of_n_kl`), is an upper bound on it for every pi, reached
only as pi becomes atomless (every outcome of vanishing probability, rewards distinct); a pi that puts
real mass on a few completions has a far smaller KL. Outcomes of equal reward are one block: the argmax
keeps the first of the tied samples, an independent draw from pi restricted to the block, so the block is
selected with probability F^n - (F^-)^n and shared in proportion to pi, and only the block's total
enters the KL.

:func:`best_of_n_kl_estimate` estimates the KL for a language model, where pi cannot be enumerated but the
probability of each sampled completion is known exactly (its sequence log-prob). It is the exact KL of a
plug-in reference: the distinct completions seen, at their own probabilities, and the unseen mass U = 1 -
(their sum) as an atomless continuum. Its properties, which `tests/test_best_of_n_kl.py` checks:

* It never exceeds ``log n - (n - 1) / n``: it is the exact KL of a distribution, and the bound holds for
  every distribution.
* It equals the bound when U = 1 (every completion seen is improbable: the regime where the bound is tight
  for the true pi too), and the exact KL when U = 0 (every completion of non-zero probability was seen).
* Its only error is in U, whose place in reward order no sample shows. It is put where the rarest
  completions seen are (Good-Turing's idea: the unseen resemble what was seen once), half below and half
  above each one's reward; when all are rare (every completion distinct) that is nearly even, as the
  n + 1 spacings of n continuous draws share the mass in expectation. Were U where it is put, the estimate would err only upward: the true unseen completions
  cut each gap's continuum into consecutive pieces, and best-of-n commutes with merging outcomes adjacent
  in reward order, so by data processing the truth's KL is the smaller. Misplacing U can err either way.
  With the n samples of one prompt, U is small exactly when pi is peaked, where the bound is loosest.

When the only completion known is the selected one, of probability eps, and the rest of the mass lies
below it, the plug-in's KL is the closed form ``(1 - eps)^n (log n + (n - 1) log(1 - eps) - (n - 1)/n) +
(1 - (1 - eps)^n) log((1 - (1 - eps)^n) / eps)``, the form of Beirami et al.'s own estimator (their
section 4); using every distinct completion of the prompt, as here, uses the heavy ones the selected one
hides.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np

__all__ = ["best_of_n_kl_estimate", "best_of_n_kl_exact", "best_of_n_probs"]


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")


def _check_finite(values: np.ndarray, what: str, allow_minus_inf: bool = False) -> None:
    """Refuse NaN (and inf) rewards or log-probs, naming the rows: the order best-of-n picks by would be
    undefined (NumPy ranks NaN above every number, so a NaN reward would be "the best") and the KL a NaN."""
    bad = np.isnan(values) | (np.isposinf(values) if allow_minus_inf else np.isinf(values))
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = ", ".join(f"row {i}: {values[i]}" for i in rows[:5]) + (", ..." if len(rows) > 5 else "")
        raise ValueError(f"{what} must be finite numbers; {len(rows)} of {len(values)} are not ({shown})")


def _levels(probs: np.ndarray, rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct reward levels in ascending order, and pi's mass at each (tied outcomes summed)."""
    levels, block = np.unique(rewards, return_inverse=True)
    return levels, np.bincount(block, weights=probs, minlength=len(levels))


def _selected(high: np.ndarray, mass: np.ndarray, n: int) -> np.ndarray:
    """F^n - (F^-)^n for blocks of `mass` ending at CDF position `high` (F^- = high - mass).

    Written high^n (1 - (1 - mass/high)^n) with log1p/expm1, so a block of tiny mass (a sequence of
    probability 1e-30) keeps its n high^(n-1) mass instead of cancelling to 0.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.where(high > 0, np.minimum(mass / high, 1.0), 0.0)
        return high**n * -np.expm1(n * np.log1p(-fraction))


def _continuum_kl(low: np.ndarray, high: np.ndarray, n: int) -> np.ndarray:
    """The KL terms of atomless mass between CDF positions low and high: its density ratio is n u^(n-1).

    integral_low^high n u^(n-1) log(n u^(n-1)) du = G(high) - G(low), G(u) = u^n (log n + (n-1) (log u - 1/n)),
    G(0) = 0; G(1) - G(0) is the bound log n - (n-1)/n.
    """

    def g(u: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(u > 0, u**n * (math.log(n) + (n - 1) * (np.log(u) - 1 / n)), 0.0)

    return g(high) - g(low)


def _atoms_kl(high: np.ndarray, mass: np.ndarray, n: int) -> np.ndarray:
    """q log(q / p) per block of mass p ending at CDF position `high`, q = F^n - (F^-)^n."""
    q = _selected(high, mass, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((mass > 0) & (q > 0), q * (np.log(q) - np.log(mass)), 0.0)


def _distribution(probs: Sequence[float], rewards: Sequence[float], n: int) -> tuple[np.ndarray, np.ndarray]:
    """probs and rewards as float64 arrays, checked: n >= 1, one length, a distribution (sum 1 within 1e-9)."""
    _check_n(n)
    p, r = np.asarray(probs, dtype=np.float64), np.asarray(rewards, dtype=np.float64)
    if p.shape != r.shape or p.ndim != 1:
        raise ValueError(f"probs and rewards must be 1-d of one length, got {p.shape} and {r.shape}")
    if (p < 0).any() or abs(p.sum() - 1.0) > 1e-9:
        raise ValueError(f"probs must be non-negative and sum to 1, got sum {p.sum()!r}")
    _check_finite(r, "rewards")
    return p, r


def best_of_n_probs(probs: Sequence[float], rewards: Sequence[float], n: int) -> np.ndarray:
    """pi_n(y) for every outcome of a finite pi: Beirami et al. (2024)'s F(y)^n - F^-(y)^n, ties shared.

    Args:
        probs: pi(y) per outcome, summing to 1 (within 1e-9).
        rewards: r(y) per outcome; outcomes of equal reward share their block's selection probability in
            proportion to pi (the argmax keeps the first of tied samples).
        n: Samples the best is chosen from, at least 1.

    Returns:
        (M,) float64 array, in the outcomes' order, summing to 1.

    Raises:
        ValueError: If ``n < 1``, the shapes differ, the probabilities are negative or do not sum to 1, or
            a reward is NaN or infinite (the rows are named).
    """
    p, r = _distribution(probs, rewards, n)
    _, block = np.unique(r, return_inverse=True)
    _, mass = _levels(p, r)
    selected = _selected(np.minimum(np.cumsum(mass), 1.0), mass, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(mass[block] > 0, p / mass[block], 0.0)
    return selected[block] * share


def best_of_n_kl_exact(probs: Sequence[float], rewards: Sequence[float], n: int) -> float:
    """KL(pi_n || pi) of a finite pi, exactly: sum over reward levels of q log(q / p).

    Args:
        probs: pi(y) per outcome, summing to 1 (within 1e-9).
        rewards: r(y) per outcome (ties form one block, see the module docstring).
        n: Samples the best is chosen from, at least 1.

    Raises:
        ValueError: If ``n < 1``, the shapes differ, the probabilities are negative or do not sum to 1, or
            a reward is NaN or infinite (the rows are named).
    """
    _, mass = _levels(*_distribution(probs, rewards, n))
    return float(_atoms_kl(np.minimum(np.cumsum(mass), 1.0), mass, n).sum())


def _distinct(
    logprobs: np.ndarray, rewards: np.ndarray, completions: Sequence[Hashable] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The log-prob, reward and number of samples of each distinct completion (first sample of each id)."""
    if completions is None:
        return logprobs, rewards, np.ones(len(logprobs))
    if len(completions) != len(logprobs):
        raise ValueError(f"{len(completions)} completion ids for {len(logprobs)} samples")
    first: dict[Hashable, int] = {}
    counts: dict[Hashable, int] = {}
    for i, completion in enumerate(completions):
        first.setdefault(completion, i)
        counts[completion] = counts.get(completion, 0) + 1
    rows = list(first.values())
    return logprobs[rows], rewards[rows], np.array([counts[c] for c in first], dtype=np.float64)


def _unseen_shares(rewards: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """How the unseen mass is shared among the k + 1 gaps around the k reward levels seen (sums to 1).

    Like the rarest completions seen: Good-Turing's idea, that what is unseen resembles what was seen once
    (here: fewest times, which is once unless every completion recurs). Each of them puts half its share
    in the gap below its reward level and half in the gap above.
    """
    _, block = np.unique(rewards, return_inverse=True)
    rarest = np.bincount(block, weights=counts == counts.min(), minlength=block.max() + 1)  # (k,)
    gaps = (np.append(0.0, rarest) + np.append(rarest, 0.0)) / 2  # (k + 1,)
    return gaps / gaps.sum()


def best_of_n_kl_estimate(
    logprobs: Sequence[float],
    rewards: Sequence[float],
    n: int,
    completions: Sequence[Hashable] | None = None,
) -> float:
    """KL(pi_n || pi) for one prompt, from samples of pi: the exact KL of the plug-in reference.

    The plug-in holds every distinct completion sampled, at its exact probability exp(logprob), and the
    unseen mass as an atomless continuum beside the rarest completions seen (see the module docstring for
    why, its bias, and when it equals the bound or the truth).

    Args:
        logprobs: log pi(y) of each sampled completion: its sequence log-prob under the sampling policy
            (sum of the token log-probs, EOS included).
        rewards: The reward each sample was ranked by (the reward model's score).
        n: Samples the best is chosen from, at least 1 (need not be the number of samples given: samples
            of a prompt drawn twice are pooled).
        completions: An id per sample (e.g. its token ids as a tuple); samples of one id are one outcome,
            counted once. None: every sample is a distinct completion.

    Returns:
        The estimate in nats, in [0, log n - (n - 1)/n]; 0 for n = 1.

    Raises:
        ValueError: If ``n < 1``, the lengths differ, a reward is NaN or infinite or a log-prob NaN or +inf
            (the rows are named), or the distinct completions' probabilities sum to more than 1 (beyond
            1e-3): duplicates counted twice, or log-probs not of whole sequences.
    """
    _check_n(n)
    lp, r = np.asarray(logprobs, dtype=np.float64), np.asarray(rewards, dtype=np.float64)
    if lp.shape != r.shape or lp.ndim != 1:
        raise ValueError(f"logprobs and rewards must be 1-d of one length, got {lp.shape} and {r.shape}")
    _check_finite(r, "rewards")
    _check_finite(lp, "logprobs (-inf, a completion of probability 0, aside)", allow_minus_inf=True)
    lp, r, counts = _distinct(lp, r, completions)
    _, mass = _levels(np.exp(lp), r)
    seen = float(mass.sum())
    if seen > 1.0 + 1e-3:  # a margin for float32 log-probs of a completion that holds nearly all the mass
        raise ValueError(
            f"the distinct completions' probabilities sum to {seen:.6g} > 1: are duplicates counted twice "
            "(pass `completions`), or are the log-probs not those of whole sequences?"
        )
    gap = max(0.0, 1.0 - seen) * _unseen_shares(r, counts)  # (k + 1,) the unseen mass in each gap
    # CDF positions: gap 0, level 1, gap 1, level 2, ..., level k, gap k.
    atom_high = np.minimum(np.cumsum(mass + gap[:-1]), 1.0)
    gap_high = np.append(atom_high - mass, 1.0)
    gap_low = np.maximum(gap_high - gap, 0.0)
    kl = _atoms_kl(atom_high, mass, n).sum() + _continuum_kl(gap_low, gap_high, n).sum()
    return float(kl)
