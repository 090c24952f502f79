"""`SpeedOptions`: the speed fixes of the env, its sampler and its scoring, as explicit switches.

Each field is one measured fix (README, "What was fixed"); `benchmarks/ablation.py` turns them off one at a
time to show what each buys. They change how fast, never what: with any of them off, a fixed-seed rollout
draws the same tokens and gives the same log-probs and rewards to float tolerance (tested), except
`sampler="multinomial"`, which draws from the same distribution with other random numbers.

The env holds one (`EnvCore(speed=...)`, `EnvConfig.speed`, read back as `envs.speed`): its judge's scoring
follows it, `text_env.rollout` follows it unless given its own (`rollout(envs, speed=...)`), and agents'
teacher-forced updates over the env's batches follow its `group_by_length`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from rlhf_base.ranges import Range, check_ranges

__all__ = ["SAMPLERS", "SpeedOptions"]

SAMPLERS = ("inverse_cdf", "multinomial")


@dataclass(frozen=True)
class SpeedOptions:
    """The defaults are the fast path; each field documents what turning it off means."""

    RANGES: ClassVar[dict[str, Range]] = {
        "compact_below": Range(ge=0, le=1),  # a share of the rows
        "compact_min_rows": Range(ge=1),
        "share_prefill_below": Range(ge=0, le=1),  # a share of the rows
    }

    # The sampler drops ended rows from the batch and its KV cache once at most this share of the rows is
    # still generating (0: never; every row decodes to the end) ...
    compact_below: float = 0.75
    # ... and at least this many rows have ended (a step of a few rows costs about as much as a full one).
    compact_min_rows: int = 8
    # Prefill each distinct prompt once and copy its cache to its repeats (RLOO's k samples) when the
    # distinct prompts are at most this share of the rows (0: never; every row prefills its own prompt).
    share_prefill_below: float = 0.5
    # Decode into a KV cache allocated once (`text_env.kv_cache`); False: transformers' cache, which copies
    # itself with `torch.cat` at every step.
    preallocate_cache: bool = True
    # "inverse_cdf": one uniform number per row (`sample_categorical`); "multinomial": `torch.multinomial`,
    # which draws V numbers per row (the same distribution, other draws).
    sampler: Literal["inverse_cdf", "multinomial"] = "inverse_cdf"
    # Teacher-forced forwards (the judge's, agents' updates) run rows of similar length together, each group
    # cut to its own width (`rlhf_base.lm.by_response_length`); False: one group padded to the longest row.
    group_by_length: bool = True
    # A reward model that reads pi_ref's log-probs takes them from the reference forward the KL needs
    # anyway (`Judge.shared_reward_model`); False: it re-tokenises the text and runs its own copy of pi_ref.
    share_reference_forward: bool = True

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid: {list(SAMPLERS)}")

    @property
    def overhead_tokens(self) -> float | None:
        """What to pass `by_response_length(..., overhead_tokens=)`: None, its measured per-device call
        cost (length groups), or infinity (one group) when `group_by_length` is off."""
        return None if self.group_by_length else math.inf
