"""The reward model: a transformer that reads (prompt, response) and returns one scalar.

Step 2 of RLHF (Stiennon et al. 2020, https://arxiv.org/abs/2009.01325; Ouyang et al. 2022,
https://arxiv.org/abs/2203.02155): the policy's own architecture with the LM head replaced by a scalar head
that reads the hidden state of the **last real token**. An EOS is appended to every response so that token
is the same kind of position whatever the response ends with, as InstructGPT does.

Optionally (`logprob_features=True`, the default task's default) the head also reads three statistics of
the sequence's per-token log-probabilities under a **frozen causal LM**: their mean, minimum and sum. By
default that LM is a copy of the one the body starts from; the pipeline passes pi_ref (`logprob_model`).
An LM knows the language's grammar, so its surprisal is a strong fluency signal that fine-tuning on a few
thousand noisy pairs does not recover on its own (issue 3: on held-out pairs that differ in grammar,
accuracy rose from ~0.65 to ~0.8). It is still one linear head on a transformer, trained only on the pairs
with the Bradley-Terry loss; the frozen LM is an input feature extractor, never trained, and is saved with
the model. When it is pi_ref, the env's reference forward (which the KL needs anyway) gives the features
too: `reads_logprobs_of` says so and `score_tokens` takes them, so scoring a batch costs one forward of
pi_ref, not two (issue 6).

Two ways to build one:

* `RewardModel.from_causal_lm_body(name)`: the body of a causal LM (`lm.base_model`: GPT-2's
  `transformer`, Llama's `model`, ...) plus our `Linear(hidden, 1)` head. `name=None` is the tiny-reviews
  GPT-2 of the default task; a directory (e.g. an SFT output) works too.
* `RewardModel.from_pretrained_classifier(name)`: any Hugging Face model that
  `AutoModelForSequenceClassification` builds with `num_labels=1` (its own head, its own last-token rule).

`score(prompts, responses)` is what the env calls: batched, no grad, **normalised** so that on a sample of
pi_ref's responses the scores have mean 0 and std 1 (`normalise`). Then a KL coefficient `beta` means the
same thing whatever reward model is plugged in (Ziegler et al. 2019 normalise the same way).

Saved as a directory: `model.safetensors`, the backbone's `config.json`, the tokenizer's files and
`reward_model.json` (kind, normalisation, max length). Loading never unpickles.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_base.io import atomic_dir, atomic_write, save_tensors
from rlhf_base.lm import (
    call_overhead_tokens,
    context_length,
    last_token_index,
    length_groups,
    position_ids_from_mask,
    token_logprobs,
)
from rlhf_base.models import fuse_gelu, load_causal_lm, resolve_device

__all__ = [
    "FORMAT_VERSION",
    "LOGPROB_FEATURE_SCALE",
    "RewardModel",
    "logprob_stats",
    "sequence_logprob_stats",
]

FORMAT_VERSION = 1
"""Version of the saved layout, stored in `reward_model.json`; bumped when the layout changes meaning."""

Kind = Literal["causal-lm-body", "sequence-classifier"]

LOGPROB_FEATURE_SCALE = (1.0, 0.2, 0.1)
"""Multipliers of the (mean, min, sum) log-prob features, so each is O(1) like the hidden state's entries:
on the default task the mean is about -2, the minimum about -6 and the sum about -30 nats."""


def logprob_stats(token_logprobs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, 3) scaled (mean, min, sum) of (B, T-1) `token_logprobs` over the real-after-real positions.

    Every real token but the first is scored (the prompt's too: it is the same on both sides of a pair, and
    the prompt/response boundary then need not be passed around); the appended EOS is scored as well, so a
    response that stops mid-sentence is surprising.
    """
    scored = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()  # (B, T-1) real -> real
    total = (token_logprobs * scored).sum(-1)  # (B,)
    count = scored.sum(-1).clamp(min=1)
    lowest = token_logprobs.masked_fill(~scored, 0.0).min(-1).values  # 0 for a one-token sequence
    stats = torch.stack([total / count, lowest, total], dim=-1)  # (B, 3)
    return stats * stats.new_tensor(LOGPROB_FEATURE_SCALE)


