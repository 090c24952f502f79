"""Bradley-Terry training of a reward model on preference pairs, with a held-out accuracy.

Under the Bradley-Terry model a labeller prefers `y_w` over `y_l` with probability
`sigmoid(r(x, y_w) - r(x, y_l))`, so the reward model maximises the log-likelihood of the observed labels
(Stiennon et al. 2020, eq. 1; Ouyang et al. 2022, eq. 1). An optional per-pair margin `m` asks for
`r_w - r_l > m` (Llama 2, Touvron et al. 2023, eq. 2). Each step scores the chosen and the rejected responses
of a batch in one forward pass, as TRL's `RewardTrainer` does.

`ensemble_size: k` trains k such models that differ in their seed (and, with `ensemble_bootstrap`, in a
bootstrap resample of the training pairs) on one held-out split and one normalisation sample, and returns
them as a `RewardEnsemble` (Coste et al. 2024; see `reward_models.ensemble`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from reward_models.data import load_pairs
from reward_models.ensemble import RewardEnsemble
from reward_models.loading import body_shape, build_reward_model
from reward_models.model import RewardModel
from rlhf_base.io import atomic_write
from rlhf_base.optim import adam
from rlhf_base.ranges import SEED, Range, check_ranges
from rlhf_base.runlog import RunLog

__all__ = ["RewardTrainConfig", "bradley_terry_loss", "evaluate_reward_model", "train_reward_model"]


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean negative log-likelihood of the preferences: `mean(-log sigmoid(r_w - r_l - margin))`.

    Args:
        chosen_rewards: (B,) rewards of the preferred responses, r_w.
        rejected_rewards: (B,) rewards of the other responses, r_l.
        margin: (B,) or scalar, optional: how far r_w should exceed r_l (Llama 2's margin loss).
    """
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference).mean()


@dataclass
class RewardTrainConfig:
    """How a reward model is trained; the defaults suit the default task.

    Knobs several configs share have one name in all of them (`learning_rate`); `lr` in a YAML file or an
    override fails naming it (`RENAMED`).
    """

    RENAMED: ClassVar[dict[str, str]] = {"lr": "learning_rate"}
    RANGES: ClassVar[dict[str, Range]] = {
        "num_pairs": Range(ge=2),
        "learning_rate": Range(gt=0),
        "weight_decay": Range(ge=0),
        "warmup_fraction": Range(ge=0, lt=1),
        "epochs": Range(ge=1),
        "batch_size": Range(ge=1),
        "max_grad_norm": Range(ge=0),  # 0: no clipping
        "eval_fraction": Range(ge=0, lt=1),
        "eval_batch_size": Range(ge=1),
        "normalise_samples": Range(ge=2),  # a standard deviation needs two
        "seed": SEED,
        "ensemble_size": Range(ge=1),
        "uwo_lambda": Range(ge=0),
    }

    pairs: str = (
        "runs/label/pairs.jsonl"  # preference pairs read by `rlhf-gym train-rm` (.jsonl/.json/.csv/.parquet)
    )
    backbone: str | None = (
        None  # None: tiny-reviews GPT-2 body + scalar head; else an HF dir/id (sequence classifier)
    )
    # The body's size: None/"pretrained" = the backbone's own pretrained body; "tiny" | "small" | "base" or
    # "LAYERSxWIDTH[xHEADS]" (e.g. "6x192") = a freshly initialised GPT-2 body of that size in the backbone's
    # vocabulary (reward_models.loading.BODY_SIZES), the head still reading the frozen LM's log-probs
    body: str | None = None
    num_pairs: int | None = None  # use the first N pairs of the file (held-out ones included); None: all
    logprob_features: bool | None = (
        None  # head also reads the frozen LM's log-prob stats; None: on for tiny-reviews, off for HF ids
    )
    logprob_model: str | None = (
        None  # the frozen LM whose log-probs the head reads; None: the backbone's own; the pipeline: pi_ref
    )
    learning_rate: float = 1e-3  # peak AdamW learning rate: linear warm-up, then linear decay to 0
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_fraction: float = 0.05  # share of all optimiser steps spent warming the learning rate up from 0
    epochs: int = 4  # passes over the training pairs
    batch_size: int = 32  # pairs per optimiser step (one forward over their 2 x batch_size sequences)
    max_grad_norm: float = 1.0  # gradient-norm clip; 0 turns clipping off (a negative value is refused)
    eval_fraction: float = 0.1  # share of pairs held out (seeded shuffle) for accuracy and margin; 0: none
    eval_batch_size: int = 256  # sequences per forward when evaluating and normalising
    margin_field: str | None = (
        None  # numeric pair field subtracted as a margin, r_w - r_l - m (Llama 2); None: no margin
    )
    normalise_samples: int = (
        1024  # responses (both sides of the pairs: pi_ref's samples) that set score mean 0, std 1
    )
    seed: int = 0  # seeds the split, the batch order and the head's initialisation
    ensemble_size: int = 1  # k > 1: train k members (seeds seed, seed+1, ...) saved as one RewardEnsemble
    # how the members' scores combine: mean | worst (min, WCO) | uwo (mean - uwo_lambda * variance, UWO)
    ensemble_combine: Literal["mean", "worst", "uwo"] = "mean"
    uwo_lambda: float = 1.0  # UWO's weight on the members' (population) variance, in normalised units
    ensemble_bootstrap: bool = False  # each member also trains on its own bootstrap resample of the pairs

    def __post_init__(self) -> None:
        check_ranges(self)
        body_shape(self.body)  # an unknown size fails here, naming the valid ones


