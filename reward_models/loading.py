"""Loading a saved reward model, and building a fresh one to train: the two ways a `RewardModel` starts.

`load_reward_model(path)` reads what `RewardModel.save` or `RewardEnsemble.save` wrote (safetensors, never a
pickle), or any Hugging Face sequence classifier directory; `build_reward_model(backbone, body=...)` makes
an untrained one for `train_reward_model`.

The body's size is a knob of its own (`body`): the backbone's pretrained body by default, or a freshly
initialised GPT-2 body of a named size (`BODY_SIZES`) or of any `LAYERSxWIDTH[xHEADS]`, in the backbone's
vocabulary, so a reward model's capacity can vary while the frozen LM whose log-probs its head reads stays
pi_ref (Gao et al. 2022 vary the proxy's size the same way, there with pretrained models of each size).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2Model,
)

from reward_models.ensemble import ENSEMBLE_FILE, ENSEMBLE_FORMAT_VERSION, RewardEnsemble
from reward_models.model import FORMAT_VERSION, RewardModel, _prepare_tokenizer
from rlhf_base.io import check_weights_folder, load_tensors
from rlhf_base.lm import context_length
from rlhf_base.models import builtin_models, check_vocabulary, load_causal_lm, resolve_device

__all__ = ["BODY_SIZES", "PRETRAINED_BODY", "body_shape", "build_reward_model", "load_reward_model"]

PRETRAINED_BODY = "pretrained"
"""`body` value (and what None means): the backbone's own body with its pretrained weights."""

BODY_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 64, 2),  # (n_layer, n_embd, n_head): ~0.1M parameters in the blocks
    "small": (4, 128, 4),  # the built-in tiny-reviews model's shape, ~0.8M
    "base": (8, 256, 8),  # ~6.3M: each size has ~8x the block parameters of the one before
}
"""Named sizes of a freshly initialised GPT-2 body (`body="small"`); any other is `body="LAYERSxWIDTH"`."""

_SHAPE = re.compile(r"(\d+)x(\d+)(?:x(\d+))?")


