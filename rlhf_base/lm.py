"""Forward-pass helpers for any causal LM: positions, teacher forcing, length groups, context length.

Shared by the env's judge, the reward model and the agents' updates, so each runs the same teacher-forced
forward: position ids that count real tokens only (left-padded prompts start at 0), logits only for the
positions that predict response tokens, and rows grouped by response length so padding costs little.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from rlhf_base.maths import logprobs_from_logits

__all__ = [
    "CALL_OVERHEAD_TOKENS",
    "by_response_length",
    "call_overhead_tokens",
    "context_length",
    "last_token_index",
    "length_groups",
    "position_ids_from_mask",
    "response_logprobs",
    "teacher_forced",
    "token_logits",
    "token_logprobs",
]

# What one more forward call costs, in padded token positions: the fixed Python and kernel-launch overhead
# of a call against the cost of one more position in it (measured on the tiny model: ~1.5 ms a call, ~40 us
# a position on one CPU core; on a GPU a position is nearly free, so there it pays to make few, wide calls).
# On the CPU a position's cost falls with the threads and a call's does not: see `call_overhead_tokens`.
CALL_OVERHEAD_TOKENS = {"cpu": 48, "cuda": 16384, "mps": 4096}


def call_overhead_tokens(device: torch.device, calls: int = 1) -> int:
    """The overhead of one more group making `calls` forward calls, in positions, on `device`."""
    per_call = CALL_OVERHEAD_TOKENS.get(device.type, 48)
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    return per_call * threads * calls


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so a left-padded prompt starts at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def length_groups(
    lengths: np.ndarray, width_offset: int = 0, overhead_tokens: float = 48
) -> list[np.ndarray]:
    """Split rows into groups of similar length, minimising the padded positions the forwards compute.

    Rows end at their own EOS, so a batch padded to its longest response computes mostly padding (a
    batch of mean length 12 padded to 32). Rows sorted by length are cut into contiguous groups by an
    exact dynamic programme over the cost `sum_groups(rows * (width_offset + longest)) + overhead * groups`.

    Args:
        lengths: (B,) response lengths.
        width_offset: positions every row computes besides its response (the prompt width).
        overhead_tokens: the cost of one more forward call, in positions (`CALL_OVERHEAD_TOKENS`);
            `math.inf` makes one group (grouping switched off).

    Returns:
        Groups of row indices (longest rows first); together they hold every row exactly once.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")  # longest first: a group's width is its first row's
    if overhead_tokens == math.inf:
        return [order]
    width = lengths[order] + width_offset  # (B,)
    best, cut = np.zeros(len(order) + 1), np.zeros(len(order) + 1, dtype=np.int64)
    for end in range(1, len(order) + 1):  # best[end]: cheapest split of the `end` longest rows
        starts = np.arange(end)
        costs = best[:end] + (end - starts) * width[:end] + overhead_tokens
        cut[end] = int(np.argmin(costs))
        best[end] = costs[cut[end]]
    groups, end = [], len(order)
    while end > 0:
        groups.append(order[cut[end] : end])
        end = int(cut[end])
    return groups[::-1]


