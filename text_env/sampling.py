"""`SamplingOptions`: the distribution a token is drawn from, as one function of the policy's logits.

A sampling option changes the distribution that is sampled, so it changes the objective unless every
log-prob that enters the objective is of that same distribution (issue 12). Call it q: the policy's logits
with EOS banned before `min_new_tokens` response tokens, divided by `temperature`, cut to the `top_k` most
likely tokens and to the smallest set of mass `top_p`, renormalised (the order of Hugging Face's
`generate`). The sampler logs `log q(token)` and q's entropy; PPO's old and new log-probs and REINFORCE's
score function are `log q` too (`SamplingOptions.logprobs` on their teacher-forced logits), so the ratio and
the gradient are those of the distribution the tokens came from.

Two owners, two meanings:

* **The env's options** (`EnvCore(temperature=..., min_new_tokens=...)`, read back as `envs.sampling`)
  define the task's policy. Both sides of the KL are transformed alike: the judge scores pi_ref at the
  same temperature, with EOS banned at the same steps, so pi_ref sampled by the env's rules has KL 0 to
  the reference at any temperature, as in TRL, which divides the policy's and the reference's logits by
  one temperature. Banning EOS in the reference too is the principled reading of `min_new_tokens`: the
  task forbids the action, so the reference policy of the task is pi_ref conditioned on not ending; the
  unmasked pi_ref would charge every response a KL of `-log(1 - pi_ref(EOS))` per banned step that no
  policy can avoid, and that would reward drifting to prefixes where pi_ref rarely ends.
* **An agent's own tweak** (`rollout(envs, temperature=0.7)`: RAFT's or the labeller's `temperature`, a
  `top_k` or `top_p`, a larger `min_new_tokens`) changes only q. The KL is then that of q against the
  env's reference: sampling pi_ref at temperature 0.7 reports the real KL(q || pi_ref) > 0, not 0.

The env offers temperature and `min_new_tokens` only: a top-k or top-p filter applied to both sides would
give the policy and the reference different supports, hence an infinite KL as soon as they disagree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from numbers import Integral
from typing import ClassVar

import torch

from rlhf_base.ranges import Range, check_ranges

__all__ = ["SamplingOptions"]


@dataclass(frozen=True)
class SamplingOptions:
    """How the policy's logits become the distribution q that a token is drawn from; the defaults: q = pi."""

    RANGES: ClassVar[dict[str, Range]] = {
        "temperature": Range(gt=0),  # 0 would divide by zero (greedy decoding is top_k=1)
        "top_k": Range(ge=0),  # 0 is "no filter", not "no tokens"
        "top_p": Range(gt=0, le=1),  # 0 would keep no token
        "min_new_tokens": Range(ge=0),
        "eos_token_id": Range(ge=0),
    }

    temperature: float = 1.0  # logits / temperature (1: the policy's own distribution)
    top_k: int = 0  # keep the k most likely tokens (0: no top-k filter, all tokens; 1: greedy)
    top_p: float = 1.0  # keep the smallest set of most likely tokens with mass >= top_p (1: all)
    min_new_tokens: int = 0  # EOS is banned at response steps 0 .. min_new_tokens - 1
    eos_token_id: int | None = None  # the token `min_new_tokens` bans

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.min_new_tokens > 0 and self.eos_token_id is None:
            raise ValueError(
                "min_new_tokens > 0 needs eos_token_id, the token it bans: pass "
                "SamplingOptions(eos_token_id=tokenizer.eos_token_id, ...)"
            )

    @property
    def is_identity(self) -> bool:
        """True when q is the policy itself (temperature 1, no filter, EOS never banned)."""
        return self.temperature == 1 and self.top_k == 0 and self.top_p == 1 and self.min_new_tokens == 0

    def replace(self, **changes: object) -> SamplingOptions:
        """A copy with `changes`; None values keep this one's (so `rollout`'s unset arguments mean "the env's")."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def logits(self, logits: torch.Tensor, step: int | torch.Tensor | None = None) -> torch.Tensor:
        """q's logits (unnormalised; -inf on excluded tokens) from the policy's.

        Args:
            logits: (b, V) next-token logits at response step `step` (the sampler, an agent's `act`), or
                (B, N, V) teacher-forced logits whose column j predicts response token j (`step=None`), as
                `rlhf_base.lm.teacher_forced` returns them and `by_response_length` passes them on.
            step: the response step of (b, V) logits: an int for every row, or a (b,) tensor, one per row
                (response tokens so far); None: the steps are 0 .. N - 1 along dim -2.

        Returns:
            `logits` itself when q is the policy (no copy, so the default path stays bit-identical), else a
            new tensor of the same shape; gradients flow through the kept tokens.
        """
        if self.is_identity:
            return logits
        if self.min_new_tokens > 0:
            logits = self._ban_eos(logits, step)
        if self.temperature != 1:
            logits = logits / self.temperature
        if self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs >= self.top_p  # keep the smallest set reaching top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return logits

    def logprobs(self, logits: torch.Tensor, step: int | torch.Tensor | None = None) -> torch.Tensor:
        """log q over the vocabulary, same shape as `logits` (see `logits` for the layout and `step`)."""
        return torch.log_softmax(self.logits(logits, step), dim=-1)

    def _ban_eos(self, logits: torch.Tensor, step: int | torch.Tensor | None) -> torch.Tensor:
        if isinstance(step, Integral):  # the sampler: one step for every row
            if step >= self.min_new_tokens:
                return logits
            return logits.index_fill(
                -1, torch.tensor([self.eos_token_id], device=logits.device), float("-inf")
            )
        eos = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)  # (V,)
        eos[self.eos_token_id] = True
        if step is None:  # teacher-forced (..., N, V): column j is step j
            step = torch.arange(logits.shape[-2], device=logits.device)  # (N,)
        banned = torch.as_tensor(step, device=logits.device) < self.min_new_tokens  # (b,) or (N,)
        return logits.masked_fill(banned[..., None] & eos, float("-inf"))
