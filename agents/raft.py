"""RAFT: Reward rAnked FineTuning (Dong et al. 2023, arXiv:2304.06767), on the text env.

Each round (the paper's "stage"):
  1. Data collection: pick `prompts_per_iteration` prompts and sample k = `samples_per_prompt` responses
     to each from the current policy, through the KV-cached vector env (`text_env.rollout` with
     `np.repeat(prompts, k)`).
  2. Ranking: keep the `keep` best responses per prompt by the *reward model's* score (`rm_scores`, the
     proxy the agent may see; never the gold score, which is for evaluation only).
  3. Fine-tuning: train the policy on the kept (prompt, response) pairs with SFT's loss and step
     (`agents.sft.sft_loss` / `sft_step`), on the very tokens that were sampled (no re-tokenisation).

There is no explicit KL term in the update: RAFT stays near pi_ref because it only imitates its own
best samples. The KL to pi_ref is still measured by the env on every sample and reported per round,
for all samples and for the kept ones, so RAFT sits on the same reward-vs-KL axes as the RL agents.

    agent = RAFTAgent(text_env.TextGenVectorEnv(num_envs=64), RAFTConfig(iterations=5))
    history = agent.learn()          # one metrics dict per round
    agent.evaluate(256, seed=0)      # fresh samples, no learning
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

import text_env
from agents.base import (
    ENV_SETTINGS,
    Callback,
    act_with_policy,
    check_rank_scores,
    env_state,
    evaluate_policy,
    load_env_state,
    load_policy,
    load_policy_state,
    policy_state,
    prepare_policy,
    rollout_metrics,
    save_policy,
)
from agents.loop import Iteration, run_iterations
from agents.sft import IGNORE_INDEX, sft_step
from rlhf_base.lora import LoraConfig
from rlhf_base.optim import adam
from rlhf_base.ranges import SEED, Range, check_ranges
from text_env.sampler import Rollout

__all__ = ["RAFTAgent", "RAFTConfig", "rollout_batch", "select_best"]


@dataclass
class RAFTConfig:
    """One RAFT run; the defaults raise the reward on the default task within a few CPU-seconds per round.

    Knobs several configs share have one name in all of them (`learning_rate`, `samples_per_prompt`); a YAML
    file or override with an old name fails naming the new one (`RENAMED`). Samples are drawn
    `envs.num_envs` rows at a time: the batch size is the env's setting (`env.num_envs`).
    """

    RENAMED: ClassVar[dict[str, str]] = {"lr": "learning_rate", "k": "samples_per_prompt"}
    MOVED_KEYS: ClassVar[dict[str, str]] = {"num_envs": ENV_SETTINGS["num_envs"]}
    RANGES: ClassVar[dict[str, Range]] = {
        "iterations": Range(ge=1),
        "samples_per_prompt": Range(ge=2),  # RAFT ranks the samples of a prompt
        "prompts_per_iteration": Range(ge=1),
        "keep": Range(ge=1),  # and < samples_per_prompt: keeping all ranks nothing (__post_init__)
        "epochs": Range(ge=1),
        "learning_rate": Range(gt=0),
        "batch_size": Range(ge=1),
        "max_grad_norm": Range(gt=0),
        "temperature": Range(gt=0),
        "seed": SEED,
    }

    iterations: int = 10  # rounds of sample -> rank -> fine-tune that learn() runs by default
    samples_per_prompt: int = 4  # responses sampled per prompt (the paper's K)
    prompts_per_iteration: int = 64  # prompts per round (the paper's batch b)
    keep: int = 1  # responses kept per prompt, the best by rank_by (the paper keeps 1 of K)
    rank_by: Literal["rm_score", "reward"] = "rm_score"  # rm_score (the paper) or env reward rm - beta * kl
    epochs: int = 1  # SFT passes over each round's kept samples
    learning_rate: float = (
        5e-4  # AdamW learning rate of the fine-tuning step (constant; optimiser kept across rounds)
    )
    batch_size: int = 16  # kept samples per SFT step
    max_grad_norm: float = 1.0  # gradient clipping (global L2 norm)
    # None: sample by the env's rules (`env.temperature`); a value is RAFT's own tweak: its samples come
    # from the policy at that temperature and their logged KL is that of the tempered distribution against
    # the env's reference (`text_env.sampling`)
    temperature: float | None = None
    seed: int = 0  # prompt choice and sampling RNG
    # None: full fine-tuning; {r, alpha, target_modules}: a LoRA adapter trains and pi_ref is the policy
    # with the adapter off (`agents.base.prepare_policy`, `rlhf_base.lora.LoraConfig`); RAFT's fine-tuning
    # runs in train mode, so lora.dropout acts there
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        check_ranges(self)
        k = self.samples_per_prompt
        if not self.keep < k:
            raise ValueError(
                f"keep must be in [1, samples_per_prompt) = [1, {k}), got {self.keep}: keeping all ranks nothing"
            )
        if self.rank_by not in ("rm_score", "reward"):
            raise ValueError(f"rank_by must be 'rm_score' or 'reward', got {self.rank_by!r}")


# --------------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------------
def _take(batch: Rollout, rows: torch.Tensor | np.ndarray) -> Rollout:
    """The sub-batch of `rows` (any per-row field indexed, lists included)."""
    rows_t = torch.as_tensor(rows, dtype=torch.long, device=batch.input_ids.device)
    rows_np = rows_t.cpu().numpy()
    values = {}
    for f in fields(Rollout):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            values[f.name] = value[rows_t]
        elif isinstance(value, np.ndarray):
            values[f.name] = value[rows_np]
        elif isinstance(value, list):
            values[f.name] = [value[i] for i in rows_np]
        else:
            values[f.name] = value  # response_start
    return Rollout(**values)


def _concat(batches: list[Rollout]) -> Rollout:
    values = {}
    for f in fields(Rollout):
        parts = [getattr(b, f.name) for b in batches]
        if isinstance(parts[0], torch.Tensor):
            values[f.name] = torch.cat(parts)
        elif isinstance(parts[0], np.ndarray):
            values[f.name] = np.concatenate(parts)
        elif isinstance(parts[0], list):
            values[f.name] = [x for part in parts for x in part]
        else:
            values[f.name] = parts[0]
    return Rollout(**values)


def select_best(scores: torch.Tensor, k: int, keep: int = 1) -> torch.Tensor:
    """Rows of the `keep` highest scores in each consecutive group of `k` (ties: the first sampled).

    Args:
        scores: (M * k,) one score per sample, ordered as `np.repeat(prompts, k)`.

    Returns:
        (M * keep,) row indices into `scores`, grouped by prompt, best first.
    """
    grouped = scores.view(-1, k)  # (M, k)
    # A stable descending sort, so that equal scores keep sampling order (topk's tie order is unspecified).
    best = torch.sort(grouped, dim=1, descending=True, stable=True).indices[:, :keep]  # (M, keep)
    offsets = torch.arange(grouped.shape[0], device=scores.device)[:, None] * k
    return (offsets + best).flatten()


def rollout_batch(batch: Rollout, rows: torch.Tensor | np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """The SFT batch of sampled episodes: the env's tokens as they are, labels on the response only.

    The prompt stays left-padded (`sft_loss` takes positions from the mask); the labels are the response
    tokens, EOS included where the policy wrote it (a response cut at `max_new_tokens` has none, and is
    imitated as it was sampled).
    """
    if rows is not None:
        rows = torch.as_tensor(rows, dtype=torch.long, device=batch.input_ids.device)
    input_ids = batch.input_ids if rows is None else batch.input_ids[rows]  # (B, P + N)
    attention_mask = batch.attention_mask if rows is None else batch.attention_mask[rows]  # (B, P + N)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, : batch.response_start] = IGNORE_INDEX
    width = int(attention_mask[:, batch.response_start :].sum(-1).max()) + batch.response_start
    return {
        "input_ids": input_ids[:, :width],
        "attention_mask": attention_mask[:, :width],
        "labels": labels[:, :width],
    }


# --------------------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------------------
class RAFTAgent:
    """RAFT on a `TextGenVectorEnv`; trains `envs.policy` in place (pi_ref is `envs.reference`).

    Metrics per round (all floats): the shared `METRIC_KEYS` over the round's k-per-prompt samples
    (drawn before that round's update), plus `kept_rm_score`, `kept_gold_score`, `kept_kl`,
    `kept_length` over the kept samples, `sft_loss` (mean over the round's steps), `num_samples`,
    `num_kept`.
    """

    name = "raft"
    Config = RAFTConfig

    def __init__(self, envs: text_env.TextGenVectorEnv, config: RAFTConfig | None = None) -> None:
        self.envs = envs
        self.config = config if config is not None else RAFTConfig()
        self.history: list[dict[str, float]] = []
        policy = envs.policy
        if not any(p.requires_grad for p in policy.parameters()):
            raise ValueError("envs.policy has no trainable parameters; hand the env a trainable policy")
        prepare_policy(envs, self.config.lora, self.config.seed, self.name, train_mode=True)
        self.device = next(policy.parameters()).device
        self.rng = np.random.default_rng(self.config.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        self.optimizer = self._make_optimizer()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.envs.policy.parameters() if p.requires_grad]
        return adam(params, lr=self.config.learning_rate, weight_decay=0.0)

    # ---- 1. data collection ---------------------------------------------------------------------------
    def sample(self, prompt_indices: np.ndarray) -> Rollout:
        """k samples per prompt, in `np.repeat(prompt_indices, k)` order, batched `num_envs` rows at a time."""
        wanted = np.repeat(np.asarray(prompt_indices, dtype=np.int64), self.config.samples_per_prompt)
        num_envs, batches = self.envs.num_envs, []
        self.envs.policy.eval()
        for start in range(0, len(wanted), num_envs):
            chunk = wanted[start : start + num_envs]
            padded = np.resize(chunk, num_envs)  # the last chunk is filled up with repeats, then dropped
            batch = text_env.rollout(
                self.envs,
                prompt_indices=padded,
                generator=self.generator,
                temperature=self.config.temperature,
            )
            batches.append(_take(batch, np.arange(len(chunk))) if len(chunk) < num_envs else batch)
        return _concat(batches)

    # ---- 3. fine-tuning ---------------------------------------------------------------------------------
    def fine_tune(self, batch: Rollout, rows: torch.Tensor, iteration: int) -> float:
        """`epochs` passes of SFT over the kept rows; returns the mean loss."""
        cfg, policy, losses = self.config, self.envs.policy, []
        policy.train()
        try:
            for _ in range(cfg.epochs):
                order = rows[torch.randperm(len(rows), generator=self.generator, device=self.device)]
                for i in range(0, len(order), cfg.batch_size):
                    minibatch = rollout_batch(batch, order[i : i + cfg.batch_size])
                    at = f" in RAFT iteration {iteration}"
                    loss, _ = sft_step(
                        policy, self.optimizer, minibatch, max_grad_norm=cfg.max_grad_norm, at=at
                    )
                    losses.append(loss)
        finally:
            policy.eval()
        return float(np.mean(losses))

    # ---- the loop ---------------------------------------------------------------------------------------
    def learn(
        self, iterations: int | None = None, callback: Callback | None = None
    ) -> list[dict[str, float]]:
        """Run `iterations` rounds (default `config.iterations`); return this call's metrics per round.

        `callback(agent, metrics)` runs after each round; returning False stops early.
        """
        return run_iterations(self, self._iteration, iterations, callback)

    def _iteration(self, iteration: int) -> Iteration:
        """One round: sample k per prompt, keep the best `keep` by `rank_by`, fine-tune on them."""
        cfg, num_prompts = self.config, len(self.envs.prompts)
        prompts = self.rng.choice(
            num_prompts, size=cfg.prompts_per_iteration, replace=cfg.prompts_per_iteration > num_prompts
        )
        batch = self.sample(prompts)  # (M * k) rows
        scores = batch.rm_scores if cfg.rank_by == "rm_score" else batch.rewards
        check_rank_scores(self.envs, scores, batch.responses, f"RAFT keeps the best by its {cfg.rank_by}")
        kept = select_best(scores, cfg.samples_per_prompt, cfg.keep)  # (M * keep,)
        loss = self.fine_tune(batch, kept, iteration)
        best = rollout_metrics(_take(batch, kept), iteration, 0.0, 0)
        metrics = {f"kept_{key}": best[key] for key in ("rm_score", "gold_score", "kl", "length")}
        metrics.update(sft_loss=loss, num_samples=float(len(batch.responses)), num_kept=float(len(kept)))
        return Iteration(batch, batch.num_tokens, metrics)

    # ---- the Agent protocol's rest ----------------------------------------------------------------------
    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Next-token ids (B,) sampled from the policy for a batch of env observations."""
        return act_with_policy(self.envs.policy, obs, generator=self.generator, envs=self.envs)

    def evaluate(self, num_episodes: int = 256, seed: int = 0) -> dict[str, float]:
        """Mean metrics of fresh samples (by the env's sampling options) on random prompts, without learning."""
        self.envs.policy.eval()
        return evaluate_policy(self.envs, num_episodes, seed)

    def save(self, path: str | Path) -> None:
        """The policy as a Hugging Face directory (safetensors + tokenizer), written atomically."""
        save_policy(self.envs.policy, self.envs.tokenizer, path, self.config.lora)

    def load(self, path: str | Path) -> None:
        """Load policy weights saved by `save` into `envs.policy` (same architecture); resets the optimiser."""
        load_policy(self.envs.policy, path)
        self.optimizer = self._make_optimizer()

    def state_dict(self) -> dict[str, Any]:
        """What the next rounds depend on, for a checkpoint: the policy, AdamW's state (kept across rounds),
        the prompt and sampling RNGs, the env's state, and the metrics so far. Dropout during fine-tuning
        draws from torch's global RNG, which the trainer saves (`rlhf_base.checkpoint.global_rng_state`)."""
        return {
            "policy": policy_state(self.envs.policy),
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.bit_generator.state,
            "generator": self.generator.get_state(),
            "env": env_state(self.envs),
            "history": [dict(row) for row in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a `state_dict()` into this agent (same env and config), in place."""
        load_policy_state(self.envs.policy, state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])
        load_env_state(self.envs, state["env"])
        self.history = [dict(row) for row in state["history"]]
