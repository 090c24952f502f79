"""Supervised fine-tuning (SFT): the step that turns a base LM into the reference policy pi_ref.

RLHF starts from a model fine-tuned on demonstrations (Ouyang et al. 2022, arXiv:2203.02155, step 1;
Stiennon et al. 2020, arXiv:2009.01325, section 3). The loss is next-token cross-entropy on the response
only: the prompt is context, not something the policy is asked to write, so its labels are -100.

    pairs = load_demonstrations("demos.jsonl")       # [(prompt, response), ...]
    model, tokenizer = text_env.load_causal_lm()
    metrics = train_sft(model, tokenizer, pairs, SFTConfig(epochs=1), run_dir="runs/a")
    # runs/a/sft/ is a Hugging Face directory: text_env.load_causal_lm("runs/a/sft") reads it back.

Batches are dicts of `input_ids`, `attention_mask` and `labels` (the Hugging Face convention: `labels[t]`
is the token at t, or -100; `sft_loss` shifts). Any padding layout works, because position ids are taken
from the mask: SFT pads on the right, RAFT (`agents/raft.py`) hands the env's left-padded rollouts in
as they are, and both go through the same `sft_loss` and `sft_step`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from agents.base import NonFiniteLossError
from rlhf_gym.io import DataError, atomic_dir, atomic_write, read_records
from rlhf_gym.optim import adam
from text_env.models import resolve_device
from text_env.scoring import position_ids_from_mask

__all__ = [
    "SFTConfig",
    "add_sft_command",
    "collate",
    "encode_demonstrations",
    "load_demonstrations",
    "response_nll",
    "sft_loss",
    "sft_step",
    "train_sft",
]

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding); PyTorch's cross-entropy default

#: One tokenised demonstration: (prompt ids, completion ids), the completion being the response plus EOS.
Example = tuple[list[int], list[int]]


@dataclass
class SFTConfig:
    """Supervised fine-tuning on (prompt, response) demonstrations; the defaults are tuned for the default task."""

    model: str | None = None  # base model: None = built-in tiny-reviews, or a saved HF dir / hub id
    demonstrations: str | None = None  # JSONL/JSON/CSV/Parquet of "prompt", "response"; None = generator
    num_demonstrations: int = 8192  # pairs drawn from the default task's generator (unused with a file)
    eval_demonstrations: str | None = None  # held-out file for the NLL report (None: default task only)
    num_eval_demonstrations: int = 1024  # held-out pairs drawn from the generator, with a seed of their own
    eval_episodes: int = 256  # default task: rollouts measuring the grammatical fraction (0: skip)
    epochs: int = 1  # passes over the demonstrations
    batch_size: int = 32  # demonstrations per optimiser step
    lr: float = 1e-3  # peak AdamW learning rate, cosine-decayed to 10% after warm-up
    warmup: int = 10  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping (global L2 norm)
    max_length: int | None = None  # prompt + response + EOS tokens; longer responses are cut; None = context
    seed: int = 0  # shuffling, initialisation noise, and the generator's demonstrations
    device: str = "cpu"  # "cpu", "cuda", "cuda:1" or "auto"
    save_every: int = 0  # optimiser steps between checkpoints of run_dir/sft (0: only the final model)

    def __post_init__(self) -> None:
        minimums = dict(
            num_demonstrations=1, num_eval_demonstrations=0, eval_episodes=0, epochs=1, batch_size=1
        )
        for name, least in minimums.items():
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.warmup < 0 or self.save_every < 0 or self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ValueError("warmup, save_every and weight_decay must be >= 0 and max_grad_norm > 0")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (a prompt token and EOS), got {self.max_length}")


# --------------------------------------------------------------------------------------------------------
# Data: demonstrations in, token ids out
# --------------------------------------------------------------------------------------------------------
def load_demonstrations(source: Any) -> list[tuple[str, str]]:
    """(prompt, response) pairs from a JSONL/JSON/CSV/Parquet file, a `datasets.Dataset`, dicts, or pairs.

    Files and datasets need string fields "prompt" and "response"; a malformed record is reported with
    the file and line (`rlhf_gym.io.read_records`). The training text is `prompt + " " + response`.
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


