"""REINFORCE++: PPO's token-level machinery without the critic, advantages whitened over the global batch.

Hu (2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models",
arXiv:2501.03262, section 3): keep what stabilises PPO (a per-token KL penalty in the reward, the clipped
surrogate, minibatch updates) and drop the value model. With k1 per token,

    r_t  = -beta * (log q(y_t) - log pi_ref(y_t))  + [t = last] * rm_score       (agents.ppo.token_rewards)
    G_t  = sum_{s >= t} r_s                                                     (gamma 1: reward-to-go)
    A_t  = (G_t - mean(G)) / std(G)        over every valid token of the whole rollout ("global batch")
    loss = token mean of max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_range, 1 + clip_range))

over `epochs` passes of shuffled minibatches of rows. The whitening replaces a baseline: its mean is the
batch's, not each prompt's (unlike RLOO or GRPO), which the paper argues is less prone to overfit easy
prompts; one sample per prompt suffices. The sums of the rewards are the env's: `G_0 = rm_score - beta *
kl` of the response, so the update climbs `E[rm_score] - beta * KL(pi || pi_ref)` (k1 in the reward, the
RLHF objective), and beta is the env's (`envs.beta`).

This is an option combination of `ppo`: PPO with `gamma=1, gae_lambda=1, whiten_advantages=True`, k1
per token in the reward, and a critic that stays 0 (`vf_coef=0`: its zero-initialised head gets no gradient)
computes these very advantages (GAE with V = 0 and lambda = 1 is the reward-to-go); `tests/test_reinforce_pp.py`
checks that equality. This file runs it without the value head: no hidden states, no value loss, no
`value_head.safetensors`. The paper's optional reward normalisation and clipping are not implemented.
Logged: the shared metrics, `policy_loss`, `clip_fraction`, `approx_kl`, `return_std` (the returns' spread
before whitening) and `kl_objective` (the env's k1, the KL term optimised).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

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
from agents.ppo import token_rewards
from agents.reinforce import group_prompt_indices, policy_logprobs
from rlhf_base.lora import LoraConfig
from rlhf_base.maths import discounted_returns, kl_penalty, masked_whiten, ppo_policy_loss
from rlhf_base.ranges import SEED, Range, check_ranges

__all__ = ["ReinforcePPAgent", "ReinforcePPConfig", "reinforce_pp_advantages"]


@dataclass
class ReinforcePPConfig:
    """REINFORCE++'s settings; the defaults suit the default task (tiny-reviews, num_envs 64 prompts)."""

    RENAMED: ClassVar[dict[str, str]] = {"lr": "learning_rate", "ppo_epochs": "epochs"}
    MOVED_KEYS: ClassVar[dict[str, str]] = ENV_SETTINGS
    RANGES: ClassVar[dict[str, Range]] = {
        "iterations": Range(ge=1),
        "learning_rate": Range(gt=0),
        "weight_decay": Range(ge=0),
        "adam_eps": Range(gt=0),
        "max_grad_norm": Range(gt=0),
        "epochs": Range(ge=1),
        "num_minibatches": Range(ge=1),
        "clip_range": Range(gt=0),
        "seed": SEED,
    }

    iterations: int = 450  # rollouts per learn() call, as REINFORCE's
    learning_rate: float = 3e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    adam_eps: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # global gradient-norm clip
    epochs: int = 1  # passes over each rollout (OpenRLHF's default for REINFORCE++)
    num_minibatches: int = 4  # minibatches of rows per pass (shuffled), one gradient step each
    clip_range: float = 0.2  # epsilon of the clipped surrogate
    seed: int = 0  # seeds the prompt draws, the sampling generator, minibatch order and torch
    # None: full fine-tuning; {r, alpha, target_modules}: a LoRA adapter trains and pi_ref is the policy
    # with the adapter off (`agents.base.prepare_policy`, `rlhf_base.lora.LoraConfig`)
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        check_ranges(self)


