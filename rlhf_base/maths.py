"""Shared maths for rlhf-gym: masked statistics, KL estimators, advantages and policy-gradient losses.

Every agent (PPO, REINFORCE/RLOO, best-of-n, RAFT) needs the same handful of formulas; they live here, as
pure functions of torch tensors, so that each agent file reads top to bottom like cleanrl's ``ppo.py``
without copying them, and so that ``tests/test_maths.py`` can check each one against a hand computation.

Conventions:
    * A ``mask`` is a ``(B, T)`` bool or 0/1 float tensor marking valid response tokens (1) against padding
      (0). Responses are right-padded: tokens after EOS are padding.
    * Padding positions never influence a result, whatever they hold (even ``inf`` or ``nan``): inputs are
      selected with :func:`torch.where` rather than multiplied by the mask, and outputs are 0 there.
    * Names follow the maths: ``logprobs`` (under the current policy pi), ``old_logprobs`` (under the policy
      that collected the rollout), ``ref_logprobs`` (under the frozen reference pi_ref), ``values``,
      ``rewards``, ``advantages``, ``returns``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "KL_ESTIMATORS",
    "KL_GRANULARITIES",
    "KL_PLACEMENTS",
    "best_of_n_kl",
    "clipped_surrogate",
    "discounted_returns",
    "entropy_from_logits",
    "gae",
    "kl_penalty",
    "kl_per_token",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "rloo_baseline",
    "sequence_kl",
]

KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
"""Names accepted by :func:`kl_per_token`, after Schulman, "Approximating KL Divergence" (2020)."""

KL_PLACEMENTS: tuple[str, ...] = ("reward", "loss")
"""Where :func:`kl_penalty` enters the update: paid in the reward (detached) or added to the loss."""

KL_GRANULARITIES: tuple[str, ...] = ("token", "sequence")
"""What :func:`kl_penalty` estimates from: each token's log-ratio, or the sequence's summed log-ratio."""


# --------------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------------
def _select(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` at valid positions, 0 at padding; unlike ``x * mask`` this keeps ``inf``/``nan`` out."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the valid positions of ``mask``.

    Args:
        x: Values, e.g. per-token KL, shape ``(B, T)``.
        mask: Valid-token mask broadcastable to ``x``.
        dim: Dimension to reduce; ``None`` reduces over everything to a scalar.

    Returns:
        The masked sum: a scalar if ``dim`` is ``None``, else ``x`` with ``dim`` reduced.
    """
    selected = _select(x, mask)
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the valid positions of ``mask``.

    This is the token-level average used by the PPO losses (every valid token weighs the same, as in
    Ouyang et al. 2022 and TRL), not a mean of per-sequence means.

    Args:
        x: Values, shape ``(B, T)``.
        mask: Valid-token mask (0/1) broadcastable to ``x``.
        dim: Dimension to reduce; ``None`` reduces over everything to a scalar.

    Returns:
        The masked mean; 0 where there is no valid position (rather than ``nan``).
    """
    mask = mask.bool().expand_as(x)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    # A 0/1 mask gives an integer count, so clamping to 1 only changes the empty case (sum 0 -> mean 0).
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all valid positions of ``mask`` (a scalar).

    Args:
        x: Values, shape ``(B, T)``.
        mask: Valid-token mask (0/1) broadcastable to ``x``.
        unbiased: Apply Bessel's correction ``n / (n - 1)``, as :meth:`torch.Tensor.var` does by default.

    Returns:
        The masked variance, a scalar tensor.

    Raises:
        ValueError: If there are no valid positions, or only one and ``unbiased`` is set.
    """
    mask = mask.bool().expand_as(x)
    count = int(mask.sum())
    if count == 0 or (unbiased and count == 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} valid positions, got {count}")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        var = var * count / (count - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``x`` to mean 0 and standard deviation 1 over the valid positions of ``mask``.

    Advantage whitening is a standard PPO stabiliser (OpenAI baselines, cleanrl ``norm_adv``); the statistics
    must come from valid tokens only, or padding zeros would drag the mean and shrink the variance.

    Args:
        x: Values to whiten, e.g. advantages, shape ``(B, T)``.
        mask: Valid-token mask (0/1) broadcastable to ``x``.
        shift_mean: Subtract the mean. ``False`` only rescales (the mean is added back), which TRL uses for
            rewards so that their sign is kept.
        eps: Added to the variance before the square root.

    Returns:
        Whitened ``x``, shape of ``x``, 0 at padding.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _select(whitened, mask)