def sequence_logprob_stats(
    reference: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B, 3) `logprob_stats` of each sequence under `reference` (frozen: no gradients)."""
    return logprob_stats(token_logprobs(reference, input_ids, attention_mask), attention_mask)


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (EOS, the usual choice for decoder-only models) if it has none."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class RewardModel(nn.Module):
    """A transformer backbone with a scalar head: `r(prompt, response)`.

    Build one with `from_causal_lm_body`, `from_pretrained_classifier` or `build_reward_model`; load a saved
    one with `load_reward_model`.

    Args:
        body: for `kind="causal-lm-body"`, a bare transformer (`GPT2Model`, ...) returning hidden states;
            for `kind="sequence-classifier"`, an `AutoModelForSequenceClassification` model with one label.
        tokenizer: the backbone's tokenizer (a pad token is set if missing).
        kind: which of the two; it decides where the scalar comes from.
        max_length: longest token sequence scored; longer ones keep their last `max_length` tokens (the end
            is what the head reads). Default: the backbone's context length.
        shift, scale: the normalisation, `score = (raw - shift) / scale`; see `normalise`.
        reference: for `kind="causal-lm-body"` only: a causal LM (the one the body was taken from, frozen
            here) whose log-prob statistics (`sequence_logprob_stats`) the head reads next to the last hidden
            state. None: the head reads the hidden state alone.
    """

    def __init__(
        self,
        body: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        kind: Kind = "causal-lm-body",
        max_length: int | None = None,
        shift: float = 0.0,
        scale: float = 1.0,
        reference: PreTrainedModel | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("causal-lm-body", "sequence-classifier"):
            raise ValueError(
                f"unknown reward model kind {kind!r}; valid: 'causal-lm-body', 'sequence-classifier'"
            )
        self.kind: Kind = kind
        self.body = body
        fuse_gelu(body)  # the same function, one kernel: however the body was built or loaded
        self.tokenizer = _prepare_tokenizer(tokenizer)
        if reference is not None and kind != "causal-lm-body":
            raise ValueError("log-prob features (reference=...) need kind='causal-lm-body'")
        self.reference = reference
        if reference is not None:
            reference.requires_grad_(False).eval()  # frozen: its surprisal is a fixed input feature
            fuse_gelu(reference)  # as the body: a reloaded LM comes back with the unfused gelu_new
        if kind == "causal-lm-body":
            hidden = body.config.hidden_size
            extra = 0 if reference is None else len(LOGPROB_FEATURE_SCALE)
            # No bias: the Bradley-Terry loss depends on r_w - r_l only, so a bias never gets a gradient;
            # the offset lives in the normalisation instead. Init std 1/sqrt(hidden + 1) as in Ziegler et
            # al.'s lm-human-preferences reward head.
            self.head: nn.Linear | None = nn.Linear(hidden + extra, 1, bias=False)
            nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden + 1))
        else:
            self.head = None
            if body.config.pad_token_id is None:  # HF classifiers find the last token through the pad id
                body.config.pad_token_id = self.tokenizer.pad_token_id
        context = context_length(body)
        self.max_length = int(max_length or context or self.tokenizer.model_max_length)
        self.shift, self.scale = float(shift), float(scale)
        if not (math.isfinite(self.shift) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(
                f"shift and scale must be finite and scale > 0 (scores are (raw - shift) / scale), got shift "
                f"{shift!r} and scale {scale!r}"
            )

    # ----------------------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------------------
    @property
    def logprob_features(self) -> bool:
        """Whether the head reads the frozen reference LM's log-prob statistics too."""
        return self.reference is not None

    def train(self, mode: bool = True) -> RewardModel:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # frozen features: never in training mode (dropout)
        return self

    @classmethod
    def from_causal_lm_body(
        cls,
        name: str | os.PathLike | None = None,
        *,
        logprob_features: bool = False,
        logprob_model: str | os.PathLike | None = None,
        device: str | torch.device | None = "cpu",
    ) -> RewardModel:
        """The body of a causal LM plus a fresh scalar head (InstructGPT initialises the RM from the SFT model).

        Args:
            name: None/"tiny-reviews" for the default task's GPT-2, or a causal LM directory or hub id.
            logprob_features: keep a frozen causal LM and let the head read its log-prob statistics of
                each sequence as well (see the module docstring).
            logprob_model: that frozen LM (same tokenizer): default a copy of `name`'s. The pipeline passes
                pi_ref, so the env's reference forward gives the features too (`reads_logprobs_of`).
        """
        lm, tokenizer = load_causal_lm(name, device=device)
        reference = None
        if logprob_features:
            reference = (
                copy.deepcopy(lm)
                if logprob_model is None
                else load_causal_lm(logprob_model, device=device)[0]
            )
        body = (
            lm.base_model
        )  # GPT2LMHeadModel.transformer, LlamaForCausalLM.model, ...: the LM minus its head
        model = cls(body, tokenizer, kind="causal-lm-body", reference=reference)
        return model.to(lm.device)

    @classmethod
    def from_pretrained_classifier(
        cls, name: str | os.PathLike, *, device: str | torch.device | None = "cpu"
    ) -> RewardModel:
        """Any model `AutoModelForSequenceClassification` can load, with one output (a new head if needed)."""
        device = resolve_device(device)
        tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(str(name)))
        body = AutoModelForSequenceClassification.from_pretrained(
            str(name), num_labels=1, pad_token_id=tokenizer.pad_token_id
        )
        return cls(body, tokenizer, kind="sequence-classifier").to(device)

    # ----------------------------------------------------------------------------------------------------
    # Tokenising and the forward pass
    # ----------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        """Token ids of `prompt + response + EOS` per pair, as the env builds them: prompt and response
        tokenised apart (the prompt with the tokenizer's own specials, e.g. Llama's BOS), then joined."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        prompt_ids = self._token_ids(list(prompts), add_special_tokens=True)
        response_ids = self._token_ids(list(responses), add_special_tokens=False)
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        return [(p + r + eos)[-self.max_length :] for p, r in zip(prompt_ids, response_ids, strict=True)]

    def _token_ids(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        """`tokenizer(texts)["input_ids"]`; straight from a fast tokenizer's Rust backend when it neither
        truncates nor pads (then the two are the same call), skipping ~30% of Python overhead per batch."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and backend.truncation is None and backend.padding is None:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        return self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]

    def collate(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad token id lists into `(input_ids, attention_mask)`, each (B, T), on the model's device."""
        width = max(map(len, sequences))
        input_ids = np.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(sequences), width), dtype=np.int64)
        for row, ids in enumerate(sequences):  # building the batch in numpy: ~10x less than per-row torch
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return torch.from_numpy(input_ids).to(self.device), torch.from_numpy(attention_mask).to(self.device)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, stats: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw (unnormalised) rewards, (B,), with gradients: what Bradley-Terry training optimises.

        Args:
            input_ids: (B, T) prompt + response + EOS, padded on either side.
            attention_mask: (B, T) 1 on real tokens.
            stats: (B, 3) the frozen LM's `logprob_stats` of these sequences when the caller has them
                (`score_tokens`); by default the frozen LM is run here.
        """
        if self.kind == "sequence-classifier":
            return self.body(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
        hidden = self.body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state  # (B, T, H)
        last = last_token_index(attention_mask)  # (B,) the rightmost real token: the EOS
        features = hidden[torch.arange(len(last), device=hidden.device), last]  # (B, H)
        if self.reference is not None:
            if stats is None:
                stats = sequence_logprob_stats(self.reference, input_ids, attention_mask)
            features = torch.cat([features, stats.to(features.dtype)], dim=-1)  # (B, H + 3)
        return self.head(features).squeeze(-1).float()  # (B,)

    @torch.no_grad()
    def score_sequences(self, sequences: Sequence[Sequence[int]], batch_size: int = 256) -> torch.Tensor:
        """Raw rewards of already tokenised sequences, (n,) float32 on the CPU, in eval mode.

        Sequences run in groups of similar length (`rlhf_base.lm.length_groups`), so a batch pads
        little, and come back in input order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        lengths = np.array([len(s) for s in sequences])
        overhead = call_overhead_tokens(self.device, calls=1 if self.reference is None else 2)
        rewards = torch.zeros(len(sequences))
        with self._evaluating():
            for group in length_groups(lengths, overhead_tokens=overhead):
                for start in range(0, len(group), batch_size):
                    rows = group[start : start + batch_size].tolist()
                    rewards[rows] = self(*self.collate([sequences[i] for i in rows])).cpu()
        return rewards

    def reads_logprobs_of(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> bool:
        """Whether the frozen LM is `model` (the same weights) under the same vocabulary and EOS.

        Then a caller that runs `model` over the sequences anyway (the env's reference forward, for the KL)
        can hand its token log-probs to `score_tokens`, and one forward serves both.
        """
        if self.reference is None or self.kind != "causal-lm-body":
            return False
        if (
            tokenizer.eos_token_id != self.tokenizer.eos_token_id
            or tokenizer.get_vocab() != self.tokenizer.get_vocab()
        ):
            return False
        mine, theirs = self.reference.state_dict(), model.state_dict()
        return mine.keys() == theirs.keys() and all(
            mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k].to(mine[k].device))
            for k in mine
        )

    @torch.no_grad()
    def score_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_logprobs: torch.Tensor
    ) -> torch.Tensor:
        """Normalised rewards, (B,), of sequences tokenised as `encode` does, with the frozen LM's log-probs.

        Args:
            input_ids: (B, T) prompt + response + EOS, padded on either side (the env's layout works).
            attention_mask: (B, T) 1 on real tokens.
            token_logprobs: (B, T-1) the frozen LM's `rlhf_base.lm.token_logprobs` of these sequences,
                from a forward the caller ran anyway (`reads_logprobs_of` says when that is this model's).
        """
        if self.reference is None:
            raise ValueError("score_tokens needs log-prob features; this reward model has none: use score()")
        longest = int(attention_mask.sum(-1).max())
        if longest > self.max_length:
            raise ValueError(
                f"a sequence of {longest} tokens is longer than the reward model's max_length "
                f"{self.max_length}: score it as text with score(), which keeps the last {self.max_length}"
            )
        with self._evaluating():
            raw = self(input_ids, attention_mask, logprob_stats(token_logprobs, attention_mask))
        return (raw - self.shift) / self.scale

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Eval mode for the block, then the mode it had; nothing to do when it is in eval mode already (a
        mode switch walks every submodule, ~0.3 ms each way, and the env scores a batch in several groups)."""
        was_training = self.training
        if was_training:
            self.eval()
        try:
            yield
        finally:
            if was_training:
                self.train()

    def raw_score(
        self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 256
    ) -> torch.Tensor:
        """Unnormalised scores, (B,) float32 on the CPU; no gradients."""
        return self.score_sequences(self.encode(prompts, responses), batch_size)

    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised rewards `(raw - shift) / scale`, (B,) float32 on the CPU; no gradients.

        This is the method the env calls with each batch of finished (prompt, response) pairs.
        """
        return (self.raw_score(prompts, responses, batch_size) - self.shift) / self.scale

    def normalise(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 256) -> dict:
        """Set `(shift, scale)` so that scores on this sample (pi_ref's responses) have mean 0 and std 1.

        Returns:
            `{"shift": ..., "scale": ...}`, the raw mean and (population) std of the sample.
        """
        raw = self.raw_score(prompts, responses, batch_size).double()
        if len(raw) < 2:
            raise ValueError(f"normalisation needs at least 2 responses, got {len(raw)}")
        std = float(raw.std(unbiased=False))
        if not math.isfinite(std) or std <= 1e-8:
            raise ValueError(
                f"cannot normalise: raw scores on the {len(raw)} responses have std {std:.3g} (the reward model "
                "gives them all the same score)"
            )
        self.shift, self.scale = float(raw.mean()), std
        return {"shift": self.shift, "scale": self.scale}

    # ----------------------------------------------------------------------------------------------------
    # Saving and loading
    # ----------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as a directory, atomically (a crash leaves any previous version intact).

        Contents: `model.safetensors`, `config.json` (the backbone's), the tokenizer's files, and
        `reward_model.json` (kind, normalisation, max length, format version, log-prob features). With
        log-prob features the frozen reference LM's weights are in `model.safetensors` too (`reference.*`).
        """
        path = Path(path)
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "logprob_features": self.logprob_features,
            "shift": self.shift,
            "scale": self.scale,
            "max_length": self.max_length,
        }
        with atomic_dir(path) as tmp:
            if self.kind == "sequence-classifier":
                self.body.save_pretrained(tmp, safe_serialization=True)  # a plain HF model directory too
            else:
                self.body.config.save_pretrained(tmp)
                if self.reference is not None:  # the frozen LM may be another model than the body's
                    self.reference.config.save_pretrained(tmp / "logprob_model")
                save_tensors(self.state_dict(), tmp / "model.safetensors", metadata={"kind": self.kind})
            self.tokenizer.save_pretrained(tmp)
            atomic_write(tmp / "reward_model.json", json.dumps(meta, indent=2) + "\n")
        return path
