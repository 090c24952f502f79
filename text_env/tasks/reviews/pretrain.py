"""Pretrain the tiny GPT-2 on the review language: the stand-in for "a large pretrained LLM".

Built once (about a minute on 2 CPU cores) and cached under `cache_dir()`, keyed by a fingerprint of
everything that shapes it, so a change to the language or the recipe rebuilds it and nothing stale is
reused. A file lock lets parallel test workers share one build.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerBase

from rlhf_base.io import DataError, atomic_dir, check_weights_folder
from rlhf_base.models import cache_dir
from rlhf_base.ranges import SEED, Range, check_ranges
from text_env.tasks.reviews.language import sample_corpus, vocabulary
from text_env.tasks.reviews.model import TinyConfig, tiny_gpt2
from text_env.tasks.reviews.tokenizer import build_tokenizer

__all__ = ["PretrainConfig", "cache_key", "pretrain", "pretrained_tiny_reviews"]


@dataclass(frozen=True)
class PretrainConfig:
    """The recipe of the built-in model; every field is part of the cache key."""

    RANGES: ClassVar[dict[str, Range]] = {
        "num_reviews": Range(ge=1),
        "steps": Range(ge=1),
        "batch_size": Range(ge=1),
        "lr": Range(gt=0),
        "warmup": Range(ge=0),
        "seed": SEED,
        "threads": Range(ge=1),
        "version": Range(ge=1),
    }

    model: TinyConfig = TinyConfig()  # architecture
    num_reviews: int = 20_000  # corpus size, sampled from the grammar
    steps: int = 500  # optimiser steps (the loss plateaus near 2.05 by ~400)
    batch_size: int = 64  # reviews per step
    lr: float = 3e-3  # peak AdamW learning rate, cosine-decayed to 10%
    warmup: int = 50  # linear warm-up steps
    seed: int = 0  # corpus and initialisation seed
    threads: int = 2  # torch threads while pretraining: float sums depend on the thread count, so a fixed
    # count makes the cached model the same whoever builds it first (a 1-thread test worker or the demo;
    # 2 threads build it in ~65 s on 2 cores, 1 thread in ~120 s)
    version: int = 1  # bump to invalidate caches when the code changes meaning

    def __post_init__(self) -> None:
        check_ranges(self)


def _fingerprint(config: PretrainConfig) -> str:
    blob = json.dumps({"config": asdict(config), "vocab": vocabulary()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pretrain(
    config: PretrainConfig = PretrainConfig(), *, progress: bool = True
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    """Train the tiny GPT-2 from scratch on reviews sampled from the grammar (next-token loss, EOS-terminated).

    Runs on `config.threads` torch threads (the caller's count is restored after), so the result does not
    depend on who asked first.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _pretrain(config, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(config: PretrainConfig, progress: bool) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer()
    model = tiny_gpt2(tokenizer, config.model)
    reviews = sample_corpus(config.num_reviews, seed=config.seed)
    # Each review is its own sequence starting at position 0, exactly as prompts are seen at generation time.
    encoded = [ids + [tokenizer.eos_token_id] for ids in tokenizer(reviews)["input_ids"]]
    rng = np.random.default_rng(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress_frac = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress_frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    start, loss_ema = time.perf_counter(), None
    for step in range(config.steps):
        batch = [encoded[i] for i in rng.integers(len(encoded), size=config.batch_size)]
        width = max(map(len, batch))
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if progress and (step % 100 == 0 or step == config.steps - 1):
            print(
                f"[pretrain tiny-reviews] step {step + 1}/{config.steps} loss {loss_ema:.3f} "
                f"({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    return model.eval(), tokenizer


def cache_key(config: PretrainConfig = PretrainConfig()) -> str:
    """The built model's name in the cache: it changes whenever anything that shapes the model changes, so
    a stage built on the model (the pipeline's SFT) can key its own cache on it."""
    return f"tiny-reviews-{_fingerprint(config)}"


def pretrained_tiny_reviews(
    config: PretrainConfig = PretrainConfig(),
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    """The cached pretrained model and tokenizer, built on first use (safe across processes)."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / cache_key(config)
    with open(root / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait, then load
        if not (target / "config.json").is_file():
            print(f"[rlhf-gym] building the tiny-reviews model once; cached at {target}", flush=True)
            model, tokenizer = pretrain(config)
            with atomic_dir(target) as tmp:
                model.save_pretrained(tmp)  # safetensors
                tokenizer.save_pretrained(tmp)
    try:
        check_weights_folder(target)  # written atomically, yet a disk can corrupt it: say how to recover
    except DataError as e:
        raise DataError(f"{e} (the built-in model's cache: delete {target} and it is built again)") from None
    model = GPT2LMHeadModel.from_pretrained(target, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(target)
    return model.eval(), tokenizer
