"""Reward models from elsewhere, behind the same `.score(prompts, responses) -> Tensor (B,)` as `RewardModel`.

* `FunctionRewardModel(fn)`: a plain Python function `(prompts, responses) -> scores` (a rule, a regex, an
  API call, the task's gold reward...).
* `HFSequenceClassifierRewardModel(path_or_model, tokenizer)`: a Hugging Face sequence-classification
  model already trained as a reward model (e.g. a DeBERTa or Llama reward model from the hub, or one saved
  with `save_pretrained`), scored as it was trained: the tokenizer's pair encoding `tokenizer(prompt,
  response)` and the first logit.

The env accepts any of them as `reward_model=...`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_base.io import check_weights_folder
from rlhf_base.models import check_vocabulary, resolve_device

__all__ = ["FunctionRewardModel", "HFSequenceClassifierRewardModel"]


def _check_lengths(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")


class FunctionRewardModel:
    """Wrap `fn(prompts, responses) -> scores` (a list, numpy array or tensor of B numbers) as a reward model.

    Example:
        >>> rm = FunctionRewardModel(lambda prompts, responses: [len(r.split()) for r in responses])
        >>> rm.score(["p"], ["two words"])
        tensor([2.])
    """

    def __init__(self, fn: Callable[[Sequence[str], Sequence[str]], Any], name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(
                f"FunctionRewardModel needs a callable (prompts, responses) -> scores, got {fn!r}"
            )
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """`fn`'s scores as float32 (B,) on the CPU; a wrong count or a NaN/inf is an error naming `fn`."""
        _check_lengths(prompts, responses)
        values = self.fn(list(prompts), list(responses))
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu()
        scores = torch.as_tensor(np.asarray(values, dtype=np.float32))
        if scores.shape != (len(responses),):
            raise ValueError(
                f"reward function {self.name!r} returned shape {tuple(scores.shape)}; expected "
                f"({len(responses)},), one score per response"
            )
        if not torch.isfinite(scores).all():
            bad = int(torch.nonzero(~torch.isfinite(scores))[0])
            raise ValueError(f"reward function {self.name!r} returned {scores[bad].item()} for pair {bad}")
        return scores

    __call__ = score

    def __repr__(self) -> str:
        return f"FunctionRewardModel({self.name})"


class HFSequenceClassifierRewardModel:
    """A trained Hugging Face sequence-classification reward model; the score is the first logit.

    Args:
        path_or_model: a directory (`save_pretrained`, safetensors weights), a hub id, or a loaded
            `PreTrainedModel` for sequence classification.
        tokenizer: its tokenizer; default: loaded from `path_or_model` (required when a model is given).
        device: where it runs ("cpu", "cuda", None/"auto"); a given model is moved there.
        batch_size: pairs per forward pass.
        max_length: longest encoding; default the tokenizer's `model_max_length` if sensible, else the
            model's context length. Longer pairs are truncated from the response's end.
    """

    def __init__(
        self,
        path_or_model: str | os.PathLike | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        device: str | torch.device | None = "cpu",
        batch_size: int = 256,
        max_length: int | None = None,
    ) -> None:
        self.device = resolve_device(device)
        if isinstance(path_or_model, (str, os.PathLike)):
            source = str(Path(path_or_model)) if Path(path_or_model).exists() else str(path_or_model)
            check_weights_folder(source)  # a local folder: safetensors only, each complete (named if not)
            self.model = AutoModelForSequenceClassification.from_pretrained(source, use_safetensors=True)
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(source)
            check_vocabulary(self.model, tokenizer, f"reward model {source!r}")
        elif isinstance(path_or_model, PreTrainedModel):
            if tokenizer is None:
                raise ValueError("a model given as an object needs its tokenizer: pass tokenizer=...")
            self.model = path_or_model
        else:
            raise TypeError(
                "HFSequenceClassifierRewardModel takes a model directory, a hub id or a PreTrainedModel; "
                f"got {type(path_or_model).__name__}"
            )
        if tokenizer.pad_token_id is None:  # decoder-only classifiers (GPT-2, Llama) ship without one
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
            tokenizer.pad_token = tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # they find the last token through the pad id
            self.model.config.pad_token_id = tokenizer.pad_token_id
        self.tokenizer = tokenizer
        self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.batch_size = int(batch_size)
        context = next(
            (
                v
                for v in (
                    getattr(self.model.config, k, None) for k in ("max_position_embeddings", "n_positions")
                )
                if isinstance(v, int) and v > 0
            ),
            None,
        )
        limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None
        self.max_length = max_length or limit or context
        self._takes_token_types = "token_type_ids" in inspect.signature(self.model.forward).parameters

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """First logit of `model(tokenizer(prompt, response))` per pair: float32 (B,) on the CPU."""
        _check_lengths(prompts, responses)
        chunks = []
        for start in range(0, len(prompts), self.batch_size):
            encoded = self.tokenizer(
                list(prompts[start : start + self.batch_size]),
                list(responses[start : start + self.batch_size]),
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            if not self._takes_token_types:  # GPT-2 style tokenizers emit them, some models reject them
                encoded.pop("token_type_ids", None)
            chunks.append(self.model(**encoded).logits[:, 0].float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0)

    __call__ = score

    def __repr__(self) -> str:
        return f"HFSequenceClassifierRewardModel({type(self.model).__name__})"
