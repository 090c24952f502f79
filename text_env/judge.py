"""The env's judge: turn finished responses into rewards with one teacher-forced forward per model.

The terminal reward is `rm_score - beta * kl`, where `kl` sums the log-ratio
`log pi(w_i | w_<i, x) - log pi_ref(w_i | w_<i, x)` over the response (Ziegler et al. 2019; Stiennon et
al. 2020): Schulman's k1, the unbiased estimate of KL(pi || pi_ref) of the sampled response, and the one
estimator whose value, paid in the reward, gives the gradient of that KL (issue 12; see
`rlhf_base.maths.kl_penalty`). So the env always logs the true KL estimate and always pays the RLHF
objective; an agent that optimises another estimator or placement (PPO's and REINFORCE's `kl_estimator`,
`kl_in`, `kl_granularity`) builds its own term from the `logprobs` and `ref_logprobs` the env returns.
Scoring happens once per finished batch of rows, never per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_base.lm import by_response_length, last_token_index, response_logprobs, token_logits
from rlhf_base.maths import kl_per_token, logprobs_from_logits
from text_env.sampling import SamplingOptions
from text_env.speed import SpeedOptions
from text_env.tasks import RewardFn

__all__ = ["KL_ESTIMATOR_MOVED", "Judge", "as_reward_fn", "check_beta", "check_scores"]

#: Why the env no longer takes a KL estimator, and where the choice lives now (issue 12).
KL_ESTIMATOR_MOVED = (
    "the env's reward and its logged kl always use k1 (the sum of log pi - log pi_ref of the sampled "
    "tokens: the true KL estimate, whose gradient in the reward is the KL's); choose the KL term an agent "
    "optimises in the agent's config: kl_estimator (k1 | k2 | k3), kl_in (reward | loss) and "
    "kl_granularity (token | sequence), for ppo and reinforce"
)


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


def check_beta(beta: Any) -> float:
    """`beta` as a float if it is a finite number >= 0 (a KL coefficient); a ValueError if not."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.integer, np.floating)):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if not np.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    return float(beta)


