"""GRPO and Dr. GRPO: group-relative advantages, PPO's clipped surrogate, a k3 KL term in the loss, no critic.

GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, section 4.1) samples a group of G responses
`o_1 .. o_G` to each prompt and replaces PPO's critic with the group itself: each response's advantage is its
reward standardised within its group, given to every one of its tokens. The objective (the paper's eq. 3),
as a loss to minimise:

    A_i    = (r_i - mean(r_1..G)) / (std(r_1..G) + eps)                  r_i = rm_score of o_i
    L_it   = max(-A_i * ratio_it, -A_i * clip(ratio_it, 1 - clip_range, 1 + clip_range))
             + beta * (exp(ref_it - logp_it) - (ref_it - logp_it) - 1)      ratio_it = pi / pi_rollout
    loss   = mean_i (1 / |o_i|) sum_t L_it

* **The KL term is in the loss, not the reward**: r_i is the reward model's score alone (`batch.rm_scores`,
  without the env's `-beta * kl`), and the KL enters each token as Schulman's k3 of its log-ratio,
  differentiated through the current log-probs: `kl_in="loss"`, `kl_estimator="k3"`,
  `kl_granularity="token"` in PPO's and REINFORCE's terms. On-policy this climbs `E[rm_score] -
  beta * KL(pi_ref || pi)` step by step (the forward KL of each token's distribution, myopic): not the
  RLHF optimum `pi_ref * exp(rm_score / beta) / Z` (`rlhf_base.maths.kl_penalty`, the README's
  "Objectives"; `tests/test_kl_objectives.py` checks the table). beta is the env's (`envs.beta`).
* **Length normalisation**: `1 / |o_i|` averages each response's tokens, then responses are averaged.
* **Updates**: `epochs` passes over shuffled minibatches of rows (the paper's mu; it uses mu = 1, one
  gradient step per rollout, where the ratio is 1 and the clip never acts); the ratio is to the rollout
  policy, whose log-probs a no-grad teacher-forced forward gives when there is more than one step.

Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv:2503.20783,
section 3.1) removes two biases of that objective: dividing by the group's std weighs prompts whose
responses all score alike (too easy or too hard) more, and `1 / |o_i|` makes a wrong answer's per-token
penalty smaller the longer it is, so wrong answers grow long. It keeps the rest:

    A_i    = r_i - mean(r_1..G)
    loss   = mean_i (1 / N) sum_t L_it          N = envs.max_new_tokens, a constant

`variant: grpo | dr_grpo` selects one; the registry's `dr_grpo` is this agent with `variant="dr_grpo"`.
Logged: the env's shared metrics (its `kl` is the k1 of the sampled responses, whatever is optimised), and
`kl_objective`, the mean per-response sum of the k3 terms at the rollout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

import text_env
from agents.base import (
    ENV_SETTINGS,
    Callback,
    PolicyAgentMixin,
    check_finite,
    take_rows,
)
from agents.loop import Iteration, run_iterations
from agents.reinforce import group_prompt_indices, policy_logprobs
from rlhf_base.lora import LoraConfig
from rlhf_base.maths import clipped_surrogate, kl_penalty, masked_mean, masked_sum
from rlhf_base.ranges import SEED, Range, check_ranges

__all__ = [
    "VARIANTS",
    "DrGRPOAgent",
    "DrGRPOConfig",
    "GRPOAgent",
    "GRPOConfig",
    "grpo_loss",
    "group_advantages",
]

Variant = Literal["grpo", "dr_grpo"]
VARIANTS: tuple[str, ...] = ("grpo", "dr_grpo")


@dataclass
class GRPOConfig:
    """GRPO's settings; the defaults suit the default task (tiny-reviews, num_envs 64: 16 groups of 4)."""

    RENAMED: ClassVar[dict[str, str]] = {
        "lr": "learning_rate",
        "k": "samples_per_prompt",
        "num_generations": "samples_per_prompt",  # TRL's GRPOConfig name
        "num_iterations": "epochs",  # TRL's name for the paper's mu
    }
    MOVED_KEYS: ClassVar[dict[str, str]] = ENV_SETTINGS
    RANGES: ClassVar[dict[str, Range]] = {
        "iterations": Range(ge=1),
        "samples_per_prompt": Range(ge=2),  # each response is compared with the others of its group
        "learning_rate": Range(gt=0),
        "weight_decay": Range(ge=0),
        "adam_eps": Range(gt=0),
        "max_grad_norm": Range(gt=0),
        "epochs": Range(ge=1),
        "num_minibatches": Range(ge=1),
        "clip_range": Range(gt=0),
        "std_eps": Range(ge=0),
        "seed": SEED,
    }

    iterations: int = 450  # rollouts (and updates) per learn() call, as REINFORCE's
    variant: Variant = "grpo"  # grpo | dr_grpo (the module docstring: the two formulas)
    samples_per_prompt: int = 4  # G, responses per prompt (>= 2, must divide num_envs)
    learning_rate: float = 3e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    adam_eps: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # global gradient-norm clip
    epochs: int = 1  # passes over each rollout (the paper's mu = 1: one step, the ratio stays 1)
    num_minibatches: int = 1  # minibatches of rows per pass (shuffled), one gradient step each
    clip_range: float = 0.2  # epsilon of the ratio clip
    std_eps: float = 1e-4  # GRPO only: A = (r - mean) / (std + std_eps), TRL's value
    seed: int = 0  # seeds the prompt draws, the sampling generator, minibatch order and torch
    # None: full fine-tuning; {r, alpha, target_modules}: a LoRA adapter trains and pi_ref is the policy
    # with the adapter off (`agents.base.prepare_policy`, `rlhf_base.lora.LoraConfig`)
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {self.variant!r}")


