"""The per-episode state of B responses in lockstep, as numpy arrays: the env's only bookkeeping.

Layout of one row (P = prompt width, N = max_new_tokens):

    [pad pad x1 x2 x3 | y1 y2 <eos> pad pad]
     prompt, left-padded  response, right-padded

Left-padding the prompt puts response token i at column P + i in every row, so a whole batch is scored,
masked and generated with plain slicing, and the obs has a fixed shape for vector envs and SB3.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EpisodeBatch"]


class EpisodeBatch:
    """B rows of prompt + response; `append` adds one token to every unfinished row."""

    def __init__(
        self,
        num_rows: int,
        prompt_ids: np.ndarray,
        prompt_mask: np.ndarray,
        max_new_tokens: int,
        pad_id: int,
        eos_id: int,
    ) -> None:
        """Args:
        prompt_ids, prompt_mask: (num_prompts, P) every prompt of the task, tokenised once and left-padded.
        """
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask
        self.prompt_width = prompt_ids.shape[1]
        self.max_new_tokens, self.pad_id, self.eos_id = max_new_tokens, pad_id, eos_id
        width = self.prompt_width + max_new_tokens
        self.input_ids = np.full((num_rows, width), pad_id, dtype=np.int64)  # (B, P + N)
        self.attention_mask = np.zeros((num_rows, width), dtype=np.int64)  # (B, P + N)
        self.prompt_index = np.zeros(num_rows, dtype=np.int64)  # (B,) which prompt each row answers
        self.num_generated = np.zeros(num_rows, dtype=np.int64)  # (B,) response tokens so far, EOS included
        self.done = np.ones(num_rows, dtype=bool)  # (B,) finished, or never started
        self.started = np.zeros(num_rows, dtype=bool)  # (B,) reset at least once
        self.logprobs = np.zeros((num_rows, max_new_tokens), dtype=np.float32)  # (B, N) given by a sampler
        self.has_logprobs = np.zeros(
            num_rows, dtype=bool
        )  # (B,) every step of the row came with its log-prob

    def reset(self, rows: np.ndarray, prompt_indices: np.ndarray) -> None:
        """Start fresh episodes in `rows` with the given prompts."""
        p = self.prompt_width
        self.input_ids[rows, :p] = self.prompt_ids[prompt_indices]
        self.input_ids[rows, p:] = self.pad_id
        self.attention_mask[rows, :p] = self.prompt_mask[prompt_indices]
        self.attention_mask[rows, p:] = 0
        self.prompt_index[rows] = prompt_indices
        self.num_generated[rows] = 0
        self.done[rows] = False
        self.started[rows] = True
        self.logprobs[rows] = 0.0
        self.has_logprobs[rows] = True

    def append(self, tokens: np.ndarray, logprobs: np.ndarray | None = None) -> np.ndarray:
        """Append `tokens[i]` to each unfinished row i; finished rows ignore theirs.

        `logprobs[i]`, when given, is log q(tokens[i]) as the sampler computed it; a row whose every step
        came with one is scored without re-running the policy.

        Returns:
            (B,) bool: the rows that finished with this token (EOS, or the length limit reached).
        """
        rows = np.flatnonzero(~self.done)
        cols = self.prompt_width + self.num_generated[rows]
        self.input_ids[rows, cols] = tokens[rows]
        self.attention_mask[rows, cols] = 1
        if logprobs is None:
            self.has_logprobs[rows] = False
        else:
            self.logprobs[rows, cols - self.prompt_width] = logprobs[rows]
        self.num_generated[rows] += 1
        finished = np.zeros(len(self.done), dtype=bool)  # (np.zeros_like costs ~2 us of dispatch a call)
        finished[rows] = (tokens[rows] == self.eos_id) | (self.num_generated[rows] >= self.max_new_tokens)
        self.done |= finished
        return finished

    #: The arrays that change as episodes run (the prompt table is the task's, rebuilt with the env).
    STATE = (
        "input_ids",
        "attention_mask",
        "prompt_index",
        "num_generated",
        "done",
        "started",
        "logprobs",
        "has_logprobs",
    )

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the episodes in progress, for a checkpoint taken mid-episode (an SB3 rollout's)."""
        return {name: getattr(self, name).copy() for name in self.STATE}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Put back a `state_dict()` of a batch of the same shape."""
        for name in self.STATE:
            mine, value = getattr(self, name), np.asarray(state[name])
            if value.shape != mine.shape:
                raise ValueError(
                    f"episode state {name!r} has shape {value.shape}; this batch's is {mine.shape}"
                )
            mine[...] = value

    def observation(self, rows: np.ndarray | slice = slice(None)) -> dict[str, np.ndarray]:
        """Copies, so that a caller holding an obs never sees it change under it."""
        return {"input_ids": self.input_ids[rows].copy(), "attention_mask": self.attention_mask[rows].copy()}

    def response_ids(self, row: int) -> np.ndarray:
        """The response tokens of `row`, without its EOS."""
        tokens = self.input_ids[row, self.prompt_width : self.prompt_width + self.num_generated[row]]
        return tokens[:-1] if len(tokens) and tokens[-1] == self.eos_id else tokens
