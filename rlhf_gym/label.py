"""Stage 2a of RLHF, `rlhf-gym label`: a simulated labeller for tasks with a gold reward, the stand-in for
the humans who compare two responses.

    rlhf-gym label --run-dir runs/label [--config my_label.yaml] [--device cpu] num_pairs=2000 tau=0.1

writes `pairs.jsonl`, `label_report.json` and the resolved `label_config.yaml` into the run folder.

For each prompt, pi_ref writes two responses (through the batched, KV-cached vector env: one rollout answers
`batch_size` prompts twice each, `prompt_indices = np.repeat(ids, 2)`). The labeller then prefers response
`a` over `b` with the Bradley-Terry probability

    P(a preferred) = sigmoid((g(a) - g(b)) / tau)

where `g` is the task's gold reward and `tau` the labeller's noise (tau -> 0: always the gold-better one;
large tau: coin flips). This is the noise model a Bradley-Terry reward model assumes, so with enough pairs
and capacity the reward model recovers `g / tau` up to a constant (Christiano et al. 2017 use the same
synthetic labeller; Gao et al. 2022 use a gold RM in the same role).

The labels' **ceiling** is the share of labels that agree with `sign(g(a) - g(b))` (gold ties excluded): no
reward model can agree with the labels more often on average than the gold reward itself, so it is the
held-out accuracy to compare a trained reward model against. `expected_ceiling` is its expectation,
`mean(max(p, 1 - p))`, which the measured one matches up to sampling noise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from rlhf_base.ranges import SEED, Range, check_ranges
from text_env.core import EnvCore
from text_env.judge import as_reward_fn, check_scores
from text_env.rewards import resolve_reward
from text_env.sampler import rollout
from text_env.tasks import get_task
from text_env.vector_env import TextGenVectorEnv

__all__ = [
    "LabelConfig",
    "label_pairs",
    "preference_probability",
    "simulate_labels",
]


@dataclass
class LabelConfig:
    """What to sample and how the simulated labeller judges; the defaults suit the default task.

    `model` is named as the env's and SFT's model; `policy` in a YAML file or an override fails naming it.
    """

    RENAMED: ClassVar[dict[str, str]] = {"policy": "model"}
    RANGES: ClassVar[dict[str, Range]] = {
        "num_pairs": Range(ge=1),
        "tau": Range(ge=0),  # 0: the labeller always prefers the gold-better response
        "seed": SEED,
        "batch_size": Range(ge=1),
        "max_new_tokens": Range(ge=1),
        "temperature": Range(gt=0),
    }

    model: str | None = (
        None  # the model whose samples are labelled: None = tiny-reviews; a saved HF causal LM dir (e.g. SFT)
    )
    task: str = "reviews"  # built-in task or "module:attr": supplies the prompts and the gold reward
    prompts: str | None = (
        None  # replaces the task's prompts: a file, "hf:NAME[@SPLIT]", "module:attr" (as EnvConfig.prompts)
    )
    # What the labeller follows: None = the task's gold reward (kept with user prompts); or any reward as
    # EnvConfig.reward_model takes ("module:function", "module:Class", a saved reward model folder)
    gold_reward: str | None = None
    num_pairs: int = 5000  # preference pairs to produce (pairs with identical responses are resampled)
    tau: float = (
        0.2  # labeller noise: P(a preferred) = sigmoid((g(a) - g(b)) / tau); 0 = always the gold-better one
    )
    seed: int = 0  # seeds the prompt draws, the sampling and the labels
    batch_size: int = 256  # pairs per rollout (the vector env runs 2 x batch_size rows in lockstep)
    max_new_tokens: int = 32  # response length limit of the env
    temperature: float = 1.0  # sampling temperature for the two responses

    def __post_init__(self) -> None:
        check_ranges(self)


def preference_probability(gold_a: np.ndarray, gold_b: np.ndarray, tau: float) -> np.ndarray:
    """`P(a preferred) = sigmoid((g(a) - g(b)) / tau)`, elementwise; tau = 0 gives 1, 0 or 0.5 on a tie."""
    difference = np.asarray(gold_a, dtype=np.float64) - np.asarray(gold_b, dtype=np.float64)
    if tau == 0:
        return np.where(difference > 0, 1.0, np.where(difference < 0, 0.0, 0.5))
    return 0.5 * (1.0 + np.tanh(difference / (2.0 * tau)))  # = sigmoid(d / tau), without overflow


def simulate_labels(
    gold_a: np.ndarray, gold_b: np.ndarray, tau: float, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw Bradley-Terry labels from gold scores and measure how often they agree with the gold order.

    Args:
        gold_a, gold_b: (n,) gold rewards of the two responses of each pair.
        tau: labeller noise (see `preference_probability`).
        rng: numpy generator for the draws.

    Returns:
        `(a_preferred, report)`: (n,) bool labels, and `ceiling` (share of labels agreeing with
        `sign(g(a) - g(b))`, gold ties excluded; NaN if every pair is a tie), `expected_ceiling`
        (`mean(max(p, 1 - p))` over the same pairs) and `num_ties`.
    """
    gold_a, gold_b = np.asarray(gold_a, dtype=np.float64), np.asarray(gold_b, dtype=np.float64)
    if gold_a.shape != gold_b.shape or gold_a.ndim != 1:
        raise ValueError(
            f"gold_a and gold_b must be 1-D of one length, got {gold_a.shape} and {gold_b.shape}"
        )
    p = preference_probability(gold_a, gold_b, tau)
    a_preferred = rng.random(len(p)) < p
    difference = gold_a - gold_b
    decided = difference != 0
    agree = a_preferred[decided] == (difference[decided] > 0)
    report = {
        "ceiling": float(agree.mean()) if decided.any() else float("nan"),
        "expected_ceiling": float(np.maximum(p, 1 - p)[decided].mean()) if decided.any() else float("nan"),
        "num_ties": int((~decided).sum()),
    }
    return a_preferred, report


