"""Supervised fine-tuning (SFT): the step that turns a base LM into the reference policy pi_ref.

RLHF starts from a model fine-tuned on demonstrations (Ouyang et al. 2022, arXiv:2203.02155, step 1;
Stiennon et al. 2020, arXiv:2009.01325, section 3). The loss is next-token cross-entropy on the response
only: the prompt is context, not something the policy is asked to write, so its labels are -100.

This module holds SFT's pieces: the data (demonstrations in, token ids out), the loss and one step, which
RAFT reuses. The stage that runs them (`SFTConfig`, `train_sft`, `run_sft`, `rlhf-gym sft`) is
`rlhf_gym.sft`, on the floor of the stages.

Batches are dicts of `input_ids`, `attention_mask` and `labels` (the Hugging Face convention: `labels[t]`
is the token at t, or -100; `sft_loss` shifts). Any padding layout works, because position ids are taken
from the mask: SFT pads on the right, RAFT (`agents/raft.py`) hands the env's left-padded rollouts in
as they are, and both go through the same `sft_loss` and `sft_step`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from agents.base import NonFiniteLossError
from rlhf_base.deprecation import moved_names
from rlhf_base.io import DataError, read_records
from rlhf_base.lm import context_length, position_ids_from_mask

__all__ = [
    "IGNORE_INDEX",
    "collate",
    "encode_demonstrations",
    "load_demonstrations",
    "response_nll",
    "sft_loss",
    "sft_step",
    "take_rows",
]

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding); PyTorch's cross-entropy default

#: One tokenised demonstration: (prompt ids, completion ids), the completion being the response plus EOS.
Example = tuple[list[int], list[int]]


# --------------------------------------------------------------------------------------------------------
# Data: demonstrations in, token ids out
# --------------------------------------------------------------------------------------------------------
def load_demonstrations(source: Any) -> list[tuple[str, str]]:
    """(prompt, response) pairs from a JSONL/JSON/CSV/Parquet file, a `datasets.Dataset`, dicts, or pairs.

    Files and datasets need string fields "prompt" and "response"; a malformed record is reported with
    the file and line (`rlhf_base.io.read_records`). The training text is `prompt + " " + response`.
    """
    if isinstance(source, (list, tuple)) and source and all(isinstance(p, (list, tuple)) for p in source):
        bad = [i for i, p in enumerate(source) if len(p) != 2 or not all(isinstance(s, str) for s in p)]
        if bad:
            raise DataError(
                f"demonstration {bad[0]} is {source[bad[0]]!r}; expected a (prompt, response) of strings"
            )
        return [(p, r) for p, r in source]
    records = read_records(source, required=["prompt", "response"], what="demonstration")
    return [(r["prompt"], r["response"]) for r in records]


def _response_text(prompt: str, response: str) -> str:
    """The response as it follows the prompt: joined by one space, which BPE tokenizers fold into a token."""
    if prompt and response and not prompt[-1].isspace() and not response[0].isspace():
        return " " + response
    return response


def encode_demonstrations(
    tokenizer: PreTrainedTokenizerBase,
    demonstrations: Sequence[tuple[str, str]],
    max_length: int | None = None,
) -> list[Example]:
    """Tokenise each pair as the env would see it: prompt ids (as the env tokenises prompts), then response + EOS.

    The prompt and response are tokenised apart so the boundary is exact for any tokenizer, and the EOS is
    appended by id, so a tokenizer whose pad token is its EOS still trains the model to stop.

    Raises:
        DataError: a prompt tokenises to nothing or leaves no room for the response within `max_length`.
    """
    prompts = tokenizer([p for p, _ in demonstrations])["input_ids"]
    responses = tokenizer([_response_text(p, r) for p, r in demonstrations], add_special_tokens=False)[
        "input_ids"
    ]
    eos, examples, cut = tokenizer.eos_token_id, [], 0
    for i, (prompt_ids, response_ids) in enumerate(zip(prompts, responses, strict=True)):
        if not prompt_ids:
            raise DataError(f"demonstration {i}: the prompt {demonstrations[i][0]!r} tokenises to no tokens")
        completion = list(response_ids) + [eos]
        if max_length is not None:
            if len(prompt_ids) >= max_length:
                raise DataError(
                    f"demonstration {i}: the prompt has {len(prompt_ids)} tokens, leaving no room for the "
                    f"response within max_length={max_length}; shorten it or raise max_length"
                )
            cut += len(prompt_ids) + len(completion) > max_length
            completion = completion[: max_length - len(prompt_ids)]
        examples.append((list(prompt_ids), completion))
    if cut:
        warnings.warn(
            f"{cut} of {len(examples)} demonstrations exceed max_length={max_length} and were cut (they lose "
            "their EOS, so the model is not taught to stop there)",
            stacklevel=2,
        )
    return examples


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 on prompt and padding), each (B, L)."""
    width = max(len(p) + len(c) for p, c in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, completion) in enumerate(examples):  # once per data set, not per step
        n_prompt, n = len(prompt), len(prompt) + len(completion)
        input_ids[row, :n] = torch.tensor(prompt + completion)
        attention_mask[row, :n] = 1
        labels[row, n_prompt:n] = torch.tensor(completion)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def take_rows(
    data: dict[str, torch.Tensor], rows: torch.Tensor | np.ndarray, device: torch.device
) -> dict[str, torch.Tensor]:
    """Rows of a right-padded data set, trimmed to the longest of them (so a batch of short ones is cheap)."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    width = int(data["attention_mask"][rows].sum(-1).max())
    return {k: v[rows, :width].to(device) for k, v in data.items()}


# --------------------------------------------------------------------------------------------------------
# Loss and one training step (RAFT reuses both)
# --------------------------------------------------------------------------------------------------------
def _token_nll(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL (B, L - 1) and the mask of tokens that carry a label."""
    mask = batch["attention_mask"]
    logits = model(
        input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask)
    ).logits[:, :-1]  # (B, L - 1, V): position t predicts token t + 1
    labels = batch["labels"][:, 1:]  # (B, L - 1)
    nll = F.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B, L - 1), 0 where ignored
    return nll, labels != IGNORE_INDEX


