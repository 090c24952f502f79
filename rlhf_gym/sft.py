"""Stage 1 of RLHF, `rlhf-gym sft`: fine-tune a base LM on demonstrations into the reference policy pi_ref.

    pairs = load_demonstrations("demos.jsonl")       # [(prompt, response), ...]
    model, tokenizer = rlhf_base.models.load_causal_lm()
    metrics = train_sft(model, tokenizer, pairs, SFTConfig(epochs=1), run_dir="runs/a")
    # runs/a/sft/ is a Hugging Face directory: load_causal_lm("runs/a/sft") reads it back.

The loss, the step and the data handling are `agents.sft` (RAFT reuses them); this module is the loop
around them (warm-up and cosine schedule, checkpoints, logs) and the command.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from agents.sft import (
    IGNORE_INDEX,
    collate,
    encode_demonstrations,
    load_demonstrations,
    response_nll,
    sft_step,
    take_rows,
)
from rlhf_base.io import atomic_dir, atomic_write
from rlhf_base.lm import context_length
from rlhf_base.models import resolve_device
from rlhf_base.optim import adam
from rlhf_base.ranges import SEED, Range, check_ranges
from rlhf_base.runlog import RunLog

__all__ = ["SFTConfig", "grammatical_fraction", "run_sft", "train_sft"]


@dataclass
class SFTConfig:
    """Supervised fine-tuning on (prompt, response) demonstrations; the defaults are tuned for the default task
    (~40 s on 2 CPU cores).

    Knobs several configs share have one name in all of them (`learning_rate`; `warmup_steps` counts steps
    where the reward model's `warmup_fraction` is a share); an old name in a YAML file or an override fails
    naming the new one (`RENAMED`).
    """

    RENAMED: ClassVar[dict[str, str]] = {"lr": "learning_rate", "warmup": "warmup_steps"}
    RANGES: ClassVar[dict[str, Range]] = {
        "num_demonstrations": Range(ge=1),
        "num_eval_demonstrations": Range(ge=0),
        "eval_episodes": Range(ge=0),  # 0: skip
        "epochs": Range(ge=1),
        "batch_size": Range(ge=1),
        "learning_rate": Range(gt=0),
        "warmup_steps": Range(ge=0),
        "weight_decay": Range(ge=0),
        "max_grad_norm": Range(gt=0),
        "max_length": Range(ge=2),  # a prompt token and EOS
        "seed": SEED,
        "save_every": Range(ge=0),  # 0: only the final model
    }

    model: str | None = None  # base model: None = built-in tiny-reviews, or a saved HF dir / hub id
    demonstrations: str | None = None  # JSONL/JSON/CSV/Parquet of "prompt", "response"; None = generator
    num_demonstrations: int = 8192  # pairs drawn from the default task's generator (unused with a file)
    eval_demonstrations: str | None = None  # held-out file for the NLL report (None: default task only)
    num_eval_demonstrations: int = 1024  # held-out pairs drawn from the generator, with a seed of their own
    eval_episodes: int = 256  # default task: rollouts measuring the grammatical fraction (0: skip)
    epochs: int = 1  # passes over the demonstrations
    batch_size: int = 32  # demonstrations per optimiser step
    learning_rate: float = 1e-3  # peak AdamW learning rate, cosine-decayed to 10% after warm-up
    warmup_steps: int = 10  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping (global L2 norm)
    max_length: int | None = None  # prompt + response + EOS tokens; longer responses are cut; None = context
    seed: int = 0  # shuffling, initialisation noise, and the generator's demonstrations
    device: str = "cpu"  # "cpu", "cuda", "cuda:1" or "auto"
    save_every: int = 0  # optimiser steps between checkpoints of run_dir/sft (0: only the final model)

    def __post_init__(self) -> None:
        check_ranges(self)


# --------------------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------------------
#: The columns of `sft_log.csv`, one row per optimiser step; loss, grad_norm and lr also go to TensorBoard.
LOG_FIELDS = ("step", "epoch", "loss", "grad_norm", "lr", "tokens", "wall_time")


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
    examples = encode_demonstrations(tokenizer, pairs, config.max_length or context_length(model))
    data = collate(examples, tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (a frozen reference?); pass a trainable copy")
    model.to(device)
    held_out = load_demonstrations(eval_demonstrations) if eval_demonstrations is not None else None
    nll_before = response_nll(model, tokenizer, held_out) if held_out else math.nan

    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    optimizer = adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)

    def lr_factor(step: int) -> float:
        """Linear warm-up, then cosine decay to 10% of the peak (as tiny-reviews' pretraining)."""
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        frac = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    run_dir = Path(run_dir) if run_dir is not None else None
    log = RunLog(run_dir, csv="sft_log.csv", fields=LOG_FIELDS, tensorboard="tensorboard/sft", prefix="sft/")
    rng = np.random.default_rng(config.seed)
    if held_out:
        log.scalar("eval_nll", nll_before, 0)
    bar = tqdm(total=total_steps, desc="sft", unit="step", disable=not progress, dynamic_ncols=True)
    step, tokens, epoch_losses = 0, 0, []
    model.train()
    try:
        for epoch in range(config.epochs):
            epoch_losses = []
            order = rng.permutation(len(examples))
            for i in range(steps_per_epoch):
                batch = take_rows(data, order[i * config.batch_size : (i + 1) * config.batch_size], device)
                lr = scheduler.get_last_lr()[0]
                at = f" at step {step + 1} of {total_steps}"
                loss, grad_norm = sft_step(model, optimizer, batch, max_grad_norm=config.max_grad_norm, at=at)
                scheduler.step()
                step, tokens = step + 1, tokens + int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                epoch_losses.append(loss)
                wall_time = time.perf_counter() - start
                row = {"step": step, "epoch": epoch + 1, "loss": loss, "grad_norm": grad_norm, "lr": lr}
                row.update(tokens=tokens, wall_time=wall_time)
                log.log(row, step, scalars=("loss", "grad_norm", "lr"))
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
            log.scalar("eval_nll", nll_after, step)
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
    from rlhf_base.models import frozen_copy
    from text_env.tasks.reviews import is_review

    reference = frozen_copy(model)
    envs = text_env.TextGenVectorEnv(
        num_envs=min(num_episodes, 128),
        reference=reference,
        policy=reference,
        tokenizer=tokenizer,
        device=str(next(model.parameters()).device),
    )
    generator = torch.Generator(device=next(envs.policy.parameters()).device).manual_seed(seed)
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
    from rlhf_base.config import save_config
    from rlhf_base.models import load_causal_lm

    run_dir = Path(run_dir)
    default_task = config.demonstrations is None
    if (
        not default_task
    ):  # read (and checked) before the model loads: a missing or malformed file fails at once
        demonstrations = load_demonstrations(config.demonstrations)
        held_out = load_demonstrations(config.eval_demonstrations) if config.eval_demonstrations else None
    save_config(config, run_dir / "sft_config.yaml")
    model, tokenizer = load_causal_lm(config.model, device=config.device)
    if default_task:
        from text_env.tasks.reviews import sample_demonstrations

        demonstrations = sample_demonstrations(config.num_demonstrations, seed=config.seed)
        held_out = sample_demonstrations(config.num_eval_demonstrations, seed=config.seed + EVAL_SEED_OFFSET)
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
