"""Online DPO: DPO's loss on pairs the current policy samples and the env's reward model ranks.

Guo et al. (2024, "Direct Language Model Alignment from Online AI Feedback", arXiv:2402.04792; TRL's
`OnlineDPOTrainer`) keep DPO's loss but not its fixed data set: offline DPO learns from responses of pi_ref
(or of whoever wrote the pairs), which the policy drifts away from, while here every pair is drawn from the
policy being trained and judged on the spot. Each iteration:

  1. Sample: two responses to each of `num_envs / 2` prompts from the current policy, through the KV-cached
     env (`text_env.rollout` with `np.repeat(prompts, 2)`), which scores them.
  2. Judge: the env's reward model (`rm_score`, the proxy the agent may see; never the gold score) picks the
     chosen and the rejected response of each pair; pairs it scores equal (identical responses, most often)
     carry no preference and are left out.
  3. Update: one Adam step on DPO's (or IPO's) loss against pi_ref on those pairs (`agents.dpo.dpo_loss`),
     with beta (IPO's tau) the env's `envs.beta`, as in `agents.dpo`.

The rollout's log-probs are reused where they are what the loss needs: `ref_logprobs` are pi_ref's through
the env's sampling options (the env scored them for its KL), so no reference forward runs here. The rollout's
`logprobs` are the policy's (q's, the distribution sampled) but detached, so the policy's are recomputed with
grad (`agents.reinforce.policy_logprobs`, one teacher-forced forward), through the same sampling options.

The shared metrics describe the rollout each update learns from (drawn before it), as REINFORCE's and
RAFT's do; `rm_margin` is the reward model's mean chosen-minus-rejected score of the pairs used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

import text_env
from agents.base import (
    Callback,
    PolicyAgentMixin,
    check_finite,
    check_rank_scores,
    load_policy,
    prepare_policy,
)
from agents.dpo import Loss, check_loss_settings, dpo_loss, pair_metrics
from agents.loop import Iteration, run_iterations
from agents.reinforce import policy_logprobs
from rlhf_base.lora import LoraConfig
from rlhf_base.maths import masked_sum
from rlhf_base.optim import adam
from rlhf_base.ranges import SEED, Range, check_ranges

__all__ = ["OnlineDPOAgent", "OnlineDPOConfig", "rank_pairs"]


@dataclass
class OnlineDPOConfig:
    """Online DPO / IPO; each iteration samples `num_envs / 2` pairs (the env's batch size: `env.num_envs`).

    beta (IPO's tau) is the env's (`envs.beta`), as in `agents.dpo.DPOConfig`.
    """

    RENAMED: ClassVar[dict[str, str]] = {"lr": "learning_rate"}
    RANGES: ClassVar[dict[str, Range]] = {
        "iterations": Range(ge=1),
        "label_smoothing": Range(ge=0, lt=0.5),
        "learning_rate": Range(gt=0),
        "max_grad_norm": Range(gt=0),
        "seed": SEED,
    }

    iterations: int = 300  # rollouts (and updates) per learn() call
    loss: Loss = "sigmoid"  # sigmoid (DPO) | ipo (IPO, with tau = envs.beta)
    label_smoothing: float = 0.0  # cDPO: assumed label-flip probability in [0, 0.5); sigmoid loss only
    learning_rate: float = 1e-4  # AdamW learning rate (constant)
    max_grad_norm: float = 1.0  # global gradient-norm clip
    seed: int = 0  # prompt draws and sampling
    # None: full fine-tuning; {r, alpha, target_modules}: a LoRA adapter trains and pi_ref is the policy
    # with the adapter off (`agents.base.prepare_policy`, `rlhf_base.lora.LoraConfig`)
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        check_ranges(self)
        check_loss_settings(self.loss, self.label_smoothing)


def rank_pairs(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the chosen and the rejected response of each consecutive pair, ties (no preference) left out.

    Args:
        scores: (2M,) one score per sample, ordered as `np.repeat(prompts, 2)`.

    Returns:
        `(chosen, rejected)`, each (M',) row indices into `scores`, M' <= M the pairs with unequal scores.
    """
    pairs = scores.view(-1, 2)  # (M, 2)
    decided = torch.nonzero(pairs[:, 0] != pairs[:, 1]).squeeze(1)  # (M',)
    first_wins = (pairs[decided, 0] > pairs[decided, 1]).long()
    return 2 * decided + 1 - first_wins, 2 * decided + first_wins


class OnlineDPOAgent(PolicyAgentMixin):
    """Online DPO on `envs.policy` against `envs.reference`, judged by the env's reward model.

    Metrics per iteration: the shared `METRIC_KEYS` of the iteration's rollout, plus `loss`, `grad_norm`,
    `pair_metrics`' `implied_accuracy`, `implied_margin`, `chosen_logratio`, `rejected_logratio` (before the
    step), `rm_margin` and `num_pairs` (pairs with a preference).
    """

    name = "online_dpo"
    Config = OnlineDPOConfig

    @staticmethod
    def check_num_envs(config: OnlineDPOConfig, num_envs: int) -> None:
        """The env's batch size (`agents.base.check_num_envs`: also run by `train` and the sweep's planner on
        the env's config, before any model loads)."""
        if num_envs % 2:
            raise ValueError(
                f"online_dpo samples two responses per prompt, so num_envs must be even, got {num_envs}"
            )

    def __init__(self, envs: text_env.TextGenVectorEnv, config: OnlineDPOConfig | None = None) -> None:
        self.check_num_envs(config, envs.num_envs)
        self.envs = envs
        self.config = config if config is not None else OnlineDPOConfig()
        self.history: list[dict[str, float]] = []
        policy = envs.policy
        if not any(p.requires_grad for p in policy.parameters()):
            raise ValueError("envs.policy has no trainable parameters; hand the env a trainable policy")
        prepare_policy(envs, self.config.lora, self.config.seed, self.name)
        self.device = next(policy.parameters()).device
        self.rng = np.random.default_rng(self.config.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        self.optimizer = self._make_optimizer()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.envs.policy.parameters() if p.requires_grad]
        return adam(params, lr=self.config.learning_rate)

    def learn(
        self, iterations: int | None = None, callback: Callback | None = None
    ) -> list[dict[str, float]]:
        """Sample pairs, rank them by the reward model, take a DPO step; repeat `iterations` times."""
        return run_iterations(self, self._iteration, iterations, callback)

    def _iteration(self, iteration: int) -> Iteration:
        """One rollout of two responses per prompt, ranked by `rm_score`, then one DPO/IPO step."""
        cfg, policy, beta = self.config, self.envs.policy, self.envs.beta
        policy.eval()  # no dropout: the sampled and the trained policy are one function
        num_prompts, total = self.envs.num_envs // 2, len(self.envs.prompts)
        prompts = self.rng.choice(total, size=num_prompts, replace=num_prompts > total)
        batch = text_env.rollout(self.envs, prompt_indices=np.repeat(prompts, 2), generator=self.generator)
        check_rank_scores(self.envs, batch.rm_scores, batch.responses, "online DPO ranks its pairs by it")
        chosen, rejected = rank_pairs(batch.rm_scores)  # (M',) rows each: the proxy judges, never the gold
        metrics = {"num_pairs": float(len(chosen))}
        if len(chosen) == 0:  # every pair tied: nothing to learn from this batch
            return Iteration(batch, batch.num_tokens, {**metrics, "loss": math.nan, "grad_norm": 0.0})
        mask = batch.response_mask  # (B, N)
        logprobs, _ = policy_logprobs(
            policy, batch, overhead_tokens=self.envs.speed.overhead_tokens, sampling=self.envs.sampling
        )  # (B, N) log q, with grad
        logps = masked_sum(logprobs, mask, dim=-1)  # (B,)
        ref_logps = masked_sum(batch.ref_logprobs, mask, dim=-1)  # (B,) the env's, reused
        loss, _ = dpo_loss(
            logps[chosen], logps[rejected], ref_logps[chosen], ref_logps[rejected],
            beta, cfg.loss, cfg.label_smoothing,
        )  # fmt: skip
        check_finite(loss, f"online {cfg.loss} DPO loss", iteration)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        check_finite(grad_norm, "online DPO gradient norm", iteration)
        self.optimizer.step()
        logratios = logps.detach() - ref_logps  # (B,)
        metrics.update(
            loss=loss.item(),
            grad_norm=grad_norm.item(),
            rm_margin=(batch.rm_scores[chosen] - batch.rm_scores[rejected]).mean().item(),
            **pair_metrics(logratios[chosen], logratios[rejected], beta),
        )
        return Iteration(batch, batch.num_tokens, metrics)

    def load(self, path: str | Path) -> None:
        """Load policy weights saved by `save` into `envs.policy`; resets the optimiser."""
        load_policy(self.envs.policy, path)
        self.optimizer = self._make_optimizer()