def body_shape(body: str | None) -> tuple[int, int, int] | None:
    """`(n_layer, n_embd, n_head)` of a fresh body, or None for the backbone's pretrained one.

    Args:
        body: None or "pretrained"; a name in `BODY_SIZES`; or "LxE" / "LxExH" (layers x width x heads;
            heads default to one per 32 dimensions, as in the built-in model), e.g. "6x192".

    Raises:
        ValueError: another string, a zero, or a width the heads do not divide.
    """
    if body is None or body == PRETRAINED_BODY:
        return None
    if body in BODY_SIZES:
        return BODY_SIZES[body]
    match = _SHAPE.fullmatch(str(body))
    if match is None:
        raise ValueError(
            f"body {body!r} is not a body size; valid: {PRETRAINED_BODY!r} (the backbone's own), "
            f"{', '.join(map(repr, BODY_SIZES))}, or 'LAYERSxWIDTH[xHEADS]' such as '6x192'"
        )
    n_layer, n_embd = int(match[1]), int(match[2])
    n_head = int(match[3]) if match[3] else max(1, n_embd // 32)
    if min(n_layer, n_embd, n_head) < 1 or n_embd % n_head:
        raise ValueError(
            f"body {body!r}: layers, width and heads must be >= 1 and the width a multiple of the heads "
            f"({n_embd} over {n_head} heads)"
        )
    return n_layer, n_embd, n_head


def _fresh_body(shape: tuple[int, int, int], tokenizer: Any, n_positions: int) -> GPT2Model:
    """A randomly initialised GPT-2 body of `shape` in `tokenizer`'s vocabulary (no dropout, as the
    built-in model: the scored and the trained function are one)."""
    n_layer, n_embd, n_head = shape
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2Model(config)


def load_reward_model(path: str | os.PathLike, device: str | torch.device | None = "cpu") -> Any:
    """Load a reward model saved by `RewardModel.save` or an ensemble saved by `RewardEnsemble.save`
    (a folder with `ensemble.json`, see `reward_models.ensemble`); never unpickles.

    A directory holding a Hugging Face sequence-classification model but no `reward_model.json` (a reward
    model trained elsewhere) is loaded through `HFSequenceClassifierRewardModel` instead, so the env's
    `reward_model="path"` takes either.

    Raises:
        FileNotFoundError: `path` is not a directory with `ensemble.json`, `reward_model.json` or
            `config.json`, or an ensemble's member folder is missing.
        ValueError: `reward_model.json` or `ensemble.json` is malformed or of an unknown kind or format
            version, or holds a `shift` or `scale` that would make scores NaN or infinite (not a finite
            number, or a scale <= 0), or the tokenizer has more tokens than the model's embedding rows (the
            message names the file and the key, or the folder and both sizes).
        DataError: a weights file is truncated or corrupt, or a pickle (refused, never unpickled); named.
    """
    path = Path(path)
    device = resolve_device(device)
    if (path / ENSEMBLE_FILE).is_file():
        return _load_ensemble(path, device)
    meta_file = path / "reward_model.json"
    if not meta_file.is_file():
        if (path / "config.json").is_file():
            from reward_models.adapters import HFSequenceClassifierRewardModel

            return HFSequenceClassifierRewardModel(path, device=device)
        raise FileNotFoundError(
            f"no reward model at {path}: expected a directory with reward_model.json (written by "
            f"RewardModel.save), {ENSEMBLE_FILE} (RewardEnsemble.save) or a Hugging Face sequence-classification model (config.json)"
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
    _check_normalisation(meta, meta_file)
    check_weights_folder(path)  # every safetensors file complete, no pickles: named before any loader reads
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
    check_vocabulary(model.body, model.tokenizer, f"reward model {str(path)!r}")
    return model.to(device).eval()


def _check_normalisation(meta: dict[str, Any], meta_file: Path) -> None:
    """`shift` and `scale` of `reward_model.json` must keep every score `(raw - shift) / scale` finite.

    A scale of 0 (hand-edited, or written by other code) would score every response inf or NaN, which the
    env then refuses only at the first rollout, after the models have loaded; a negative scale would turn
    the reward upside down. Both are refused here, naming the file and the key.
    """
    for key in ("shift", "scale"):
        if key not in meta:
            raise ValueError(
                f"{meta_file}: missing key {key!r} (the normalisation: score = (raw - shift) / scale)"
            )
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{meta_file}: key {key!r} must be a finite number, got {value!r}")
    if meta["scale"] <= 0:
        raise ValueError(
            f"{meta_file}: key 'scale' must be > 0, got {meta['scale']!r}: scores are (raw - shift) / scale, so "
            "a scale of 0 makes every score infinite or NaN and a negative one turns the reward upside down"
        )


def _load_ensemble(path: Path, device: torch.device) -> RewardEnsemble:
    """The ensemble `path/ensemble.json` describes; every error names that file and the key at fault."""
    meta_file = path / ENSEMBLE_FILE
    expected = 'expected {"members": [folder, ...], "combine": "mean" | "worst" | "uwo", "uwo_lambda": x}'
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_file} is not valid JSON ({e}); {expected}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_file} holds a {type(meta).__name__}, not an object; {expected}")
    version = meta.get("format_version", ENSEMBLE_FORMAT_VERSION)
    if version != ENSEMBLE_FORMAT_VERSION:
        raise ValueError(
            f"{meta_file}: key 'format_version' is {version!r}; this code reads {ENSEMBLE_FORMAT_VERSION}"
        )
    if meta.get("kind", "ensemble") != "ensemble":
        raise ValueError(f"{meta_file}: key 'kind' is {meta['kind']!r}; an ensemble's is 'ensemble'")
    for key in ("members", "combine"):
        if key not in meta:
            raise ValueError(f"{meta_file}: missing key {key!r}; {expected}")
    combine, members = meta["combine"], meta["members"]
    if combine not in ("mean", "worst", "uwo"):
        raise ValueError(f"{meta_file}: key 'combine' is {combine!r}; valid: 'mean', 'worst', 'uwo'")
    if combine == "uwo" and "uwo_lambda" not in meta:
        raise ValueError(f"{meta_file}: missing key 'uwo_lambda' (combine 'uwo' weighs the variance by it)")
    uwo_lambda = meta.get("uwo_lambda", 0.0)
    if (
        isinstance(uwo_lambda, bool)
        or not isinstance(uwo_lambda, (int, float))
        or not (math.isfinite(uwo_lambda) and uwo_lambda >= 0)
    ):
        raise ValueError(f"{meta_file}: key 'uwo_lambda' must be a finite number >= 0, got {uwo_lambda!r}")
    if not (isinstance(members, list) and members and all(isinstance(m, str) and m for m in members)):
        raise ValueError(
            f"{meta_file}: key 'members' must be a non-empty list of folder names, got {members!r}"
        )
    for i, name in enumerate(members):  # every folder checked before any model loads
        folder = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{meta_file}: members[{i}] {name!r} must be a folder inside {path}")
        if (folder / ENSEMBLE_FILE).is_file():
            raise ValueError(
                f"{meta_file}: members[{i}] {name!r} is an ensemble itself; members are single models"
            )
        if not folder.is_dir():
            raise FileNotFoundError(f"{meta_file}: members[{i}] names {folder}, which does not exist")
    loaded = []
    for i, name in enumerate(members):
        try:
            loaded.append(load_reward_model(path / name, device))
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{meta_file}: members[{i}] {name!r}: {e}") from e
    return RewardEnsemble(loaded, combine=combine, uwo_lambda=float(uwo_lambda)).eval()