def sft_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response and EOS) tokens of the batch.

    Args:
        batch: `input_ids`, `attention_mask`, `labels`, each (B, L); `labels[t]` is the token at t, or -100.
    """
    nll, labelled = _token_nll(model, batch)
    return nll.sum() / labelled.sum().clamp(min=1)


def sft_step(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    *,
    max_grad_norm: float = 1.0,
    at: str = "",
) -> tuple[float, float]:
    """One optimiser step on `sft_loss`; a NaN/inf loss or gradient stops before the weights change.

    `at` says where in training this is, for the error message (e.g. " at step 3").

    Returns:
        `(loss, grad_norm)` as Python floats (the norm before clipping).

    Raises:
        NonFiniteLossError: the loss or the gradient norm is not finite; the weights are untouched.
    """
    loss = sft_loss(model, batch)
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"SFT loss is {loss.item()}{at}: stopped before the update, so the weights and the "
            "last checkpoint are intact; lower the learning rate or check the data"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(
            f"SFT gradient norm is {grad_norm.item()}{at}: stopped before the update, so the "
            "weights and the last checkpoint are intact; lower the learning rate"
        )
    optimizer.step()
    return loss.item(), grad_norm.item()


@torch.no_grad()
def response_nll(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, demonstrations: Any, batch_size: int = 128
) -> float:
    """Mean per-token NLL (nats) of the responses (and EOS) given the prompts: the held-out SFT metric.

    `demonstrations` are (prompt, response) pairs or already-encoded `Example`s.
    """
    examples = demonstrations
    if examples and isinstance(examples[0][0], str):
        examples = encode_demonstrations(tokenizer, demonstrations, context_length(model))
    data, device = collate(examples, tokenizer.pad_token_id), next(model.parameters()).device
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    for start in range(0, len(examples), batch_size):
        nll, labelled = _token_nll(
            model, take_rows(data, np.arange(start, min(start + batch_size, len(examples))), device)
        )
        total, count = total + nll.sum().item(), count + int(labelled.sum())
    model.train(was_training)
    return total / max(count, 1)


# The training loop is a stage (rlhf_gym.sft), the `sft` command is rlhf_gym.cli's; the old names work, with a
# warning.
_STAGE = ("SFTConfig", "train_sft", "run_sft", "grammatical_fraction", "EVAL_SEED_OFFSET")
__getattr__ = moved_names(
    __name__, {**dict.fromkeys(_STAGE, "rlhf_gym.sft"), "add_sft_command": "rlhf_gym.cli"}
)
