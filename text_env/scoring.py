"""Score finished responses like a judge: one teacher-forced forward of the reference and of the policy.

The terminal reward is `rm_score - beta * kl`, where `kl` sums a per-token estimator of
`log pi(w_i | w_<i, x) - log pi_ref(w_i | w_<i, x)` over the response (Ziegler et al. 2019; Stiennon et
al. 2020). Scoring happens once per finished batch of rows, never per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from rlhf_gym.maths import KL_ESTIMATORS, kl_per_token, logprobs_from_logits
from text_env.tasks import RewardFn

__all__ = ["Judge", "as_reward_fn", "position_ids_from_mask", "response_logprobs"]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so a left-padded prompt starts at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int
) -> torch.Tensor:
    """Teacher-forced log-probabilities of the tokens at `response_start:` under `model`.

    Args:
        input_ids: (B, L) prompt left-padded into `[:response_start]`, response right-padded after it.
        attention_mask: (B, L) 1 for real tokens.

    Returns:
        (B, L - response_start) float32 log-probabilities (padding positions hold junk; mask them).
    """
    num_response = input_ids.shape[1] - response_start
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=num_response + 1,  # only the positions that predict response tokens reach the LM head
    )
    logits = out.logits[:, :-1].float()  # (B, N, V): position t predicts token t + 1
    return logprobs_from_logits(logits, input_ids[:, response_start:])


def as_reward_fn(reward_model: Any) -> RewardFn:
    """Accept a reward model object (with `.score`) or a plain callable `(prompts, responses) -> scores`."""
    if hasattr(reward_model, "score") and callable(reward_model.score):
        return reward_model.score
    if callable(reward_model):
        return reward_model
    raise TypeError(
        f"reward_model must be a callable (prompts, responses) -> scores, or an object with .score(...); "
        f"got {type(reward_model).__name__}"
    )


def _as_scores(values: Any, expected: int, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    scores = np.asarray(values, dtype=np.float32)
    if scores.shape != (expected,):
        raise ValueError(
            f"{what} returned scores of shape {scores.shape}; expected ({expected},), one per response"
        )
    return scores


@dataclass
class Judge:
    """Everything that turns a finished response into a reward; shared by the single and the vector env."""

    reference: PreTrainedModel  # pi_ref, frozen
    policy: PreTrainedModel  # pi, the model the agent trains (handed to the env with `set_policy`)
    reward_fn: RewardFn  # the (learned) reward model: the proxy the agent optimises
    gold_fn: RewardFn | None  # the task's gold reward: logged for evaluation, never part of the reward
    beta: float  # KL coefficient
    kl_estimator: str  # "k1" (log-ratio), "k2" or "k3"; the same estimator is logged and optimised

    def __post_init__(self) -> None:
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown kl_estimator {self.kl_estimator!r}; valid: {list(KL_ESTIMATORS)}")
        if not np.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta}")

    @torch.no_grad()
    def score(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        response_start: int,
        prompts: Sequence[str],
        responses: Sequence[str],
        logprobs: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Score k finished rows in one batched forward per model.

        `logprobs` (k, N), when the sampler already computed log pi of every response token, replaces the
        policy's forward pass: its result is known (the reference's forward always runs).

        Returns arrays keyed by name: `reward`, `rm_score`, `kl`, `gold_score` (NaN without a gold reward),
        each (k,), and `logprobs`, `ref_logprobs`, (k, N) with 0 at padding.
        """
        device = next(self.policy.parameters()).device
        ids = torch.as_tensor(input_ids, device=device)
        mask = torch.as_tensor(attention_mask, device=device)
        response_mask = mask[:, response_start:].float()  # (k, N)
        if logprobs is None:
            logprobs = response_logprobs(self.policy, ids, mask, response_start)
        else:
            logprobs = torch.as_tensor(logprobs, device=device, dtype=torch.float32)
        logprobs = logprobs * response_mask
        ref_logprobs = response_logprobs(self.reference, ids, mask, response_start) * response_mask
        kl = (kl_per_token(logprobs, ref_logprobs, self.kl_estimator) * response_mask).sum(-1)  # (k,)
        kl = kl.cpu().numpy().astype(np.float32)
        rm_score = _as_scores(self.reward_fn(list(prompts), list(responses)), len(responses), "reward_model")
        if self.gold_fn is self.reward_fn:  # the gold reward serves as the reward model: score once
            gold = rm_score.copy()
        elif self.gold_fn is not None:
            gold = _as_scores(self.gold_fn(list(prompts), list(responses)), len(responses), "gold reward")
        else:
            gold = np.full(len(responses), np.nan, dtype=np.float32)
        return {
            "reward": rm_score - np.float32(self.beta) * kl,
            "rm_score": rm_score,
            "kl": kl,
            "gold_score": gold,
            "logprobs": logprobs.cpu().numpy(),
            "ref_logprobs": ref_logprobs.cpu().numpy(),
        }
