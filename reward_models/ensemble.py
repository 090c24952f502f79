"""A reward model ensemble: k reward models whose scores combine into one reward.

Coste et al. 2024 ("Reward Model Ensembles Help Mitigate Overoptimization", https://arxiv.org/abs/2310.02743)
train k reward models that differ only in their seed and optimise a conservative combination of their
scores. With `R` the (k, B) member scores of B responses:

* `mean`: `mean_i R_i`, the plain ensemble average.
* `worst`: `min_i R_i`, worst-case optimisation (WCO): a response is only as good as its harshest member
  says.
* `uwo`: `mean_i R_i - lambda * var_i R_i`, uncertainty-weighted optimisation (UWO): the average, less a
  penalty on the members' disagreement. `var` is the population variance over the k members,
  `(1/k) sum_i (R_i - mean R)^2` (Coste et al., eq. 5), so a 1-member ensemble has none.

Members must share one scale for `worst` and `uwo` to mean anything: those `train-rm` trains
(`ensemble_size: k`) are each normalised to mean 0, std 1 on the same sample of pi_ref's responses, and the
combined score is reported in those units, not normalised again (the pessimism is the point).

Saved as a folder: `ensemble.json` (the combination, lambda, and the members' subfolder names) and one
subfolder per member, each what `RewardModel.save` writes (safetensors, never a pickle).
`reward_models.load_reward_model(folder)` recognises it, so `env.reward_model=runs/rm/reward_model` works
for an ensemble wherever it works for one model.

When every member's head reads pi_ref's log-probs (the pipeline's reward models), the ensemble takes the
env's shared reference forward as one model does (`reads_logprobs_of`, `score_tokens`): one forward of
pi_ref per batch for all k members.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reward_models.model import RewardModel
from rlhf_base.io import atomic_dir, atomic_write

__all__ = ["COMBINES", "ENSEMBLE_FILE", "ENSEMBLE_FORMAT_VERSION", "RewardEnsemble", "combine_scores"]

COMBINES = ("mean", "worst", "uwo")
"""How member scores combine: the mean, the minimum (WCO), or the mean less lambda times the variance (UWO)."""

ENSEMBLE_FILE = "ensemble.json"
"""The file that makes a folder an ensemble for `load_reward_model`."""

ENSEMBLE_FORMAT_VERSION = 1
"""Version of `ensemble.json`'s layout; a file without `format_version` is read as this one."""


def combine_scores(member_scores: torch.Tensor, combine: str, uwo_lambda: float = 1.0) -> torch.Tensor:
    """One score per response from the members' scores.

    Args:
        member_scores: (k, B) one row per member.
        combine: "mean", "worst" (the minimum over members) or "uwo" (mean - uwo_lambda * population
            variance over members).
        uwo_lambda: UWO's weight on the variance; unused otherwise.

    Returns:
        (B,) the combined scores.
    """
    if member_scores.ndim != 2 or member_scores.shape[0] < 1:
        raise ValueError(f"member_scores must be (k, B) with k >= 1, got shape {tuple(member_scores.shape)}")
    if combine == "mean":
        return member_scores.mean(0)
    if combine == "worst":
        return member_scores.min(0).values
    if combine == "uwo":
        return member_scores.mean(0) - uwo_lambda * member_scores.var(0, unbiased=False)
    raise ValueError(f"unknown combine {combine!r}; valid: {', '.join(COMBINES)}")


def _check_combination(combine: Any, uwo_lambda: Any) -> None:
    if combine not in COMBINES:
        raise ValueError(f"unknown combine {combine!r}; valid: {', '.join(COMBINES)}")
    if isinstance(uwo_lambda, bool) or not isinstance(uwo_lambda, (int, float)):
        raise ValueError(f"uwo_lambda must be a finite number >= 0, got {uwo_lambda!r}")
    if not (math.isfinite(uwo_lambda) and uwo_lambda >= 0):
        raise ValueError(f"uwo_lambda must be a finite number >= 0, got {uwo_lambda}")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    mine, theirs = a.state_dict(), b.state_dict()
    return mine.keys() == theirs.keys() and all(
        mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k].to(mine[k].device)) for k in mine
    )


def _share_frozen_lms(members: Sequence[Any]) -> None:
    """Point members whose frozen LMs hold the same weights at one copy (k copies of pi_ref -> one).

    Each saved member carries its frozen LM, so a loaded ensemble would otherwise hold k identical copies;
    the frozen LM is never trained, so sharing it changes no score.
    """
    kept: list[torch.nn.Module] = []
    for member in members:
        reference = getattr(member, "reference", None)
        if not isinstance(member, RewardModel) or reference is None:
            continue
        twin = next((r for r in kept if r is reference or _same_weights(r, reference)), None)
        if twin is None:
            kept.append(reference)
        else:
            member.reference = twin