def by_response_length(
    fn: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, ...]],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    overhead_tokens: float | None = None,
    calls: int = 1,
) -> tuple[torch.Tensor, ...]:
    """Run a teacher-forced `fn` on length groups of rows, each cut to its own width; reassemble (B, N, ...).

    `fn(ids, mask, start)` returns tensors of shape (rows, start..end width, ...) for the response columns
    of the rows it is given, or (rows,) for a value per row. Each group drops the prompt columns that are
    padding for all of its rows and the response columns past its longest response, which changes no real
    position's result (positions count real tokens; attention is causal). Past a row's end results are junk or 0: mask them, as with one padded
    forward. Gradients flow through. `calls`: the model calls `fn` makes (the group count trades them
    against padding; default `overhead_tokens`: `call_overhead_tokens(device, calls)`; `math.inf`: one
    group, i.e. grouping off).
    """
    num_rows, n = input_ids.shape[0], input_ids.shape[1] - response_start
    host_mask = attention_mask.detach().cpu().numpy()
    lengths = host_mask[:, response_start:].sum(-1)
    if overhead_tokens is None:
        overhead_tokens = call_overhead_tokens(input_ids.device, calls)
    groups = length_groups(lengths, response_start, overhead_tokens)
    if len(groups) == 1 and lengths.max() == n and host_mask[:, 0].any():
        return fn(input_ids, attention_mask, response_start)  # nothing to trim
    outputs: list[torch.Tensor] | None = None
    for rows in groups:
        first = int(host_mask[rows, :response_start].any(0).argmax())  # first column any row uses
        end = response_start + int(lengths[rows].max())
        index = torch.as_tensor(rows, device=input_ids.device)
        parts = fn(input_ids[index, first:end], attention_mask[index, first:end], response_start - first)
        if outputs is None:  # (rows,) per-row values come back (B,); the rest (B, N, ...)
            outputs = [x.new_zeros((num_rows, *(() if x.dim() == 1 else (n, *x.shape[2:])))) for x in parts]
        for out, part in zip(outputs, parts, strict=True):
            if part.dim() == 1:
                out[index] = part
            else:
                out[index, : part.shape[1]] = part
    return tuple(outputs)


def teacher_forced(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    **kwargs: Any,
) -> tuple[Any, torch.Tensor]:
    """One teacher-forced forward: the model's output and the (B, N, V) float32 logits that predict the
    tokens at `response_start:` (position t predicts token t + 1; only those positions reach the LM head).

    Shared by the env's scoring and the agents' updates; `kwargs` go to the model (e.g.
    `output_hidden_states=True` for PPO's value head).
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=input_ids.shape[1] - response_start + 1,
        **kwargs,
    )
    return out, out.logits[:, :-1].float()


def response_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    group_by_length: bool = False,
    overhead_tokens: float | None = None,
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Teacher-forced log-probabilities of the tokens at `response_start:` under `model`.

    Args:
        input_ids: (B, L) prompt left-padded into `[:response_start]`, response right-padded after it.
        attention_mask: (B, L) 1 for real tokens.
        group_by_length: run rows in length groups (`by_response_length`): the same log-probs, less padding.
        overhead_tokens: the call cost that sets the groups (`by_response_length`'s; None: per device).
        logits_fn: maps the (B, N, V) logits to those of the distribution to score (a sampling temperature,
            a banned token), before the log-softmax; column j predicts response token j, in every group.

    Returns:
        (B, L - response_start) float32 log-probabilities (padding positions hold junk; mask them).
    """
    if group_by_length:
        return by_response_length(
            lambda ids, mask, start: (response_logprobs(model, ids, mask, start, logits_fn=logits_fn),),
            input_ids,
            attention_mask,
            response_start,
            overhead_tokens,
        )[0]
    _, logits = teacher_forced(model, input_ids, attention_mask, response_start)
    if logits_fn is not None:
        logits = logits_fn(logits)
    return logprobs_from_logits(logits, input_ids[:, response_start:])


def token_logits(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B, T-1, V) float32 logits at every position t, predicting token t + 1 (no gradients)."""
    with torch.no_grad():  # every position, so no `logits_to_keep`: any causal LM that takes position ids
        return (
            model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            )
            .logits[:, :-1]
            .float()
        )


def token_logprobs(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B, T-1) float32 `log p(token_t+1 | tokens_<=t)` at every position (junk where either is padding)."""
    return logprobs_from_logits(token_logits(model, input_ids, attention_mask), input_ids[:, 1:])


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) column of each row's last real token (the mask's last 1), for prompts left- or right-padded."""
    columns = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * columns).argmax(-1)


def context_length(model: PreTrainedModel) -> int | None:
    """The model's context window in tokens, from whichever config field its architecture uses; None if
    the config names none (then no length check is possible)."""
    config = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