def check_scores(values: Any, expected: int, what: str, responses: Sequence[str] = ()) -> np.ndarray:
    """A reward's output as a (k,) float32 array of finite scores, or an error naming the reward and rows.

    A reward is user code (a function named in a config, a saved model with a bad `scale`): a wrong shape,
    a non-number or a NaN/inf would otherwise flow into advantages, best-of-n's choice or RAFT's training
    data and corrupt a run that still exits 0. Every score the env pays goes through here; so do the
    labeller's judge and, as a second guard, the scores agents select or rank by (best-of-n, RAFT, online
    DPO), so that scores from anywhere else are refused the same way.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    try:
        scores = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{what} returned {type(values).__name__} that is not a sequence of numbers ({e}); "
            f"expected {expected} scores, one per response"
        ) from None
    if scores.shape != (expected,):
        raise ValueError(
            f"{what} returned scores of shape {scores.shape}; expected ({expected},), one per response"
        )
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        shown = ", ".join(
            f"row {i}: {scores[i]}" + (f" for {responses[i][:40]!r}" if i < len(responses) else "")
            for i in bad[:5]
        )
        raise ValueError(
            f"{what} returned {len(bad)} non-finite score(s) of {expected} ({shown}"
            f"{', ...' if len(bad) > 5 else ''}): a reward must be a finite number per response"
        )
    return scores


@dataclass
class Judge:
    """Everything that turns a finished response into a reward; shared by the single and the vector env."""

    # pi_ref, frozen: a model of its own, or a LoRA policy's base with the adapter off (`rlhf_base.lora.AdapterOff`)
    reference: PreTrainedModel
    policy: PreTrainedModel  # pi, the model the agent trains (handed to the env with `set_policy`)
    reward_fn: RewardFn  # the (learned) reward model: the proxy the agent optimises
    gold_fn: RewardFn | None  # the task's gold reward: logged for evaluation, never part of the reward
    beta: float  # KL coefficient
    tokenizer: PreTrainedTokenizerBase | None = None  # the env's; lets a reward model that reads pi_ref's
    # log-probs share the reference forward (`shared_reward_model`)
    speed: SpeedOptions = field(default_factory=SpeedOptions)  # group_by_length, share_reference_forward
    # The env's sampling options (temperature, EOS banned before min_new_tokens): the task's policy. Both
    # sides of the KL are scored through them, so pi_ref against itself has KL 0 (`text_env.sampling`).
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    reward_name: str = "reward_model"  # how messages name the reward model (e.g. its config value)
    gold_name: str = "gold reward"  # and the gold reward

    def __post_init__(self) -> None:
        self.beta = check_beta(self.beta)
        # (reward model, reference, whether that reward model reads that reference's log-probs)
        self._shares: tuple[Any, Any, bool] = (None, None, False)

    def shared_reward_model(self) -> Any:
        """The reward model behind `reward_fn` when its frozen LM is `reference` itself, else None.

        Such a reward model (the pipeline's: its head reads pi_ref's log-prob statistics) can take the
        token log-probs of the reference forward the KL needs anyway (`score_tokens`): one teacher-forced
        forward of pi_ref per batch instead of two, and no re-tokenising of the text. A reward model
        ensemble (`reward_models.RewardEnsemble`) qualifies when every member does, and then one forward
        serves all k; if any member reads another LM (or none), the whole ensemble takes the text path.
        """
        model = getattr(self.reward_fn, "__self__", None)  # `as_reward_fn` keeps the bound `.score`
        if self.tokenizer is None or model is None or not hasattr(model, "reads_logprobs_of"):
            return None
        if self._shares[0] is not model or self._shares[1] is not self.reference:  # once per pair (it
            # compares weights); `EnvCore.set_reference` may replace the reference
            reads = bool(model.reads_logprobs_of(self.reference, self.tokenizer))
            self._shares = (model, self.reference, reads)
        return model if self._shares[2] else None

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

        `logprobs` (k, N), when the sampler already computed log q of every response token (q: the
        distribution it drew from, the env's policy or an agent's own tweak of it), replaces the policy's
        forward pass (the reference's always runs). Without them the policy is scored through the env's
        sampling options, as the reference always is.

        Returns arrays keyed by name: `reward`, `rm_score`, `kl`, `gold_score` (NaN without a gold reward),
        each (k,), and `logprobs`, `ref_logprobs`, (k, N) with 0 at padding.
        """
        device = next(self.policy.parameters()).device
        ids = torch.as_tensor(input_ids, device=device)
        mask = torch.as_tensor(attention_mask, device=device)
        response_mask = mask[:, response_start:].float()  # (k, N)
        overhead = self.speed.overhead_tokens  # None: length groups by the device's call cost; inf: one
        transform = self.sampling.logits  # the identity (the logits themselves) for the default options
        if logprobs is None:
            logprobs = response_logprobs(self.policy, ids, mask, response_start, True, overhead, transform)
        else:
            logprobs = torch.as_tensor(logprobs, device=device, dtype=torch.float32)
        logprobs = logprobs * response_mask
        shared = self.shared_reward_model() if self.speed.share_reference_forward else None
        # Both checks read the host arrays the env passed in: no device round trip.
        if shared is not None and int(np.asarray(attention_mask).sum(-1).max()) + 1 <= shared.max_length:
            ref_logprobs, rm_score = self._reference_and_reward(shared, ids, mask, response_start)
            text_rows = self._rows_with_specials(
                np.asarray(input_ids)[:, response_start:], np.asarray(attention_mask)[:, response_start:]
            )
            if len(text_rows):  # the text path drops special tokens inside a response: score those as text
                rm_score[text_rows] = self._text_scores([prompts[i] for i in text_rows],
                                                        [responses[i] for i in text_rows])  # fmt: skip
            rm_score = check_scores(
                rm_score, len(responses), self.reward_name, responses
            )  # finite, or say so
        else:
            ref_logprobs = response_logprobs(
                self.reference, ids, mask, response_start, True, overhead, transform
            )
            rm_score = self._text_scores(prompts, responses)
        ref_logprobs = ref_logprobs * response_mask
        kl = (kl_per_token(logprobs, ref_logprobs, "k1") * response_mask).sum(-1)  # (k,): always k1
        kl = kl.cpu().numpy().astype(np.float32)
        if self.gold_fn is self.reward_fn:  # the gold reward serves as the reward model: score once
            gold = rm_score.copy()
        elif self.gold_fn is not None:
            gold = check_scores(
                self.gold_fn(list(prompts), list(responses)), len(responses), self.gold_name, responses
            )
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

    def _text_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return check_scores(
            self.reward_fn(list(prompts), list(responses)), len(responses), self.reward_name, responses
        )

    def _rows_with_specials(self, response_ids: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
        """Rows whose response holds a special token other than its final EOS (the decoded text drops it).

        Only those rows go the text path; the others' token scores equal it when every sequence plus its
        EOS fits the reward model (otherwise the text path keeps only the last `max_length` tokens)."""
        last = response_mask.sum(-1, keepdims=True) - 1  # (k, 1)
        final_eos = (np.arange(response_ids.shape[1]) == last) & (response_ids == self.tokenizer.eos_token_id)
        odd = np.isin(response_ids, self.tokenizer.all_special_ids) & (response_mask == 1) & ~final_eos
        return np.flatnonzero(odd.any(-1))

    def _reference_and_reward(
        self, reward_model: Any, ids: torch.Tensor, mask: torch.Tensor, response_start: int
    ) -> tuple[torch.Tensor, np.ndarray]:
        """pi_ref's response log-probs (k, N) and the reward model's scores (k,) from one reference forward.

        The reward model reads `prompt + response + EOS`: rows cut off at N tokens get the EOS appended in
        one extra column, whose log-prob only the reward model's statistics use. It reads pi_ref's own
        log-probs; the KL's come from the same logits through the env's sampling options.
        """
        k, n = ids.shape[0], ids.shape[1] - response_start
        last = last_token_index(mask)  # (k,)
        rows = torch.arange(k, device=ids.device)
        needs_eos = ids[rows, last] != self.tokenizer.eos_token_id
        ids = torch.cat([ids, ids.new_full((k, 1), self.tokenizer.pad_token_id)], dim=1)
        mask = torch.cat([mask, mask.new_zeros((k, 1))], dim=1)
        ids[rows[needs_eos], last[needs_eos] + 1] = self.tokenizer.eos_token_id
        mask[rows[needs_eos], last[needs_eos] + 1] = 1

        def forward(g_ids: torch.Tensor, g_mask: torch.Tensor, start: int) -> tuple[torch.Tensor, ...]:
            logits = token_logits(self.reference, g_ids, g_mask)  # (rows, T-1, V)
            logprobs = logprobs_from_logits(logits, g_ids[:, 1:])  # (rows, T-1)
            response = logprobs[:, start - 1 :]  # (rows, n + 1): column j is response token j
            if not self.sampling.is_identity:
                response = logprobs_from_logits(
                    self.sampling.logits(logits[:, start - 1 :]), g_ids[:, start:]
                )
            return response, reward_model.score_tokens(g_ids, g_mask, logprobs)

        ref_logprobs, scores = by_response_length(
            forward, ids, mask, response_start, self.speed.overhead_tokens, calls=2
        )
        return ref_logprobs[:, :n], check_scores(scores, k, self.reward_name)