# --------------------------------------------------------------------------------------------------------
# KL divergence estimators
# --------------------------------------------------------------------------------------------------------
def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token sample estimate of KL(pi || pi_ref) from tokens drawn from pi.

    With ``r = pi_ref(x) / pi(x)`` and ``log_ratio = log pi(x) - log pi_ref(x) = -log r`` (John Schulman,
    "Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html):

    * ``k1 = log_ratio = -log r``: unbiased, high variance, can be negative per token.
    * ``k2 = 0.5 * log_ratio**2``: biased but low variance and non-negative; its gradient is the
      gradient of the KL (used by GRPO-style losses).
    * ``k3 = (r - 1) - log r = (exp(-log_ratio) - 1) + log_ratio``: unbiased, low variance and
      non-negative (``r - 1 >= log r``).

    Args:
        logprobs: Log-probabilities of the sampled tokens under pi, shape ``(B, T)``.
        ref_logprobs: Log-probabilities of the same tokens under pi_ref, shape ``(B, T)``.
        estimator: One of :data:`KL_ESTIMATORS`.

    Returns:
        Per-token KL estimate, shape ``(B, T)``. Padding is not masked here; see :func:`sequence_kl`.

    Raises:
        ValueError: If ``estimator`` is unknown.
    """
    return _estimate(logprobs - ref_logprobs, estimator)  # (B, T)


def _estimate(log_ratio: torch.Tensor, estimator: str) -> torch.Tensor:
    """Schulman's estimator ``estimator`` of a log-ratio ``log pi - log pi_ref`` (any shape)."""
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; expected one of {valid}")


def sequence_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-sequence KL(pi || pi_ref) estimate: the masked sum of :func:`kl_per_token` over tokens.

    The KL of a sequence distribution is the sum of per-token KLs along the sampled sequence (chain rule), so
    this is the quantity penalised by ``beta`` in the RLHF objective (Ziegler et al. 2019; Ouyang et al. 2022).

    Args:
        logprobs: Log-probabilities under pi, shape ``(B, T)``.
        ref_logprobs: Log-probabilities under pi_ref, shape ``(B, T)``.
        mask: Valid-token mask, shape ``(B, T)``.
        estimator: One of :data:`KL_ESTIMATORS`.

    Returns:
        KL estimate per sequence, shape ``(B,)``.
    """
    # Select before the estimator so that junk at padding can't overflow exp() in k3 and poison gradients.
    kl = kl_per_token(_select(logprobs, mask), _select(ref_logprobs, mask), estimator)  # (B, T)
    return masked_sum(kl, mask, dim=-1)  # (B,)


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    estimator: str = "k1",
    granularity: str = "token",
    placement: str = "reward",
) -> torch.Tensor:
    """The KL term of a KL-regularised policy-gradient update, laid out on the response tokens.

    Three choices make the term, and together they decide which objective the update climbs; only some
    combinations climb the RLHF objective ``J = E[R] - beta * KL(pi || pi_ref)``, whose optimum is
    ``pi* = pi_ref * exp(R / beta) / Z`` (Tang & Munos 2025, "On a few pitfalls in KL divergence gradient
    estimation for RL", arXiv:2506.09477; Liu et al. 2025, arXiv:2510.01555). With ``l = log pi(y) -
    log pi_ref(y)`` for a response y sampled from pi, and on-policy samples:

    * ``estimator``: ``k(l)``, one of :data:`KL_ESTIMATORS` (see :func:`kl_per_token`).
    * ``placement`` "reward": the value is detached and paid as reward ``-beta * k``, so the update's
      KL gradient is the score function ``E[k(l) * grad log pi(y)]``. "loss": ``+beta * k`` is added to
      the loss and differentiated through ``logprobs`` (pathwise), giving ``E[k'(l) * grad log pi(y)]``.
    * ``granularity`` "token": ``k`` of each token's log-ratio, summed over the response. "sequence":
      ``k`` of the response's summed log-ratio ``L``, at its last valid token (0 at the others).

    What each combination's expected gradient is the gradient of, treating a response as one action
    (exact for granularity "sequence", and for one-token responses; ``tests/test_kl_objectives.py``
    checks every line exactly, on a 4-outcome bandit and on a 2-token tree):

    * k1 in the reward: ``E[R] - beta * KL(pi || pi_ref)``, J itself: reaches pi*. The default.
    * k2 in the reward: ``E[R] - beta * (E_pi[l^2 / 2] - KL(pi || pi_ref))``. That penalty is no
      divergence: it is flat to second order at pi_ref, and dropping an outcome to probability 0 lowers
      it (by ``pi_ref(y)``); an outcome pushed below pi_ref pays a k2 that grows like
      ``log^2(pi_ref / pi)`` and is pushed further, so low-reward outcomes collapse to probability 0.
    * k3 in the reward: ``E[R] - beta * (KL(pi || pi_ref) - KL(pi_ref || pi))``, flat to second order
      at pi_ref too and unbounded above (the forward KL grows without bound as an outcome's probability
      goes to 0): low-reward outcomes collapse to 0, faster than with k2 (k3 grows like ``pi_ref / pi``).
    * k1 as a loss: ``E[R]`` alone, since ``E[grad k1] = E[grad log pi] = 0``: no regularisation.
    * k2 as a loss: ``E[R] - beta * KL(pi || pi_ref)`` (``grad l^2 / 2 = l * grad log pi``, the k1-in-reward
      gradient): reaches pi*.
    * k3 as a loss: ``E[R] - beta * KL(pi_ref || pi)``, the forward (mass-covering) KL, whose optimum
      ``pi = beta * pi_ref / (lambda - R)`` is not pi* (GRPO's choice).

    Granularity "token", for responses of several tokens: k1 in the reward is the same number as at
    "sequence" (log-ratios add up), so it climbs J exactly. As a loss, each token's term differentiates
    only its own token's log-prob with the prefix held fixed: k1 still gives 0; k2 gives Tang & Munos'
    *partial* gradient ``sum_t E[grad KL(pi(.|h_t) || pi_ref(.|h_t))]``, which leaves out how earlier
    tokens change the KL of later ones, so its fixed point is myopic, ``pi(.|h)`` proportional to
    ``pi_ref(.|h) * exp(Q_R(h, .) / beta)`` with ``Q_R`` the expected reward alone (no KL to go), and it
    misses pi*; k3 gives the forward KL of each step, as myopically. k2 and k3 per token in the reward
    are biased as at sequence level (and differ from it). The claims hold on-policy; the later epochs of
    a PPO update see slightly off-policy samples, as its surrogate does.

    Args:
        logprobs: Log-probabilities of the sampled tokens under pi, shape ``(B, T)``; with grad for
            placement "loss" (the current policy's), any for "reward" (the sampling policy's).
        ref_logprobs: The same under pi_ref, shape ``(B, T)``.
        mask: Valid-token mask, shape ``(B, T)``, right-padded.
        estimator: One of :data:`KL_ESTIMATORS`.
        granularity: One of :data:`KL_GRANULARITIES`.
        placement: One of :data:`KL_PLACEMENTS`: "reward" detaches the result.

    Returns:
        ``(B, T)``, 0 at padding; each row sums to the response's penalty (``sum_t k(l_t)`` or ``k(L)``).
        Pay ``-beta *`` it as reward ("reward"), or add ``beta *`` its per-response sum, averaged like the
        policy loss, to the loss ("loss"). At padding the inputs never reach ``exp`` (k3 cannot overflow
        there); ``k3`` of a large negative summed log-ratio can still overflow at granularity "sequence".

    Raises:
        ValueError: If ``estimator``, ``granularity`` or ``placement`` is unknown.
    """
    _check_choice("KL estimator", estimator, KL_ESTIMATORS)
    _check_choice("KL granularity", granularity, KL_GRANULARITIES)
    _check_choice("KL placement", placement, KL_PLACEMENTS)
    valid = mask.bool()
    log_ratio = _select(logprobs, valid) - _select(ref_logprobs, valid)  # (B, T), 0 at padding
    if granularity == "token":
        penalty = _select(_estimate(log_ratio, estimator), valid)  # (B, T)
    else:
        sequence = _estimate(log_ratio.sum(-1), estimator)  # (B,): k of the summed log-ratio
        is_last = valid & ~F.pad(valid[:, 1:], (0, 1), value=False)  # (B, T): the last valid token
        zero = torch.zeros((), dtype=sequence.dtype, device=sequence.device)
        penalty = torch.where(is_last, sequence[:, None], zero)  # (B, T)
    return penalty.detach() if placement == "reward" else penalty


# --------------------------------------------------------------------------------------------------------
# Returns and advantages
# --------------------------------------------------------------------------------------------------------
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438).

    Each row is one right-padded episode that terminates at its last valid token, so the value after that
    token is 0 and nothing is bootstrapped from padding or across rows:

        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}

    where ``m`` is the mask (``m_T = 0``). The mask is read as "episode continues", so a gap inside a row
    would also end the episode there; rows are expected to be right-padded.

    Args:
        rewards: Per-token rewards, shape ``(B, T)`` (e.g. ``-beta * kl`` per token plus the reward-model
            score at the last valid token).
        values: Value estimates V(s_t), shape ``(B, T)``.
        mask: Valid-token mask, shape ``(B, T)``.
        gamma: Discount factor.
        lam: GAE lambda; 1 gives Monte-Carlo advantages, 0 gives one-step TD errors.

    Returns:
        ``(advantages, returns)``, each ``(B, T)``, with ``returns = advantages + values``; both 0 at
        padding. They are computed with autograd; callers pass detached tensors (as cleanrl does under
        ``torch.no_grad()``).
    """
    mask = mask.bool()
    rewards = _select(rewards, mask)  # (B, T)
    values = _select(values, mask)  # (B, T)
    next_mask = F.pad(mask[:, 1:], (0, 1), value=False).to(values.dtype)  # (B, T): m_{t+1}
    next_values = F.pad(values[:, 1:], (0, 1)) * next_mask  # (B, T): V_{t+1}, 0 past the end
    deltas = rewards + gamma * next_values - values  # (B, T)

    advantages = torch.zeros_like(deltas)  # (B, T)
    last_gae = torch.zeros_like(deltas[:, 0])  # (B,)
    for t in reversed(range(deltas.shape[1])):
        last_gae = deltas[:, t] + gamma * lam * next_mask[:, t] * last_gae
        advantages[:, t] = last_gae
    advantages = _select(advantages, mask)
    returns = _select(advantages + values, mask)
    return advantages, returns


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Reward-to-go ``G_t = sum_{k >= t} gamma^(k - t) r_k`` within each right-padded episode.

    This is the return that REINFORCE (Williams 1992) weights ``grad log pi(a_t | s_t)`` by.

    Args:
        rewards: Per-token rewards, shape ``(B, T)``.
        mask: Valid-token mask, shape ``(B, T)``.
        gamma: Discount factor.

    Returns:
        Returns, shape ``(B, T)``, 0 at padding.
    """
    mask = mask.bool()
    rewards = _select(rewards, mask)  # (B, T)
    next_mask = F.pad(mask[:, 1:], (0, 1), value=False).to(rewards.dtype)  # (B, T)
    returns = torch.zeros_like(rewards)  # (B, T)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * next_mask[:, t] * running
        returns[:, t] = running
    return _select(returns, mask)


def rloo_baseline(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024, arXiv:2402.14740).

    For ``k`` samples of the same prompt, each sample's baseline is the mean reward of the other ``k - 1``:
    it does not depend on the sample's own action, so the gradient stays unbiased, yet it tracks the prompt's
    difficulty as a learned critic would.

    Args:
        rewards: Sequence rewards, shape ``(B,)`` with ``B = num_prompts * k``, laid out as ``k`` consecutive
            samples per prompt (sample ``j`` of prompt ``i`` at index ``i * k + j``).
        k: Samples per prompt, at least 2.

    Returns:
        Baselines, shape ``(B,)``; the RLOO advantage is ``rewards - rloo_baseline(rewards, k)``.

    Raises:
        ValueError: If ``rewards`` is not 1-D, ``k < 2``, or ``k`` does not divide ``B``.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rloo_baseline expects rewards of shape (B,), got {tuple(rewards.shape)}")
    batch_size = rewards.shape[0]
    if k < 2 or batch_size % k != 0:
        raise ValueError(f"rloo_baseline needs k >= 2 dividing the batch size, got B={batch_size} and k={k}")
    grouped = rewards.view(-1, k)  # (num_prompts, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)  # (num_prompts, k)
    return baseline.reshape(-1)  # (B,)


# --------------------------------------------------------------------------------------------------------
# PPO losses
# --------------------------------------------------------------------------------------------------------
def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate per token (Schulman et al. 2017, arXiv:1707.06347, eq. 7), not yet averaged.

    ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))`` with ``ratio = pi(a|s) / pi_old(a|s)``: the
    pessimistic (larger) loss removes any incentive to move the ratio beyond ``1 +- eps`` in the direction
    the advantage favours. How the tokens are then averaged is the algorithm's choice: PPO's token mean
    (:func:`ppo_policy_loss`), GRPO's mean of per-response means, Dr. GRPO's sums over a constant.

    Args:
        logprobs: Log-probabilities of the taken tokens under the current policy, shape ``(B, T)``.
        old_logprobs: The same under the rollout policy, shape ``(B, T)``.
        advantages: Advantages, shape ``(B, T)``.
        mask: Valid-token mask, shape ``(B, T)``.
        clip_range: The clipping epsilon.

    Returns:
        ``(losses, stats)``: ``(B, T)`` per-token losses, 0 at padding, and python floats ``clip_fraction``
        (share of valid tokens with ``|ratio - 1| > eps``, as in cleanrl and OpenAI baselines) and
        ``approx_kl`` (masked mean of ``(ratio - 1) - log ratio``, the k3 estimator of KL(pi_old || pi), as
        in cleanrl).
    """
    # Select before exp(): a large junk log-ratio at padding would overflow and turn gradients into nan.
    log_ratio = _select(logprobs - old_logprobs, mask)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    advantages = _select(advantages, mask)  # (B, T)
    pg_losses = -advantages * ratio  # (B, T)
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # (B, T)
    losses = _select(torch.max(pg_losses, pg_losses_clipped), mask)  # (B, T)

    with torch.no_grad():
        clip_fraction = masked_mean(((ratio - 1.0).abs() > clip_range).to(ratio.dtype), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return losses, {"clip_fraction": clip_fraction.item(), "approx_kl": approx_kl.item()}


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate loss, averaged over tokens: ``masked_mean(clipped_surrogate(...), mask)``.

    Every valid token of the batch weighs the same (Ouyang et al. 2022; TRL). See :func:`clipped_surrogate`
    for the per-token loss, the arguments and the stats.

    Returns:
        ``(loss, stats)``: the scalar loss and :func:`clipped_surrogate`'s stats.
    """
    losses, stats = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_range)  # (B, T)
    return masked_mean(losses, mask), stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float | None,
) -> torch.Tensor:
    """PPO's (optionally clipped) value loss, averaged over tokens.

    Clipped: ``0.5 * masked_mean(max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2))``, the variant
    in OpenAI baselines' PPO2 and used for RLHF by Ziegler et al. (2019); Andrychowicz et al. (2021,
    arXiv:2006.05990) found it rarely helps, so ``None`` gives the plain ``0.5 * masked_mean((V - R)^2)``.

    Args:
        values: Current value predictions, shape ``(B, T)``.
        old_values: Value predictions at rollout time, shape ``(B, T)``.
        returns: Regression targets, shape ``(B, T)``.
        mask: Valid-token mask, shape ``(B, T)``.
        clip_range_value: The value clipping epsilon, or ``None`` for no clipping.

    Returns:
        The scalar loss.
    """
    # Select first so that junk at padding can't reach the gradients (0 * inf = nan in the backward).
    values, old_values, returns = (_select(x, mask) for x in (values, old_values, returns))
    value_losses = (values - returns) ** 2  # (B, T)
    if clip_range_value is None:
        return 0.5 * masked_mean(value_losses, mask)
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    value_losses_clipped = (values_clipped - returns) ** 2  # (B, T)
    return 0.5 * masked_mean(torch.max(value_losses, value_losses_clipped), mask)


# --------------------------------------------------------------------------------------------------------
# Logits
# --------------------------------------------------------------------------------------------------------
def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum_v p_v log p_v`` of the categorical distribution at every position.

    Computed from ``log_softmax`` (a logsumexp), so large logits don't overflow; ``-inf`` logits (banned
    tokens) contribute 0 instead of ``0 * -inf = nan``.

    Args:
        logits: Unnormalised log-probabilities, shape ``(..., V)``.

    Returns:
        Entropy in nats, shape ``(...)``.
    """
    logp = F.log_softmax(logits, dim=-1)  # (..., V)
    # Clamp -inf to the most negative finite float so that p * log p is 0 * finite, also in the backward.
    logp_finite = logp.clamp(min=torch.finfo(logp.dtype).min)  # (..., V)
    return -(logp.exp() * logp_finite).sum(dim=-1)  # (...)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token under the categorical distribution given by ``logits``.

    Args:
        logits: Unnormalised log-probabilities, shape ``(..., V)``, e.g. ``(B, T, V)``.
        tokens: Token ids, shape ``(...)``, e.g. ``(B, T)``; the logits at position t must be those that
            predict ``tokens[..., t]`` (shift them first for a causal LM).

    Returns:
        ``log softmax(logits)[..., tokens]``, shape ``(...)``.
    """
    logp = F.log_softmax(logits, dim=-1)  # (..., V)
    return torch.gather(logp, -1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (...)


# --------------------------------------------------------------------------------------------------------
# Best-of-n
# --------------------------------------------------------------------------------------------------------
def best_of_n_kl(n: int) -> float:
    """KL(pi_best-of-n || pi_base) from the analytic formula ``log n - (n - 1) / n``.

    Stated by Stiennon et al. (2020, arXiv:2009.01325, appendix G.3) and widely used to put best-of-n on the
    same KL axis as RL; Beirami et al. (2024, arXiv:2401.01879) prove it is an upper bound, tight when the
    base policy spreads its mass over many outcomes with distinct rewards.

    Args:
        n: Number of samples the best is chosen from, at least 1.

    Returns:
        The KL in nats; 0 for ``n = 1``.

    Raises:
        ValueError: If ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"best_of_n_kl needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n