@dataclass
class DrGRPOConfig(GRPOConfig):
    """Dr. GRPO's settings: GRPO's, with `variant` "dr_grpo" (no std, no 1 / |o_i|)."""

    variant: Variant = "dr_grpo"  # grpo | dr_grpo (the module docstring: the two formulas)


# --------------------------------------------------------------------------------------------------------
# Pieces: group advantages, the loss
# --------------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, k: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Each response's reward relative to its group: `(r - mean) / (std + eps)` (GRPO) or `r - mean` (Dr.).

    Args:
        rewards: (B,) sequence rewards, k consecutive samples per prompt (row i * k + j: sample j of group i).
        k: the group size G, at least 2.
        scale: divide by the group's standard deviation (unbiased, as `torch.std`, TRL and OpenRLHF) plus
            `eps`; a group whose rewards are all equal gets advantages 0 either way.
        eps: keeps a group of equal rewards finite.

    Returns:
        (B,) advantages, one per response (the caller gives it to every token).
    """
    if rewards.dim() != 1 or k < 2 or rewards.shape[0] % k:
        raise ValueError(
            f"group_advantages needs rewards (B,) and k >= 2 dividing B, got {tuple(rewards.shape)}, k={k}"
        )
    grouped = rewards.view(-1, k)  # (B / k, k)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (B / k, k)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)  # (B,)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    beta: float,
    variant: str = "grpo",
    max_new_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's (or Dr. GRPO's) loss: the clipped surrogate plus beta * k3 per token, then averaged.

    Args:
        logprobs: (B, N) log pi of the response tokens, with grad.
        old_logprobs: (B, N) the same under the rollout policy (the ratio's denominator).
        ref_logprobs: (B, N) the same under pi_ref.
        advantages: (B,) one advantage per response, given to each of its tokens.
        mask: (B, N) 1 on response tokens.
        clip_range: epsilon of the ratio clip.
        beta: the KL coefficient (the env's).
        variant: "grpo": `mean_i (1 / |o_i|) sum_t L_it`; "dr_grpo": `mean_i (1 / N) sum_t L_it`.
        max_new_tokens: N, Dr. GRPO's constant normaliser (the env's response limit); default mask's width.

    Returns:
        `(loss, stats)`: the scalar loss; `clip_fraction` and `approx_kl` (`clipped_surrogate`'s) and
        `kl_loss`, the KL term as averaged into the loss (before beta).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    token_advantages = advantages[:, None].expand_as(logprobs)  # (B, N)
    surrogate, stats = clipped_surrogate(logprobs, old_logprobs, token_advantages, mask, clip_range)  # (B, N)
    kl = kl_penalty(logprobs, ref_logprobs, mask, "k3", "token", "loss")  # (B, N): exp(-l) - 1 + l, with grad

    def per_response(x: torch.Tensor) -> torch.Tensor:  # (B,)
        if variant == "grpo":
            return masked_mean(x, mask, dim=-1)  # (1 / |o_i|) sum_t
        return masked_sum(x, mask, dim=-1) / (max_new_tokens or mask.shape[-1])  # (1 / N) sum_t

    kl_loss = per_response(kl).mean()
    loss = per_response(surrogate).mean() + beta * kl_loss
    return loss, {**stats, "kl_loss": kl_loss.item()}


# --------------------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------------------
class GRPOAgent(PolicyAgentMixin):
    """GRPO (or Dr. GRPO, `variant`) on `envs.policy`: num_envs / G prompts, G samples each, per rollout.

    Args:
        envs: the vector env; `envs.beta` is the KL coefficient, `envs.max_new_tokens` Dr. GRPO's N.
        config: a `GRPOConfig` (None: the class's defaults).
    """

    name = "grpo"
    Config = GRPOConfig

    @staticmethod
    def check_num_envs(config: GRPOConfig, num_envs: int) -> None:
        """The env's batch size against `config` (`agents.base.check_num_envs`: also run by `train` and the
        sweep's planner on the env's config, before any model loads)."""
        k = config.samples_per_prompt
        if num_envs % k:
            raise ValueError(
                f"num_envs={num_envs} is not divisible by samples_per_prompt={k}: each rollout holds "
                f"num_envs / {k} groups of {k} samples; choose num_envs a multiple of {k}"
            )

    def __init__(self, envs: text_env.TextGenVectorEnv, config: GRPOConfig | None = None) -> None:
        config = self.Config() if config is None else config
        self.check_num_envs(config, envs.num_envs)
        self._start_training(envs, config)

    def learn(
        self, iterations: int | None = None, callback: Callback | None = None
    ) -> list[dict[str, float]]:
        """Roll out groups, compute their advantages, take `epochs` x minibatch steps; repeat."""
        return run_iterations(self, self._iteration, iterations, callback)

    def _iteration(self, iteration: int) -> Iteration:
        """One rollout of num_envs / G groups, their advantages, then the clipped updates."""
        cfg, envs, policy = self.config, self.envs, self.envs.policy
        policy.eval()  # no dropout: the sampled and the trained policy must be the same function
        k, num_rows, beta = cfg.samples_per_prompt, envs.num_envs, envs.beta
        prompts = group_prompt_indices(self.rng, len(envs.prompts), num_rows, k)
        batch = text_env.rollout(envs, prompt_indices=prompts, generator=self.generator)
        mask = batch.response_mask  # (B, N)
        b_advantages = group_advantages(batch.rm_scores, k, cfg.variant == "grpo", cfg.std_eps)  # (B,)
        overhead = envs.speed.overhead_tokens
        minibatch_size = max(1, math.ceil(num_rows / cfg.num_minibatches))
        single_step = cfg.epochs == 1 and minibatch_size >= num_rows
        b_old_logprobs = None  # one step: the ratio's denominator is the current log-probs, detached (TRL)
        if not single_step:  # later steps are off-policy: the rollout policy's log-probs, teacher-forced
            with torch.no_grad():
                b_old_logprobs, _ = policy_logprobs(policy, batch, False, overhead, envs.sampling)

        stats: dict[str, list[float]] = {key: [] for key in ("loss", "clip_fraction", "approx_kl", "kl_loss")}
        for _ in range(cfg.epochs):
            order = torch.randperm(num_rows, generator=self.shuffle_generator)
            for lo in range(0, num_rows, minibatch_size):
                mb = order[lo : lo + minibatch_size]
                logprobs, _ = policy_logprobs(policy, take_rows(batch, mb), False, overhead, envs.sampling)
                old_logprobs = logprobs.detach() if b_old_logprobs is None else b_old_logprobs[mb]
                loss, mb_stats = grpo_loss(
                    logprobs,
                    old_logprobs,
                    batch.ref_logprobs[mb],
                    b_advantages[mb],
                    mask[mb],
                    cfg.clip_range,
                    beta,
                    cfg.variant,
                    envs.max_new_tokens,
                )
                check_finite(loss, "GRPO loss", iteration)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                check_finite(grad_norm, "GRPO gradient norm", iteration)  # a finite loss can have inf grads
                self.optimizer.step()
                stats["loss"].append(loss.item())
                for key in ("clip_fraction", "approx_kl", "kl_loss"):
                    stats[key].append(mb_stats[key])

        metrics = {key: float(np.mean(values)) for key, values in stats.items()}
        group_std = batch.rm_scores.view(-1, k).std(dim=1)  # (B / k,)
        kl_k3 = kl_penalty(batch.logprobs, batch.ref_logprobs, mask, "k3").sum(-1)  # (B,) at the rollout
        metrics.update(
            advantage_std=b_advantages.std().item(),
            group_reward_std=group_std.mean().item(),  # how much the groups tell apart
            zero_std_groups=(group_std == 0).float().mean().item(),  # groups that teach nothing
            grad_norm=grad_norm.item(),
            beta=beta,
            kl_objective=kl_k3.mean().item(),  # the KL term optimised (k3); the shared `kl` is the env's k1
        )
        return Iteration(batch, batch.num_tokens, metrics)


class DrGRPOAgent(GRPOAgent):
    """Dr. GRPO: `GRPOAgent` whose config defaults to `variant="dr_grpo"` (registered as `dr_grpo`)."""

    name = "dr_grpo"
    Config = DrGRPOConfig
