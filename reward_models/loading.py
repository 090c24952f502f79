"""Loading a saved reward model, and building a fresh one to train: the two ways a `RewardModel` starts.

`load_reward_model(path)` reads what `RewardModel.save` wrote (safetensors, never a pickle), or any Hugging
Face sequence classifier directory; `build_reward_model(backbone)` makes an untrained one for
`train_reward_model`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from reward_models.model import FORMAT_VERSION, RewardModel
from rlhf_base.io import load_tensors
from rlhf_base.models import builtin_models, resolve_device

__all__ = ["build_reward_model", "load_reward_model"]


def load_reward_model(path: str | os.PathLike, device: str | torch.device | None = "cpu") -> Any:
    """Load a reward model saved by `RewardModel.save`; never unpickles.

    A directory holding a Hugging Face sequence-classification model but no `reward_model.json` (a reward
    model trained elsewhere) is loaded through `HFSequenceClassifierRewardModel` instead, so the env's
    `reward_model="path"` takes either.

    Raises:
        FileNotFoundError: `path` is not a directory with `reward_model.json` or `config.json`.
        ValueError: `reward_model.json` is malformed or of an unknown kind or format version.
    """
    path = Path(path)
    device = resolve_device(device)
    meta_file = path / "reward_model.json"
    if not meta_file.is_file():
        if (path / "config.json").is_file():
            from reward_models.adapters import HFSequenceClassifierRewardModel

            return HFSequenceClassifierRewardModel(path, device=device)
        raise FileNotFoundError(
            f"no reward model at {path}: expected a directory with reward_model.json (written by "
            "RewardModel.save) or a Hugging Face sequence-classification model (config.json)"
        )
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        kind, version = meta["kind"], meta["format_version"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(
            f"{meta_file} is malformed ({e}); expected kind, format_version, shift, scale"
        ) from e
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{meta_file}: format_version {version} is not supported (this code reads {FORMAT_VERSION})"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    options = {
        "kind": kind,
        "max_length": meta.get("max_length"),
        "shift": meta["shift"],
        "scale": meta["scale"],
    }
    if kind == "sequence-classifier":
        body = AutoModelForSequenceClassification.from_pretrained(str(path), use_safetensors=True)
        model = RewardModel(body, tokenizer, **options)
    elif kind == "causal-lm-body":
        config = AutoConfig.from_pretrained(str(path))
        body = AutoModel.from_config(config)
        reference = None
        if meta.get("logprob_features"):  # older saves have no logprob_model/: the body's architecture
            own = path / "logprob_model"
            reference_config = AutoConfig.from_pretrained(str(own)) if own.is_dir() else config
            reference = AutoModelForCausalLM.from_config(reference_config)
        model = RewardModel(body, tokenizer, reference=reference, **options)
        model.load_state_dict(load_tensors(path / "model.safetensors"), strict=True)
    else:
        raise ValueError(
            f"{meta_file}: unknown kind {kind!r}; valid: 'causal-lm-body', 'sequence-classifier'"
        )
    return model.to(device).eval()


def build_reward_model(
    backbone: str | os.PathLike | None = None,
    *,
    logprob_features: bool | None = None,
    logprob_model: str | os.PathLike | None = None,
    device: str | torch.device | None = "cpu",
) -> RewardModel:
    """A fresh reward model to train (`logprob_model`: see `RewardModel.from_causal_lm_body`).

    Args:
        backbone: None/"tiny-reviews" is the default task's GPT-2 body with a scalar head; anything else is
            an HF model dir/id.
        logprob_features: None: on for the built-in model, and an HF backbone is loaded with
            `AutoModelForSequenceClassification` (num_labels=1, its own head). True: the body of a causal
            LM (built-in or any HF causal LM) with the head reading the frozen LM's log-prob statistics
            too. False: the body with the plain last-token head for the built-in model, the sequence
            classifier for an HF backbone.
    """
    builtin = backbone is None or str(backbone) in builtin_models()
    if logprob_features or (builtin and logprob_features is None):
        return RewardModel.from_causal_lm_body(
            backbone, logprob_features=True, logprob_model=logprob_model, device=device
        )
    if builtin:
        return RewardModel.from_causal_lm_body(backbone, device=device)
    return RewardModel.from_pretrained_classifier(backbone, device=device)