def _judge_name(name: str) -> str:
    """How messages name the labeller's judge: a NaN it returns is refused naming it and the rows."""
    return f"the labeller's judge {name}"


def _judge_scores(judge: Any, name: str, prompts: list[str], responses: list[str]) -> np.ndarray:
    """The judge's scores as float64, or a ValueError naming it and the rows that are NaN/inf (or the shape)."""
    values = as_reward_fn(judge)(prompts, responses)
    check_scores(values, len(responses), _judge_name(name), responses)
    return torch.as_tensor(values).detach().cpu().numpy().astype(np.float64)


def label_pairs(
    config: LabelConfig | None = None,
    *,
    core: EnvCore | None = None,
    judge: Any = None,
    device: str | None = "cpu",
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample two responses per prompt from the policy and label them with the simulated labeller.

    Args:
        config: what to sample and how to label; default `LabelConfig()`.
        core: an already built `EnvCore` to sample from; its model, prompts and length limit then replace
            `config.model`, `config.task`, `config.prompts` and `config.max_new_tokens`.
        judge: what the labeller follows instead of the task's gold reward: a function `(prompts,
            responses) -> scores` or an object with `.score` (a larger reward model as an AI labeller,
            a rule for a test...). The `gold_*` fields and the ceiling then refer to its scores.
        device: where the policy runs when `core` is not given.
        progress: show a tqdm bar.

    Returns:
        `(pairs, report)`: `config.num_pairs` dicts `{prompt, chosen, rejected, gold_chosen, gold_rejected}`
        (the gold scores are for evaluation only: a reward model trains on the first three), and a report
        with the labels' `ceiling`, `expected_ceiling`, `num_ties`, `num_identical_resampled` (pairs drawn
        again because both responses were the same), gold statistics and `seconds`.
    """
    config = config or LabelConfig()
    start = time.perf_counter()
    policy = "(the given env core)" if core is not None else config.model or "tiny-reviews"
    judge_name = (
        "gold reward"
        if judge is None
        else (getattr(judge, "name", None) or getattr(judge, "__name__", None) or type(judge).__name__)
    )
    if judge is None and config.gold_reward is not None:
        judge = resolve_reward(config.gold_reward, device, "gold_reward")
        judge_name = config.gold_reward
    if core is None:
        task = get_task(config.task, config.prompts, keep_gold=True)
        if task.gold_reward is None and judge is None:
            raise ValueError(
                f"task {task.name!r} has no gold reward, so the simulated labeller has nothing to follow; "
                "label pairs another way and train with `train-rm`"
            )
        core = EnvCore(
            task,
            model=config.model,
            reward_model=judge,
            max_new_tokens=config.max_new_tokens,
            device=device,
            reward_name=_judge_name(judge_name) if judge is not None else None,  # the env scores with it too
        )
    elif core.task.gold_reward is None and judge is None:
        raise ValueError(f"task {core.task.name!r} has no gold reward: the simulated labeller needs one")
    batch_pairs = min(config.batch_size, config.num_pairs)
    envs = TextGenVectorEnv(num_envs=2 * batch_pairs, core=core)
    prompt_rng, label_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(2))
    generator = torch.Generator(device=core.device).manual_seed(config.seed)
    num_prompts = len(core.task.prompts)

    prompts, responses_a, responses_b, gold_a, gold_b = [], [], [], [], []
    identical, rounds, lengths = 0, 0, []
    max_rounds = 10 * math.ceil(config.num_pairs / batch_pairs)  # a policy this deterministic is a mistake
    bar = tqdm(total=config.num_pairs, desc="label", unit="pair", disable=not progress, leave=False)
    while len(prompts) < config.num_pairs:
        if rounds == max_rounds:
            bar.close()
            raise RuntimeError(
                f"after {rounds} rollouts only {len(prompts)} of {config.num_pairs} pairs had two different "
                f"responses: the policy is (nearly) deterministic; raise temperature (now {config.temperature})"
            )
        rounds += 1
        prompt_ids = prompt_rng.integers(num_prompts, size=batch_pairs)
        batch = rollout(
            envs, prompt_indices=np.repeat(prompt_ids, 2), temperature=config.temperature, generator=generator
        )
        if judge is None:
            gold = batch.gold_scores.cpu().numpy()
        else:
            gold = _judge_scores(judge, judge_name, batch.prompts, batch.responses)
        lengths.append(batch.lengths.cpu().numpy())
        for i in range(batch_pairs):  # bookkeeping over finished pairs; the model work above is batched
            if len(prompts) == config.num_pairs:
                break
            a, b = batch.responses[2 * i], batch.responses[2 * i + 1]
            if a == b:
                identical += 1
                continue
            prompts.append(batch.prompts[2 * i])
            responses_a.append(a)
            responses_b.append(b)
            gold_a.append(float(gold[2 * i]))
            gold_b.append(float(gold[2 * i + 1]))
            bar.update(1)
    bar.close()

    a_preferred, report = simulate_labels(np.array(gold_a), np.array(gold_b), config.tau, label_rng)
    pairs = []
    for i, prefer_a in enumerate(a_preferred):
        chosen, rejected = (responses_a[i], responses_b[i]) if prefer_a else (responses_b[i], responses_a[i])
        g_chosen, g_rejected = (gold_a[i], gold_b[i]) if prefer_a else (gold_b[i], gold_a[i])
        pairs.append(
            {"prompt": prompts[i], "chosen": chosen, "rejected": rejected,
             "gold_chosen": g_chosen, "gold_rejected": g_rejected}
        )  # fmt: skip
    gold_all = np.concatenate([gold_a, gold_b])
    report.update(
        num_pairs=len(pairs),
        tau=config.tau,
        seed=config.seed,
        policy=policy,
        judge=judge_name,
        task=core.task.name,
        num_prompts=num_prompts,
        num_identical_resampled=identical,
        rollouts=rounds,
        gold_mean=float(gold_all.mean()),
        gold_std=float(gold_all.std()),
        mean_abs_gold_difference=float(np.abs(np.array(gold_a) - np.array(gold_b)).mean()),
        mean_response_tokens=float(np.concatenate(lengths).mean()),
        seconds=time.perf_counter() - start,
    )
    return pairs, report
