"""ReMax: REINFORCE whose baseline is the reward of the policy's own greedy response to the same prompt.

Li et al. (2023, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large
Language Models", arXiv:2310.10505, Algorithm 1): for each prompt x, sample one response y ~ pi(.|x) and
decode one greedily, y_bar = argmax, then step along

    grad J = E[(R(x, y) - R(x, y_bar)) * grad sum_t log pi(y_t | x, y_<t)]

The greedy response does not depend on the sampled one, so the baseline adds no bias; it tracks each
prompt's difficulty as a critic would (the paper's argument for its lower variance), at the cost of one extra
(greedy) rollout per iteration and no value model.

* **R is the env's reward** for both: `rm_score - beta * kl`, k1 in the reward (the env's `beta`), so the
  update climbs `E[rm_score] - beta * KL(pi || pi_ref)` as REINFORCE's default does.
* **The greedy response** is the rollout with `top_k=1` (`text_env.rollout`'s own tweak: the argmax of the
  env's distribution q, its temperature and EOS ban included). Its tokens are not sampled from q, so the
  log-probs the sampler records for them are those of the one-hot top-1 distribution (0), and the env's
  `kl` of that rollout is the KL of a point mass, not of the policy. The baseline's KL is therefore
  recomputed: `log q(y_bar_t)` by one no-grad teacher-forced forward of the policy through the env's sampling
  options, against the env's `ref_logprobs`, so `R(x, y_bar) = rm_score - beta * sum_t (log q - log pi_ref)`
  is the same function of a response as the sampled one's reward. The greedy responses and their log-probs
  serve only this baseline; they never enter the loss.
* **The cost** counted in `tokens` is both rollouts' tokens.
* **The loss** is `agents.reinforce`'s (`reinforce_loss`; with `epochs > 1`, `clipped_reinforce_loss`).

Logged: the shared metrics of the sampled responses, and the baseline's `greedy_reward` (= `baseline`),
`greedy_rm_score`, `greedy_kl` and `greedy_length`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import text_env
from agents.base import (
    ENV_SETTINGS,
    Callback,
    PolicyAgentMixin,
    check_finite,
)
from agents.loop import Iteration, run_iterations
from agents.reinforce import clipped_reinforce_loss, group_prompt_indices, policy_logprobs, reinforce_loss
from rlhf_base.lora import LoraConfig
from rlhf_base.maths import masked_sum
from rlhf_base.ranges import SEED, Range, check_ranges

__all__ = ["ReMaxAgent", "ReMaxConfig", "greedy_reward"]


@dataclass
class ReMaxConfig:
    """ReMax's settings; the defaults suit the default task (tiny-reviews, num_envs 64 prompts)."""

    RENAMED: ClassVar[dict[str, str]] = {"lr": "learning_rate", "updates_per_batch": "epochs"}
    MOVED_KEYS: ClassVar[dict[str, str]] = ENV_SETTINGS
    RANGES: ClassVar[dict[str, Range]] = {
        "iterations": Range(ge=1),
        "learning_rate": Range(gt=0),
        "weight_decay": Range(ge=0),
        "adam_eps": Range(gt=0),
        "max_grad_norm": Range(gt=0),
        "epochs": Range(ge=1),
        "clip_range": Range(gt=0),
        "seed": SEED,
    }

    iterations: int = 300  # rollouts per learn() call: each costs a sampled and a greedy rollout
    learning_rate: float = 3e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    adam_eps: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # global gradient-norm clip
    token_mean: bool = False  # as REINFORCE's: False, -mean_i(A_i * sum_t log pi); True, a token mean
    epochs: int = 1  # gradient steps per rollout (full batch); > 1: the clipped surrogate, as REINFORCE's
    clip_range: float = 0.2  # ratio clip, only used when epochs > 1
    seed: int = 0  # seeds the prompt draws, the sampling generator and torch
    # None: full fine-tuning; {r, alpha, target_modules}: a LoRA adapter trains and pi_ref is the policy
    # with the adapter off (`agents.base.prepare_policy`, `rlhf_base.lora.LoraConfig`)
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        check_ranges(self)


