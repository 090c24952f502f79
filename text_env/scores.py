"""`Scores`: the judge's verdict on k finished rows, one entry per row, as the env's batch API returns it.

The vector env's `step` must report scores in Gymnasium's vector layout (a (B, ...) array per key plus a
`_key` row mask), which pads k rows out to B; a sampler that wants the k rows back would have to unpad them.
`TextGenVectorEnv.score_pending()` returns this compact record instead, and `step` and the single env build
their Gymnasium `info` from it, so the two layouts cannot drift apart.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["INFO_KEYS", "Scores"]

#: The keys of a finished episode's `info`, in both envs: every field of `Scores` but `rows` and `reward`.
INFO_KEYS = (
    "rm_score",
    "kl",
    "gold_score",
    "prompt",
    "response",
    "response_length",
    "logprobs",
    "ref_logprobs",
)


@dataclass(frozen=True)
class Scores:
    """k scored rows of a vector env (k may be 0); entry i of every field belongs to env row `rows[i]`.

    N is the env's `max_new_tokens`; per-token arrays are 0 past each row's `response_length`.
    """

    rows: np.ndarray  # (k,) int64 env rows, ascending
    reward: np.ndarray  # (k,) float32 the env reward: rm_score - beta * kl
    rm_score: np.ndarray  # (k,) float32 the reward model's score (the proxy agents optimise)
    kl: np.ndarray  # (k,) float32 summed per-token KL estimate of the response
    gold_score: np.ndarray  # (k,) float32 the task's gold reward, NaN without one (evaluation only)
    logprobs: np.ndarray  # (k, N) float32 log q of each response token (q: the distribution sampled)
    ref_logprobs: np.ndarray  # (k, N) float32 log pi_ref of each response token
    prompt: list[str]  # (k,) prompt texts
    response: list[str]  # (k,) response texts, without EOS
    response_length: np.ndarray  # (k,) int64 response tokens, EOS included
    num_envs: int | None = None  # B of the env that scored them, for the old `(rewards, info)` unpacking

    @classmethod
    def empty(cls, max_new_tokens: int) -> Scores:
        """No rows: what `score_pending()` returns when nothing is pending."""
        none, tokens = np.zeros(0, dtype=np.float32), np.zeros((0, max_new_tokens), dtype=np.float32)
        return cls(
            rows=np.zeros(0, dtype=np.int64), reward=none, rm_score=none, kl=none, gold_score=none,
            logprobs=tokens, ref_logprobs=tokens, prompt=[], response=[],
            response_length=np.zeros(0, dtype=np.int64),
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Any]:
        """Deprecated: `rewards, info = envs.score_pending()`, the return value before `Scores` (issue 11):
        the (B,) padded rewards and Gymnasium's vector info ({} when no row was pending)."""
        warnings.warn(
            "score_pending() returns a Scores record now; unpacking it as (rewards, info) is deprecated: use "
            "scores.padded_rewards(num_envs) and scores.vector_info(num_envs), or the per-row fields",
            DeprecationWarning,
            stacklevel=2,
        )
        if self.num_envs is None:
            raise TypeError("these Scores did not come from score_pending(): they do not know B to pad to")
        info = self.vector_info(self.num_envs) if len(self) else {}
        return iter((self.padded_rewards(self.num_envs), info))

    def episode_info(self, i: int) -> dict[str, Any]:
        """The single env's `info` for scored entry `i`: plain floats and strings, per-token arrays cut to
        the response's length."""
        n = int(self.response_length[i])
        return {
            "rm_score": float(self.rm_score[i]),
            "kl": float(self.kl[i]),
            "gold_score": float(self.gold_score[i]),
            "prompt": self.prompt[i],
            "response": self.response[i],
            "response_length": n,
            "logprobs": self.logprobs[i, :n],
            "ref_logprobs": self.ref_logprobs[i, :n],
        }

    def vector_info(self, num_envs: int) -> dict[str, Any]:
        """Gymnasium's vector `info` layout: for each key a (B, ...) array (0 or None off `rows`) and
        `"_" + key`, the (B,) mask of the rows it is valid for."""
        mask = np.zeros(num_envs, dtype=bool)
        mask[self.rows] = True
        info: dict[str, Any] = {}
        for key in INFO_KEYS:
            value = getattr(self, key)
            if isinstance(value, list):
                full = np.full(num_envs, None, dtype=object)
                full[self.rows] = value
            else:
                full = np.zeros((num_envs, *value.shape[1:]), dtype=value.dtype)
                full[self.rows] = value
            info[key], info[f"_{key}"] = full, mask
        return info

    def padded_rewards(self, num_envs: int) -> np.ndarray:
        """(B,) float32 rewards: `reward` at `rows`, 0 elsewhere (what `step` pays)."""
        rewards = np.zeros(num_envs, dtype=np.float32)
        rewards[self.rows] = self.reward
        return rewards