def _rows(
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
        examples = encode_demonstrations(tokenizer, demonstrations, _context_length(model))
    data, device = collate(examples, tokenizer.pad_token_id), next(model.parameters()).device
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    for start in range(0, len(examples), batch_size):
        nll, labelled = _token_nll(
            model, _rows(data, np.arange(start, min(start + batch_size, len(examples))), device)
        )
        total, count = total + nll.sum().item(), count + int(labelled.sum())
    model.train(was_training)
    return total / max(count, 1)


def _context_length(model: PreTrainedModel) -> int | None:
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# --------------------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------------------
class _Log:
    """The loss curve, a line per step: CSV (flushed as it goes) and TensorBoard under `run_dir`."""

    FIELDS = ("step", "epoch", "loss", "grad_norm", "lr", "tokens", "wall_time")

    def __init__(self, run_dir: Path | None) -> None:
        self.file = self.csv = self.tb = None
        if run_dir is None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = (run_dir / "sft_log.csv").open("w", newline="", encoding="utf-8")
        self.csv = csv.DictWriter(self.file, fieldnames=self.FIELDS)
        self.csv.writeheader()
        from torch.utils.tensorboard import SummaryWriter  # heavy import, paid only by runs that log

        self.tb = SummaryWriter(str(run_dir / "tensorboard" / "sft"))

    def write(self, row: dict[str, float]) -> None:
        if self.csv is not None:
            self.csv.writerow(row)
            self.file.flush()
            for key in ("loss", "grad_norm", "lr"):
                self.tb.add_scalar(f"sft/{key}", row[key], int(row["step"]))

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.tb.close()


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, run_dir: Path, state: dict) -> None:
    """`run_dir/sft` as a Hugging Face dir plus `sft_state.json`, replaced atomically (old one kept on a crash)."""
    with atomic_dir(run_dir / "sft") as tmp:
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        (tmp / "sft_state.json").write_text(json.dumps(state, indent=2))


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    demonstrations: Any,
    config: SFTConfig | None = None,
    run_dir: str | Path | None = None,
    progress: bool = True,
    eval_demonstrations: Any = None,
) -> dict[str, float]:
    """Fine-tune `model` in place on demonstrations with the response-only loss; return summary metrics.

    Args:
        model: any `transformers` causal LM with trainable parameters; left in eval mode on `config.device`.
        tokenizer: its tokenizer (an EOS token is required; pad may equal EOS).
        demonstrations: anything `load_demonstrations` reads (pairs, records, a file, a `datasets.Dataset`).
        config: the recipe (default: `SFTConfig()`).
        run_dir: where the loss curve (`sft_log.csv`, `tensorboard/sft/`) and the model (`sft/`, with a
            checkpoint every `config.save_every` steps) go; None writes nothing.
        progress: show a tqdm bar.
        eval_demonstrations: held-out pairs whose response NLL is measured before and after training.

    Returns:
        `steps`, `epochs`, `num_demonstrations`, `tokens` (labelled tokens trained on), `final_loss`
        (mean loss of the last epoch), `wall_time`, and `eval_nll_before`/`eval_nll_after` (NaN without
        held-out data), all floats.

    Raises:
        NonFiniteLossError: the loss became NaN/inf; the checkpoint written last (if any) is intact.
    """
    start = time.perf_counter()
    config = config if config is not None else SFTConfig()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    pairs = load_demonstrations(demonstrations)
    examples = encode_demonstrations(tokenizer, pairs, config.max_length or _context_length(model))
    data = collate(examples, tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (a frozen reference?); pass a trainable copy")
    model.to(device)
    held_out = load_demonstrations(eval_demonstrations) if eval_demonstrations is not None else None
    nll_before = response_nll(model, tokenizer, held_out) if held_out else math.nan

    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    optimizer = adam(params, lr=config.lr, weight_decay=config.weight_decay)

    def lr_factor(step: int) -> float:
        """Linear warm-up, then cosine decay to 10% of the peak (as tiny-reviews' pretraining)."""
        if step < config.warmup:
            return (step + 1) / config.warmup
        frac = (step - config.warmup) / max(1, total_steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    run_dir = Path(run_dir) if run_dir is not None else None
    log, rng = _Log(run_dir), np.random.default_rng(config.seed)
    if held_out:
        log.scalar("sft/eval_nll", nll_before, 0)
    bar = tqdm(total=total_steps, desc="sft", unit="step", disable=not progress, dynamic_ncols=True)
    step, tokens, epoch_losses = 0, 0, []
    model.train()
    try:
        for epoch in range(config.epochs):
            epoch_losses = []
            order = rng.permutation(len(examples))
            for i in range(steps_per_epoch):
                batch = _rows(data, order[i * config.batch_size : (i + 1) * config.batch_size], device)
                lr = scheduler.get_last_lr()[0]
                at = f" at step {step + 1} of {total_steps}"
                loss, grad_norm = sft_step(model, optimizer, batch, max_grad_norm=config.max_grad_norm, at=at)
                scheduler.step()
                step, tokens = step + 1, tokens + int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                epoch_losses.append(loss)
                wall_time = time.perf_counter() - start
                log.write(dict(step=step, epoch=epoch + 1, loss=loss, grad_norm=grad_norm, lr=lr, tokens=tokens,
                               wall_time=wall_time))  # fmt: skip
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", epoch=epoch + 1)
                checkpoint = run_dir is not None and config.save_every and step % config.save_every == 0
                if checkpoint and step < total_steps:  # the last step's save comes after the eval below
                    state = {"step": step, "total_steps": total_steps, "complete": False}
                    _save(model.eval(), tokenizer, run_dir, state)
                    model.train()
        model.eval()
        nll_after = response_nll(model, tokenizer, held_out) if held_out else math.nan
        if held_out:
            log.scalar("sft/eval_nll", nll_after, step)
    finally:
        bar.close()
        log.close()
        model.eval()
    metrics = {
        "steps": float(step),
        "epochs": float(config.epochs),
        "num_demonstrations": float(len(examples)),
        "tokens": float(tokens),
        "final_loss": float(np.mean(epoch_losses)),
        "eval_nll_before": nll_before,
        "eval_nll_after": nll_after,
        "wall_time": time.perf_counter() - start,
    }
    if run_dir is not None:
        _save(
            model, tokenizer, run_dir, {"step": step, "total_steps": total_steps, "complete": True, **metrics}
        )
    return metrics


# --------------------------------------------------------------------------------------------------------
# The `rlhf-gym sft` command
# --------------------------------------------------------------------------------------------------------
#: Offset between the seeds of the training and the held-out demonstrations drawn from the generator.
EVAL_SEED_OFFSET = 100_003


@torch.no_grad()
def grammatical_fraction(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, num_episodes: int = 256, seed: int = 0
) -> float:
    """Fraction of the model's responses to the default task's prompts that complete a grammatical review.

    Sampled through the KV-cached vector env at temperature 1, the way every agent samples pi_ref.
    """
    import text_env
    from text_env.models import frozen_copy
    from text_env.tasks.reviews import is_review

    reference = frozen_copy(model)
    envs = text_env.TextGenVectorEnv(
        num_envs=min(num_episodes, 128),
        reference=reference,
        policy=reference,
        tokenizer=tokenizer,
        device=str(next(model.parameters()).device),
    )
    generator = torch.Generator(device=envs.core.device).manual_seed(seed)
    hits, total = 0, 0
    for i in range(math.ceil(num_episodes / envs.num_envs)):
        batch = text_env.rollout(envs, seed=seed + i, generator=generator)
        hits += sum(is_review(f"{p} {r}") for p, r in zip(batch.prompts, batch.responses, strict=True))
        total += envs.num_envs
    return hits / total


def run_sft(config: SFTConfig, run_dir: str | Path, progress: bool = True) -> dict[str, float]:
    """The whole stage: load the base model and demonstrations, fine-tune, save `run_dir/sft/` (pi_ref).

    Writes `sft_config.yaml`, `sft_log.csv`, `tensorboard/sft/`, `sft/` and `sft_metrics.json` in `run_dir`.
    On the default task (no demonstrations file) it also reports the fraction of sampled responses that
    are grammatical reviews, before and after.
    """
    from rlhf_gym.config import save_config
    from text_env.models import load_causal_lm

    run_dir = Path(run_dir)
    save_config(config, run_dir / "sft_config.yaml")
    model, tokenizer = load_causal_lm(config.model, device=config.device)
    default_task = config.demonstrations is None
    if default_task:
        from text_env.tasks.reviews import sample_demonstrations

        demonstrations = sample_demonstrations(config.num_demonstrations, seed=config.seed)
        held_out = sample_demonstrations(config.num_eval_demonstrations, seed=config.seed + EVAL_SEED_OFFSET)
    else:
        demonstrations = config.demonstrations
        held_out = config.eval_demonstrations
    held_out = held_out or None
    check_grammar = default_task and config.eval_episodes > 0
    if check_grammar:
        grammatical_before = grammatical_fraction(model, tokenizer, config.eval_episodes, config.seed)
    metrics = train_sft(model, tokenizer, demonstrations, config, run_dir, progress, held_out)
    if check_grammar:
        metrics["grammatical_before"] = grammatical_before
        metrics["grammatical_after"] = grammatical_fraction(
            model, tokenizer, config.eval_episodes, config.seed
        )
    atomic_write(run_dir / "sft_metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def _sft_command(args: argparse.Namespace) -> int:
    from rlhf_gym.config import load_config

    overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])
    config = load_config(SFTConfig, args.config, overrides)
    run_dir = Path(args.run_dir or f"runs/sft-{time.strftime('%Y%m%d-%H%M%S')}")
    metrics = run_sft(config, run_dir, progress=not args.quiet)
    print(
        f"SFT: {int(metrics['steps'])} steps on {int(metrics['num_demonstrations'])} demonstrations "
        f"in {metrics['wall_time']:.1f}s; final loss {metrics['final_loss']:.3f}"
    )
    if not math.isnan(metrics["eval_nll_after"]):
        print(
            f"  held-out response NLL {metrics['eval_nll_before']:.4f} -> {metrics['eval_nll_after']:.4f} nats/token"
        )
    if "grammatical_after" in metrics:
        print(
            f"  grammatical reviews {metrics['grammatical_before']:.1%} -> {metrics['grammatical_after']:.1%}"
        )
    print(f"  pi_ref saved to {run_dir / 'sft'} (load it with text_env.load_causal_lm or model=...)")
    return 0


def add_sft_command(sub: argparse._SubParsersAction) -> None:
    """Install `sft` on an argparse subparsers object (`rlhf_gym.cli` lists it in `COMMANDS`)."""
    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning on demonstrations: the reference policy pi_ref",
        description="Fine-tune a causal LM on (prompt, response) demonstrations; saves RUN_DIR/sft/.",
    )
    p.add_argument("--config", default=None, help="YAML file of SFTConfig fields (e.g. configs/sft.yaml)")
    p.add_argument("--run-dir", default=None, help="output folder (default: runs/sft-TIMESTAMP)")
    p.add_argument("--device", default=None, help="cpu, cuda, auto (overrides the config's device)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. lr=3e-4")
    p.set_defaults(handler=_sft_command)