def greedy_reward(
    rm_scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """The env's reward of a response, `rm_score - beta * sum_t (log q - log pi_ref)`: ReMax's baseline.

    Args:
        rm_scores: (B,) reward-model scores of the greedy responses.
        logprobs: (B, N) log q of their tokens under the policy (teacher-forced, not the sampler's one-hot).
        ref_logprobs: (B, N) the same under pi_ref (the env's).
        mask: (B, N) 1 on response tokens.
        beta: the env's KL coefficient.

    Returns:
        (B,) baselines b; ReMax's advantage is `R - b` with R the sampled response's env reward.
    """
    return rm_scores - beta * masked_sum(logprobs - ref_logprobs, mask, dim=-1)


class ReMaxAgent(PolicyAgentMixin):
    """ReMax on `envs.policy`: num_envs distinct prompts per rollout, one sample and one greedy response each.

    Args:
        envs: the vector env; `envs.num_envs` prompts per iteration.
        config: a `ReMaxConfig` (None: the defaults).
    """

    name = "remax"
    Config = ReMaxConfig

    def __init__(self, envs: text_env.TextGenVectorEnv, config: ReMaxConfig | None = None) -> None:
        config = ReMaxConfig() if config is None else config
        self._start_training(envs, config, shuffle=False)  # one full-batch step: no minibatch order

    def learn(
        self, iterations: int | None = None, callback: Callback | None = None
    ) -> list[dict[str, float]]:
        """Roll out sampled and greedy responses, step along (R - R_greedy) * grad log pi; repeat."""
        return run_iterations(self, self._iteration, iterations, callback)

    def _iteration(self, iteration: int) -> Iteration:
        """One sampled and one greedy rollout of the same prompts, then `epochs` gradient steps."""
        cfg, envs, policy = self.config, self.envs, self.envs.policy
        policy.eval()  # no dropout: the sampled and the trained policy must be the same function
        overhead = envs.speed.overhead_tokens
        prompts = group_prompt_indices(self.rng, len(envs.prompts), envs.num_envs, 1)
        batch = text_env.rollout(envs, prompt_indices=prompts, generator=self.generator)
        greedy = text_env.rollout(envs, prompt_indices=prompts, top_k=1, generator=self.generator)
        with torch.no_grad():  # log q of the greedy tokens: the sampler recorded the one-hot's (0)
            greedy_logprobs, _ = policy_logprobs(policy, greedy, False, overhead, envs.sampling)
        b_baselines = greedy_reward(
            greedy.rm_scores, greedy_logprobs, greedy.ref_logprobs, greedy.response_mask, envs.beta
        )  # (B,)
        b_advantages = batch.rewards - b_baselines  # (B,) the env's reward: rm_score - beta * kl (k1)
        mask = batch.response_mask  # (B, N)

        for _ in range(cfg.epochs):
            logprobs, _ = policy_logprobs(policy, batch, False, overhead, envs.sampling)
            if cfg.epochs == 1:
                loss = reinforce_loss(logprobs, b_advantages, mask, cfg.token_mean)
            else:  # off-policy after the first step: clip the ratio to the rollout policy (PPO)
                loss = clipped_reinforce_loss(
                    logprobs, batch.logprobs, b_advantages, mask, cfg.clip_range, cfg.token_mean
                )
            check_finite(loss, "ReMax loss", iteration)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            check_finite(grad_norm, "ReMax gradient norm", iteration)  # a finite loss can have inf grads
            self.optimizer.step()

        greedy_kl = masked_sum(greedy_logprobs - greedy.ref_logprobs, greedy.response_mask, dim=-1)  # (B,)
        metrics = {
            "loss": loss.item(),
            "advantage_std": b_advantages.std().item() if len(b_advantages) > 1 else 0.0,
            "baseline": b_baselines.mean().item(),
            "greedy_reward": b_baselines.mean().item(),
            "greedy_rm_score": greedy.rm_scores.mean().item(),
            "greedy_kl": greedy_kl.mean().item(),
            "greedy_length": greedy.lengths.mean().item(),
            "grad_norm": grad_norm.item(),
            "kl_objective": batch.kl.mean().item(),  # k1 in the reward: the env's own kl
        }
        return Iteration(batch, batch.num_tokens + greedy.num_tokens, metrics)