class RewardEnsemble:
    """k reward models behind one `score(prompts, responses)`: their scores combined by `combine`.

    Args:
        members: the reward models (each with `.score(prompts, responses)`; `RewardModel`s to be saved).
        combine: "mean", "worst" or "uwo" (see `combine_scores`).
        uwo_lambda: UWO's weight on the members' variance.
    """

    def __init__(self, members: Sequence[Any], combine: str = "mean", uwo_lambda: float = 1.0) -> None:
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one member")
        _check_combination(combine, uwo_lambda)
        self.members = list(members)
        self.combine, self.uwo_lambda = combine, float(uwo_lambda)
        _share_frozen_lms(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def recombined(self, combine: str, uwo_lambda: float | None = None) -> RewardEnsemble:
        """The same members (shared, not copied) under another combination: one trained ensemble serves
        a sweep over `mean`, `worst` and `uwo` (the env's `reward_combine`). `uwo_lambda` None keeps this
        ensemble's."""
        lam = self.uwo_lambda if uwo_lambda is None else uwo_lambda
        _check_combination(combine, lam)
        other = copy.copy(self)  # shallow: the members (and their one frozen LM) are shared
        other.combine, other.uwo_lambda = combine, float(lam)
        return other

    def __repr__(self) -> str:
        lam = f", uwo_lambda={self.uwo_lambda:g}" if self.combine == "uwo" else ""
        return f"RewardEnsemble({len(self)} members, combine={self.combine!r}{lam})"

    @property
    def max_length(self) -> int:
        """The shortest member's longest sequence: what the env's shared path may hand all of them."""
        return min(int(getattr(m, "max_length", 1 << 62)) for m in self.members)

    # ----------------------------------------------------------------------------------------------------
    # Scoring
    # ----------------------------------------------------------------------------------------------------
    def member_scores(
        self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 256
    ) -> torch.Tensor:
        """Every member's scores, (k, B) float32 on the CPU: for diagnostics (disagreement) and `score`."""
        rows = []
        for member in self.members:
            if isinstance(member, RewardModel):
                scores = member.score(prompts, responses, batch_size)
            else:
                scores = member.score(list(prompts), list(responses))
            rows.append(torch.as_tensor(scores, dtype=torch.float32).detach().cpu().reshape(-1))
        return torch.stack(rows)

    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """The combined scores, (B,) float32 on the CPU; what the env calls."""
        return combine_scores(
            self.member_scores(prompts, responses, batch_size), self.combine, self.uwo_lambda
        )

    def reads_logprobs_of(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> bool:
        """Whether every member's frozen LM is `model`: then the env's reference forward serves them all."""
        return all(
            callable(getattr(m, "reads_logprobs_of", None)) and m.reads_logprobs_of(model, tokenizer)
            for m in self.members
        )

    @torch.no_grad()
    def score_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_logprobs: torch.Tensor
    ) -> torch.Tensor:
        """The combined scores from the frozen LM's token log-probs (`RewardModel.score_tokens`), (B,)."""
        member_scores = torch.stack(
            [m.score_tokens(input_ids, attention_mask, token_logprobs).float() for m in self.members]
        )
        return combine_scores(member_scores, self.combine, self.uwo_lambda)

    # ----------------------------------------------------------------------------------------------------
    # Modes, devices, saving
    # ----------------------------------------------------------------------------------------------------
    def eval(self) -> RewardEnsemble:
        for member in self.members:
            if hasattr(member, "eval"):
                member.eval()
        return self

    def to(self, device: str | torch.device) -> RewardEnsemble:
        for member in self.members:
            if hasattr(member, "to"):
                member.to(device)
        return self

    def save(self, path: str | os.PathLike) -> Path:
        """Write the ensemble as a folder, atomically: `ensemble.json` and `member_0/`, `member_1/`, ...

        Raises:
            TypeError: a member cannot be saved (only `RewardModel`s can; wrap others in your own folder).
        """
        unsaveable = [i for i, m in enumerate(self.members) if not isinstance(m, RewardModel)]
        if unsaveable:
            raise TypeError(
                f"ensemble members {unsaveable} are not RewardModels and cannot be saved; save them yourself "
                f"and list their folders in {ENSEMBLE_FILE}"
            )
        names = [f"member_{i}" for i in range(len(self.members))]
        meta = {
            "format_version": ENSEMBLE_FORMAT_VERSION,
            "kind": "ensemble",
            "combine": self.combine,
            "uwo_lambda": self.uwo_lambda,
            "members": names,
        }
        with atomic_dir(path) as tmp:
            for name, member in zip(names, self.members, strict=True):
                member.save(tmp / name)
            atomic_write(tmp / ENSEMBLE_FILE, json.dumps(meta, indent=2) + "\n")
        return Path(path)