# --------------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------------
def _margins(pairs: Sequence[dict[str, Any]], field: str | None) -> np.ndarray | None:
    if field is None:
        return None
    values = []
    for i, pair in enumerate(pairs):
        value = pair.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(
                f"preference pair {i}: margin_field {field!r} must hold a finite number, got {value!r}"
            )
        values.append(float(value))
    return np.asarray(values, dtype=np.float32)


def _length_bucketed_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, pool: int = 32
) -> list[np.ndarray]:
    """One epoch of minibatch indices: shuffled, then sorted by length within pools of `pool` batches, so a
    batch holds pairs of similar length and pads less (about half the tokens here); batch order is shuffled."""
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size * pool):
        block = order[start : start + batch_size * pool]
        block = block[np.argsort(lengths[block], kind="stable")]
        batches += [block[i : i + batch_size] for i in range(0, len(block), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _pair_metrics(
    r_w: torch.Tensor, r_l: torch.Tensor, margin: torch.Tensor | None = None
) -> dict[str, float]:
    return {
        "loss": float(bradley_terry_loss(r_w, r_l, margin)),
        "accuracy": float((r_w > r_l).float().mean()),  # share of pairs the model ranks as the labeller did
        "margin": float((r_w - r_l).mean()),  # mean r_w - r_l, in raw reward units
    }


def evaluate_reward_model(
    model: Any, pairs: Any, *, batch_size: int = 256, margin_field: str | None = None
) -> dict[str, float]:
    """Held-out metrics of `model` on `pairs`: BT `loss`, `accuracy` (share with r_w > r_l), mean raw `margin`.

    `model` is a `RewardModel` (scored raw, before normalisation) or any reward with `.score(prompts,
    responses)`: a `RewardEnsemble` (its combined, member-normalised scores), an adapter, a function's.

    When the pairs carry `gold_chosen`/`gold_rejected` (written by the labeller, for evaluation only), also
    `gold_agreement`: the share of pairs, gold ties excluded, that the model orders as the gold reward does,
    and `label_ceiling`: the share whose label does, i.e. the best accuracy the noisy labels allow, and
    `accuracy_decided`: `accuracy` on those same pairs (gold ties, whose labels are coin flips, excluded),
    the number to hold against `label_ceiling`.
    """
    pairs = load_pairs(pairs)
    prompts = [p["prompt"] for p in pairs]
    raw_score = getattr(model, "raw_score", None)

    def scores(responses: list[str]) -> torch.Tensor:
        if callable(raw_score):
            return raw_score(prompts, responses, batch_size)
        return torch.as_tensor(model.score(prompts, responses), dtype=torch.float32).detach().cpu()

    r_w = scores([p["chosen"] for p in pairs])
    r_l = scores([p["rejected"] for p in pairs])
    margins = _margins(pairs, margin_field)
    metrics = _pair_metrics(r_w, r_l, None if margins is None else torch.as_tensor(margins))
    metrics["num_pairs"] = len(pairs)
    if all(
        isinstance(p.get("gold_chosen"), (int, float)) and isinstance(p.get("gold_rejected"), (int, float))
        for p in pairs
    ):
        gold = np.array([p["gold_chosen"] - p["gold_rejected"] for p in pairs], dtype=np.float64)
        decided = gold != 0
        if decided.any():
            model_sign = np.sign((r_w - r_l).numpy().astype(np.float64))
            metrics["gold_agreement"] = float((model_sign[decided] == np.sign(gold[decided])).mean())
            metrics["label_ceiling"] = float((gold[decided] > 0).mean())  # chosen is gold-better
            metrics["accuracy_decided"] = float((r_w > r_l).numpy()[decided].mean())
    return metrics


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------
def _first_pairs(pairs: list[dict[str, Any]], num_pairs: int | None) -> list[dict[str, Any]]:
    """The first `num_pairs` pairs (the labeller writes them in random order, so a prefix is a random
    subsample, and a larger one contains a smaller one)."""
    if num_pairs is None:
        return pairs
    if num_pairs > len(pairs):
        raise ValueError(f"num_pairs={num_pairs}, but the preference pairs hold only {len(pairs)}")
    return pairs[:num_pairs]


def _split(
    pairs: list[dict[str, Any]], eval_fraction: float, rng: np.random.Generator
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`(train, held_out)`: a seeded shuffle; at least one pair on each side when there are two or more."""
    order = rng.permutation(len(pairs))
    num_eval = 0 if eval_fraction == 0 else max(1, round(len(pairs) * eval_fraction))
    num_eval = min(num_eval, len(pairs) - 1)
    return [pairs[i] for i in order[num_eval:]], [pairs[i] for i in order[:num_eval]]


def _normalisation_sample(
    train_pairs: list[dict[str, Any]], size: int, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """`size` (prompt, response)s drawn from both sides of the pairs: pi_ref's samples when the labeller
    drew them."""
    responses = [(p["prompt"], p[side]) for p in train_pairs for side in ("chosen", "rejected")]
    picked = rng.choice(len(responses), size=min(size, len(responses)), replace=False)
    return [responses[i][0] for i in picked], [responses[i][1] for i in picked]


def train_reward_model(
    pairs: Any,
    config: RewardTrainConfig | None = None,
    *,
    model: RewardModel | None = None,
    run_dir: str | Path | None = None,
    normalise_on: tuple[Sequence[str], Sequence[str]] | None = None,
    eval_pairs: Any = None,
    device: str | torch.device | None = "cpu",
    progress: bool = True,
) -> tuple[RewardModel | RewardEnsemble, dict[str, Any]]:
    """Train a reward model with the Bradley-Terry loss, evaluate it on held-out pairs, normalise it.

    Args:
        pairs: preference pairs: a path, a `datasets.Dataset` or a list of `{prompt, chosen, rejected}`;
            `config.num_pairs` keeps the first N.
        config: the recipe; default `RewardTrainConfig()`. `ensemble_size > 1` trains an ensemble.
        model: a reward model to train further; default a fresh `build_reward_model(config.backbone,
            body=config.body)`.
        run_dir: if given, receives `metrics.csv` (one row per epoch), `metrics.json` and TensorBoard
            scalars (`tensorboard/`); an ensemble's members log into `member_0/`, `member_1/`, ...
        normalise_on: `(prompts, responses)` from pi_ref that set the score normalisation; default
            `config.normalise_samples` responses drawn (seeded) from both sides of the pairs, which are
            pi_ref's samples when the labeller drew them.
        eval_pairs: the held-out pairs (e.g. one set shared by many runs, as `rm-scaling` does); then all
            of `pairs` train and `config.eval_fraction` is not used. Default: split off `eval_fraction`.
        device: where a fresh model is built (a given model stays where it is).
        progress: show a tqdm bar.

    Returns:
        `(model, metrics)`: the trained, normalised model in eval mode (a `RewardEnsemble` when
        `ensemble_size > 1`), and final metrics: `train_loss`, `train_accuracy` (last epoch, running),
        `eval_loss`, `eval_accuracy`, `eval_margin` (when pairs are held out), `gold_agreement`,
        `label_ceiling` and `accuracy_decided` on the held-out pairs when they carry gold scores, `shift`,
        `scale`, sizes and `seconds` (an ensemble's: see `_train_ensemble`).

    Raises:
        FloatingPointError: the loss became NaN or infinite (the message says where and what to try).
        rlhf_base.io.DataError: the pairs are malformed (see `load_pairs`).
        ValueError: `num_pairs` is more than there are, or `model` is given with `ensemble_size > 1`.
    """
    config = config or RewardTrainConfig()
    pairs = _first_pairs(load_pairs(pairs), config.num_pairs)
    if eval_pairs is not None:
        eval_pairs = [] if isinstance(eval_pairs, list) and not eval_pairs else load_pairs(eval_pairs)
    if config.ensemble_size > 1:
        if model is not None:
            raise ValueError("model= trains one given model; with ensemble_size > 1 the members are built")
        return _train_ensemble(pairs, config, eval_pairs, run_dir, normalise_on, device, progress)
    start = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    if model is None:
        model = build_reward_model(
            config.backbone,
            body=config.body,
            logprob_features=config.logprob_features,
            logprob_model=config.logprob_model,
            device=device,
        )

    if eval_pairs is None:
        train_pairs, eval_pairs = _split(pairs, config.eval_fraction, rng)
    else:
        train_pairs = pairs

    prompts = [p["prompt"] for p in train_pairs]
    b_chosen = model.encode(prompts, [p["chosen"] for p in train_pairs])  # tokenised once, up front
    b_rejected = model.encode(prompts, [p["rejected"] for p in train_pairs])
    b_margins = _margins(train_pairs, config.margin_field)
    b_lengths = np.array([max(len(a), len(b)) for a, b in zip(b_chosen, b_rejected, strict=True)])

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_pairs) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = int(config.warmup_fraction * total_steps)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    log = RunLog(run_dir)  # metrics.csv (a row per epoch, flushed as it goes) and tensorboard/
    metrics: dict[str, Any] = {}
    step = 0
    model.train()
    bar = tqdm(total=total_steps, desc="train-rm", unit="step", disable=not progress, leave=False)
    for epoch in range(1, config.epochs + 1):
        sum_loss, sum_correct, seen = 0.0, 0, 0
        for mb in _length_bucketed_batches(b_lengths, config.batch_size, rng):
            input_ids, attention_mask = model.collate([b_chosen[i] for i in mb] + [b_rejected[i] for i in mb])
            rewards = model(input_ids, attention_mask)  # (2 * mb,) chosen first, then rejected
            r_w, r_l = rewards[: len(mb)], rewards[len(mb) :]
            margin = None if b_margins is None else torch.as_tensor(b_margins[mb], device=rewards.device)
            loss = bradley_terry_loss(r_w, r_l, margin)
            if not torch.isfinite(loss):
                bar.close()
                log.close()
                raise FloatingPointError(
                    f"reward model loss became {loss.item()} at epoch {epoch}, step {step + 1}: training "
                    f"diverged. Lower the learning rate (learning_rate={config.learning_rate:g}), keep gradient clipping on "
                    f"(max_grad_norm={config.max_grad_norm:g}), and check the pairs' margins"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            sum_loss += loss.item() * len(mb)
            sum_correct += int((r_w > r_l).sum())
            seen += len(mb)
            log.scalars({"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0]}, step)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{sum_loss / seen:.3f}")
        row = {
            "epoch": epoch,
            "step": step,
            "train_loss": sum_loss / seen,
            "train_accuracy": sum_correct / seen,
        }
        if eval_pairs:
            held_out = evaluate_reward_model(
                model, eval_pairs, batch_size=config.eval_batch_size, margin_field=config.margin_field
            )
            row.update({f"eval_{k}": v for k, v in held_out.items() if k != "num_pairs"})
        log.log(row, step, scalars=[k for k in row if k not in ("epoch", "step")])
        metrics.update(row)
    bar.close()
    log.close()

    if normalise_on is None:
        normalise_on = _normalisation_sample(train_pairs, config.normalise_samples, rng)
    metrics.update(model.normalise(*normalise_on, batch_size=config.eval_batch_size))
    metrics.update(
        num_train=len(train_pairs),
        num_eval=len(eval_pairs),
        steps=step,
        seconds=time.perf_counter() - start,
    )
    if run_dir is not None:
        atomic_write(Path(run_dir) / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return model.eval(), metrics


def _train_ensemble(
    pairs: list[dict[str, Any]],
    config: RewardTrainConfig,
    eval_pairs: list[dict[str, Any]] | None,
    run_dir: str | Path | None,
    normalise_on: tuple[Sequence[str], Sequence[str]] | None,
    device: str | torch.device | None,
    progress: bool,
) -> tuple[RewardEnsemble, dict[str, Any]]:
    """`config.ensemble_size` members on one split and one normalisation sample, member i seeded
    `config.seed + i` (its head's initialisation and batch order; with `ensemble_bootstrap`, its own
    resample of the training pairs too).

    Metrics: the ensemble's `eval_*` (its combined scores on the held-out pairs) and `eval_member_std` (the
    members' mean population std over the held-out responses: their disagreement), the members' mean
    `train_loss`/`train_accuracy`, and per member `members` (each one's own metrics).
    """
    start = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    if eval_pairs is None:
        train_pairs, eval_pairs = _split(pairs, config.eval_fraction, rng)
    else:
        train_pairs = pairs
    if normalise_on is None:  # one sample for all: the members' scores then share one scale
        normalise_on = _normalisation_sample(train_pairs, config.normalise_samples, rng)
    members, member_metrics = [], []
    for i in range(config.ensemble_size):
        member_config = dataclasses.replace(config, seed=config.seed + i, ensemble_size=1, num_pairs=None)
        member_pairs = train_pairs
        if config.ensemble_bootstrap:
            picks = np.random.default_rng([config.seed, i]).integers(len(train_pairs), size=len(train_pairs))
            member_pairs = [train_pairs[j] for j in picks]
        member, metrics = train_reward_model(
            member_pairs,
            member_config,
            eval_pairs=eval_pairs,
            run_dir=None if run_dir is None else Path(run_dir) / f"member_{i}",
            normalise_on=normalise_on,
            device=device,
            progress=progress,
        )
        members.append(member)
        member_metrics.append(metrics)
    ensemble = RewardEnsemble(members, config.ensemble_combine, config.uwo_lambda)
    metrics: dict[str, Any] = {
        "ensemble_size": config.ensemble_size,
        "ensemble_combine": config.ensemble_combine,
        "uwo_lambda": config.uwo_lambda,
        "train_loss": float(np.mean([m["train_loss"] for m in member_metrics])),
        "train_accuracy": float(np.mean([m["train_accuracy"] for m in member_metrics])),
    }
    if eval_pairs:
        held_out = evaluate_reward_model(
            ensemble, eval_pairs, batch_size=config.eval_batch_size, margin_field=config.margin_field
        )
        metrics.update({f"eval_{k}": v for k, v in held_out.items() if k != "num_pairs"})
        prompts = [p["prompt"] for p in eval_pairs] * 2
        responses = [p["chosen"] for p in eval_pairs] + [p["rejected"] for p in eval_pairs]
        spread = ensemble.member_scores(prompts, responses, config.eval_batch_size).std(0, unbiased=False)
        metrics["eval_member_std"] = float(spread.mean())
    metrics.update(
        num_train=len(train_pairs),
        num_eval=len(eval_pairs),
        steps=sum(m["steps"] for m in member_metrics),
        seconds=time.perf_counter() - start,
        members=member_metrics,
    )
    if run_dir is not None:
        atomic_write(Path(run_dir) / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return ensemble.eval(), metrics