def reinforce_pp_advantages(
    rm_scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++'s token advantages: reward-to-go of k1-per-token rewards, whitened over the batch.

    Args:
        rm_scores: (B,) reward-model scores, paid at each response's last token.
        logprobs: (B, N) log q of the sampled tokens (the rollout's).
        ref_logprobs: (B, N) the same under pi_ref.
        mask: (B, N) 1 on response tokens.
        beta: the env's KL coefficient.

    Returns:
        `(advantages, returns)`, each (B, N) and 0 at padding: `returns[:, 0]` is the env's reward
        `rm_score - beta * kl`; `advantages` are the returns whitened over every valid token.
    """
    kl = kl_penalty(logprobs, ref_logprobs, mask, "k1", "token")  # (B, N) detached
    rewards = token_rewards(rm_scores, kl, mask, beta, "per_token")  # (B, N)
    returns = discounted_returns(rewards, mask, gamma=1.0)  # (B, N)
    return masked_whiten(returns, mask), returns


class ReinforcePPAgent(PolicyAgentMixin):
    """REINFORCE++ on `envs.policy`: num_envs distinct prompts per rollout, one sample each.

    Args:
        envs: the vector env; `envs.num_envs` prompts per iteration (at least 2, to whiten).
        config: a `ReinforcePPConfig` (None: the defaults).
    """

    name = "reinforce_pp"
    Config = ReinforcePPConfig

    def __init__(self, envs: text_env.TextGenVectorEnv, config: ReinforcePPConfig | None = None) -> None:
        config = ReinforcePPConfig() if config is None else config
        if envs.num_envs < 2:
            raise ValueError("reinforce_pp needs num_envs >= 2: it whitens the advantages over the batch")
        self._start_training(envs, config)

    def learn(
        self, iterations: int | None = None, callback: Callback | None = None
    ) -> list[dict[str, float]]:
        """Roll out, whiten the token returns, take `epochs` x minibatch clipped steps; repeat."""
        return run_iterations(self, self._iteration, iterations, callback)

    def _iteration(self, iteration: int) -> Iteration:
        """One rollout, its token advantages, then `epochs` passes of minibatch updates."""
        cfg, envs, policy = self.config, self.envs, self.envs.policy
        policy.eval()  # no dropout: the sampled and the trained policy must be the same function
        num_rows, overhead = envs.num_envs, envs.speed.overhead_tokens
        prompts = group_prompt_indices(self.rng, len(envs.prompts), num_rows, 1)
        batch = text_env.rollout(envs, prompt_indices=prompts, generator=self.generator)
        mask = batch.response_mask  # (B, N)
        b_advantages, b_returns = reinforce_pp_advantages(
            batch.rm_scores, batch.logprobs, batch.ref_logprobs, mask, envs.beta
        )  # (B, N) each
        with torch.no_grad():  # the rollout policy's log q, teacher-forced: the first step's ratio is 1
            b_old_logprobs, _ = policy_logprobs(policy, batch, False, overhead, envs.sampling)

        minibatch_size = max(1, math.ceil(num_rows / cfg.num_minibatches))
        stats: dict[str, list[float]] = {key: [] for key in ("policy_loss", "clip_fraction", "approx_kl")}
        for _ in range(cfg.epochs):
            order = torch.randperm(num_rows, generator=self.shuffle_generator)
            for lo in range(0, num_rows, minibatch_size):
                mb = order[lo : lo + minibatch_size]
                logprobs, _ = policy_logprobs(policy, take_rows(batch, mb), False, overhead, envs.sampling)
                loss, mb_stats = ppo_policy_loss(
                    logprobs, b_old_logprobs[mb], b_advantages[mb], mask[mb], cfg.clip_range
                )
                check_finite(loss, "REINFORCE++ loss", iteration)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                check_finite(grad_norm, "REINFORCE++ gradient norm", iteration)
                self.optimizer.step()
                stats["policy_loss"].append(loss.item())
                stats["clip_fraction"].append(mb_stats["clip_fraction"])
                stats["approx_kl"].append(mb_stats["approx_kl"])

        metrics = {key: float(np.mean(values)) for key, values in stats.items()}
        metrics.update(
            return_std=b_returns[mask.bool()].std().item(),
            grad_norm=grad_norm.item(),
            kl_objective=batch.kl.mean().item(),  # k1 per token in the reward: the env's own kl
        )
        return Iteration(batch, batch.num_tokens, metrics)