def build_reward_model(
    backbone: str | os.PathLike | None = None,
    *,
    body: str | None = None,
    logprob_features: bool | None = None,
    logprob_model: str | os.PathLike | None = None,
    device: str | torch.device | None = "cpu",
) -> RewardModel:
    """A fresh reward model to train (`logprob_model`: see `RewardModel.from_causal_lm_body`).

    Args:
        backbone: None/"tiny-reviews" is the default task's GPT-2 body with a scalar head; anything else is
            an HF model dir/id.
        body: None/"pretrained": the backbone's own body and weights. A size (`body_shape`: "tiny",
            "small", "base", "LxE[xH]"): a freshly initialised GPT-2 body of that shape in the backbone's
            vocabulary and context length, with the last-token head; the backbone then supplies only the
            tokenizer and (with log-prob features) the frozen LM.
        logprob_features: None: on for the built-in model, and an HF backbone is loaded with
            `AutoModelForSequenceClassification` (num_labels=1, its own head). True: the body of a causal
            LM (built-in or any HF causal LM) with the head reading the frozen LM's log-prob statistics
            too. False: the body with the plain last-token head for the built-in model, the sequence
            classifier for an HF backbone.
    """
    builtin = backbone is None or str(backbone) in builtin_models()
    shape = body_shape(body)
    if shape is not None:
        return _sized_reward_model(shape, backbone, builtin, logprob_features, logprob_model, device)
    if logprob_features or (builtin and logprob_features is None):
        return RewardModel.from_causal_lm_body(
            backbone, logprob_features=True, logprob_model=logprob_model, device=device
        )
    if builtin:
        return RewardModel.from_causal_lm_body(backbone, device=device)
    return RewardModel.from_pretrained_classifier(backbone, device=device)


def _sized_reward_model(
    shape: tuple[int, int, int],
    backbone: str | os.PathLike | None,
    builtin: bool,
    logprob_features: bool | None,
    logprob_model: str | os.PathLike | None,
    device: str | torch.device | None,
) -> RewardModel:
    """A fresh GPT-2 body of `shape` plus the head; the frozen LM as `build_reward_model` would have it."""
    features = logprob_features if logprob_features is not None else builtin
    if features or builtin:  # a causal LM: its tokenizer, and the frozen LM (a copy of it, or logprob_model)
        lm, tokenizer = load_causal_lm(backbone, device=device)
        context = context_length(lm)
    else:  # an HF classifier's vocabulary is all a fresh body needs
        tokenizer = AutoTokenizer.from_pretrained(str(backbone))
        lm, context = (
            None,
            getattr(AutoConfig.from_pretrained(str(backbone)), "max_position_embeddings", None),
        )
    reference = None
    if features:
        reference = lm if logprob_model is None else load_causal_lm(logprob_model, device=device)[0]
        context = context_length(reference) or context
    tokenizer = _prepare_tokenizer(tokenizer)
    limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None
    body = _fresh_body(shape, tokenizer, int(context or limit or 1024))
    model = RewardModel(body, tokenizer, kind="causal-lm-body", reference=reference)
    return model.to(resolve_device(device))
