"""REINFORCE on the sequence reward, with a moving-average, leave-one-out (RLOO) or whitening baseline.

An RLHF episode pays one terminal reward per response, `R = rm_score - beta * kl`, so the plain
score-function estimator (Williams 1992) needs no critic and no per-token credit assignment:

    grad J = E[(R - b) * grad sum_t log pi(y_t | x, y_<t)]

The KL term (`kl_estimator` x `kl_in` x `kl_granularity`, as PPO's; `rlhf_base.maths.kl_penalty` derives
what each combination optimises, `tests/test_kl_objectives.py` checks it exactly). By default (k1 in the
reward) R is the env's own reward, `rm_score - beta * sum_t (log pi - log pi_ref)`, and the update climbs
`E[rm_score] - beta * KL(pi || pi_ref)`, whose optimum is `pi_ref * exp(rm_score / beta) / Z`. Otherwise:

* `kl_in="reward"`: `R = rm_score - beta * k`, with `k` the chosen estimator of the sampled response, per
  token and summed ("token") or of its summed log-ratio ("sequence"); k1 is the default either way, k2
  and k3 are biased (k3 even pays the policy for dropping low-reward responses to probability 0).
* `kl_in="loss"`: `R = rm_score`, and `beta * k`, differentiated through the current log-probs and
  averaged like the policy loss, is added to the loss. k2 at granularity "sequence" climbs the same
  objective as the default (on-policy); per token it is Tang & Munos' partial, myopic gradient; k1 adds
  nothing (`E[grad log pi] = 0`); k3 climbs `E[rm_score] - beta * KL(pi_ref || pi)`, the forward KL
  (GRPO's term). A "whiten" baseline rescales the advantages but not the loss term, so there the
  effective coefficient is `beta` over the rewards' standard deviation.

The logged `kl` is always the env's k1 of the sampled responses; `kl_objective` is the KL term optimised.

Ahmadian et al. (2024, "Back to Basics", arXiv:2402.14740) show that this, with the leave-one-out baseline
of Kool et al. (2019, "Buy 4 REINFORCE samples, get a baseline for free!"), matches or beats PPO for RLHF at
a fraction of its cost: one teacher-forced forward and backward of the policy per batch, no value model.

Baselines (`ReinforceConfig.baseline`):
    * `moving_average`: b = an exponential moving average of past batches' mean reward (Williams 1992).
    * `rloo`: k = `samples_per_prompt` samples per prompt; each sample's b is the mean reward of the
      other k - 1 (unbiased, and it tracks each prompt's difficulty as a critic would).
    * `whiten`: A = (R - mean(R)) / std(R) over the batch, as REINFORCE++ (Hu 2025, arXiv:2501.03262).

The update is on-policy: one gradient step per rollout by default. With `epochs > 1` the later
steps are off-policy, so the loss becomes PPO's clipped surrogate with sequence advantages on every token
(the objective TRL's RLOOTrainer optimises); its first step has exactly the plain REINFORCE gradient.

Under torchrun (issue 15; `rlhf_base.distributed`) each rank rolls out `num_envs` of the `num_envs * W`
responses, with its own prompt and sampling streams, and the gradients are averaged over ranks before the
clip. The batch-wide baselines ("whiten", "moving_average") and the token means (`token_mean`, the entropy
bonus) are taken over all ranks' rows, so an update is the one a single process makes on the global batch;
RLOO's leave-one-out stays within a prompt group, which a rank holds whole (its `num_envs` must be a
multiple of `samples_per_prompt`). Every rank rolls out the same number of rows, so a mean over a rank's
sequences, averaged over ranks, is the global one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from transformers import PreTrainedModel

import text_env
from agents.base import (
    Callback,
    act_with_policy,
    check_finite,
    check_kl_settings,
    env_state,
    evaluate_policy,
    load_env_state,
    load_policy,
    load_policy_state,
    policy_state,
    prepare_policy,
    save_policy,
)
from agents.loop import Iteration, run_iterations
from rlhf_base.distributed import (
    average_gradients,
    broadcast_parameters,
    global_masked_var,
    global_masked_whiten,
    is_distributed,
    mean_over_ranks,
    rank_seed,
    token_shares,
    world_size,
)
from rlhf_base.lm import by_response_length, teacher_forced
from rlhf_base.lora import LoraConfig
from rlhf_base.maths import (
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    ppo_policy_loss,
    rloo_baseline,
)
from rlhf_base.optim import adam
from rlhf_base.ranges import SEED, Range, check_ranges
from text_env.sampler import Rollout
from text_env.sampling import SamplingOptions

__all__ = [
    "BASELINES",
    "ReinforceAgent",
    "ReinforceConfig",
    "advantages",
    "clipped_reinforce_loss",
    "group_prompt_indices",
    "policy_logprobs",
    "reinforce_loss",
]

Baseline = Literal["moving_average", "rloo", "whiten"]
BASELINES: tuple[str, ...] = ("moving_average", "rloo", "whiten")


@dataclass
class ReinforceConfig:
    """REINFORCE / RLOO hyperparameters; the defaults suit the default task (tiny-reviews, num_envs 64).

    Knobs several configs share have one name in all of them (`learning_rate`, `samples_per_prompt`,
    `epochs`, SB3's `ent_coef`); a YAML file or override with an old name fails naming the new one.
    """

    RENAMED: ClassVar[dict[str, str]] = {
        "lr": "learning_rate",
        "k": "samples_per_prompt",
        "entropy_coef": "ent_coef",
        "updates_per_batch": "epochs",
    }
    RANGES: ClassVar[dict[str, Range]] = {
        "iterations": Range(ge=1),
        "samples_per_prompt": Range(ge=1),  # and >= 2 with baseline "rloo" (__post_init__)
        "ema_decay": Range(ge=0, le=1),
        "learning_rate": Range(gt=0),
        "weight_decay": Range(ge=0),
        "adam_eps": Range(gt=0),
        "max_grad_norm": Range(gt=0),  # a negative norm would flip the gradient (torch scales by it)
        "ent_coef": Range(ge=0),
        "epochs": Range(ge=1),
        "clip_range": Range(gt=0),
        "seed": SEED,
    }

    iterations: int = 450  # rollouts (and updates) per learn() call: ~5 min on one CPU core (default task)
    baseline: Baseline = "rloo"  # moving_average | rloo | whiten (see the module docstring)
    samples_per_prompt: int = 4  # k of RLOO: baseline "rloo" only (>= 2, must divide num_envs); others: 1
    ema_decay: float = 0.9  # moving_average baseline: b <- decay * b + (1 - decay) * mean(R)
    learning_rate: float = 3e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay (RLHF fine-tuning usually uses none)
    adam_eps: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # global gradient-norm clip
    token_mean: bool = False  # False: loss = -mean_seq(A * sum_t log pi); True: average over all tokens
    ent_coef: float = 0.0  # entropy bonus (mean per-token entropy of the policy) added to the objective
    epochs: int = 1  # passes over each rollout, a full-batch gradient step each; > 1: clipped surrogate
    clip_range: float = 0.2  # ratio clip of the surrogate, only used when epochs > 1
    seed: int = 0  # seeds the prompt draw, the sampling generator and torch
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"  # the KL term's estimator (module doc: what each climbs)
    kl_in: Literal["reward", "loss"] = "reward"  # KL term paid in the sequence reward, or added to the loss
    kl_granularity: Literal["token", "sequence"] = "token"  # estimator per token, summed, or per response
    # None: full fine-tuning; {r, alpha, target_modules}: a LoRA adapter trains and pi_ref is the policy
    # with the adapter off (`agents.base.prepare_policy`, `rlhf_base.lora.LoraConfig`)
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        check_ranges(self)
        check_kl_settings(self.kl_estimator, self.kl_in, self.kl_granularity)
        if self.baseline == "rloo" and self.samples_per_prompt < 2:
            raise ValueError(
                f"baseline 'rloo' needs samples_per_prompt >= 2 (each sample's baseline is the mean of the "
                f"others of its prompt), got {self.samples_per_prompt}"
            )


# --------------------------------------------------------------------------------------------------------
# Pieces: advantages, the loss, the teacher-forced forward
# --------------------------------------------------------------------------------------------------------
def advantages(
    rewards: torch.Tensor,
    baseline: str,
    k: int = 1,
    ema_state: float | None = None,
    ema_decay: float = 0.9,
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """Sequence advantages A = R - b for the chosen baseline (a pure function, tested by hand).

    Args:
        rewards: (B,) terminal rewards; for "rloo" laid out as k consecutive samples per prompt.
        baseline: one of BASELINES.
        k: samples per prompt ("rloo" only).
        ema_state: the moving average so far (None before the first batch), "moving_average" only.
        ema_decay: weight of the old average in the update.

    Returns:
        `(advantages (B,), baselines (B,), new ema_state)`. The moving average subtracts the average of
        *past* batches, so b does not depend on this batch's actions (no bias); the first batch, with no
        past, uses its own mean. For "whiten", `baselines` holds the batch mean. Under torchrun, `rewards`
        is this rank's shard, and the batch's mean and standard deviation are those of every rank's rows.
    """
    if baseline == "rloo":
        b = rloo_baseline(rewards, k)  # (B,)
        return rewards - b, b, ema_state
    if baseline == "moving_average":
        batch_mean = mean_over_ranks({"mean": rewards.mean().item()}, weight=len(rewards))["mean"]
        past = batch_mean if ema_state is None else ema_state
        b = torch.full_like(rewards, past)  # (B,)
        return rewards - b, b, ema_decay * past + (1.0 - ema_decay) * batch_mean
    if baseline == "whiten":
        ones = torch.ones_like(rewards)
        batch_mean = mean_over_ranks({"mean": rewards.mean().item()}, weight=len(rewards))["mean"]
        return global_masked_whiten(rewards, ones), torch.full_like(rewards, batch_mean), ema_state
    raise ValueError(f"unknown baseline {baseline!r}; valid: {list(BASELINES)}")


def reinforce_loss(
    logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, token_mean: bool = False
) -> torch.Tensor:
    """The REINFORCE loss whose gradient is -(R - b) * grad log pi(y | x), averaged over the batch.

    Args:
        logprobs: (B, N) log pi of the response tokens, with grad.
        advantages: (B,) sequence advantages (no grad).
        mask: (B, N) 1 on response tokens; padding never contributes.
        token_mean: False: `-mean_i(A_i * sum_t log pi_it)`, the estimator itself (long answers weigh more);
            True: `-sum_it(A_i * log pi_it) / #tokens`, every token weighs the same (as in PPO losses).

    Returns:
        The scalar loss.
    """
    if token_mean:
        return -masked_mean(advantages[:, None] * logprobs, mask)
    return -(advantages * masked_sum(logprobs, mask, dim=-1)).mean()


def clipped_reinforce_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    token_mean: bool = False,
) -> torch.Tensor:
    """PPO's clipped surrogate with the sequence advantage on every token, for `epochs > 1`.

    Scaled like `reinforce_loss`, so that at the rollout policy (ratio 1) both have the same gradient: the
    first step is plain REINFORCE, and the clip only acts on the later, off-policy steps.

    Args:
        logprobs: (B, N) log pi of the response tokens, with grad.
        old_logprobs: (B, N) the same under the rollout policy (`Rollout.logprobs`).
        advantages: (B,) sequence advantages.
        mask: (B, N) 1 on response tokens.
        clip_range: epsilon of the ratio clip.
        token_mean: as in `reinforce_loss`.
    """
    token_advantages = advantages[:, None].expand_as(mask)  # (B, N)
    loss, _ = ppo_policy_loss(logprobs, old_logprobs, token_advantages, mask, clip_range)  # a token mean
    return loss if token_mean else loss * mask.sum() / mask.shape[0]  # the token sum per sequence, averaged


def group_prompt_indices(rng: np.random.Generator, num_prompts: int, num_envs: int, k: int) -> np.ndarray:
    """(num_envs,) prompt ids for a rollout of groups: num_envs / k distinct prompts, k consecutive copies each.

    The layout `rloo_baseline` and GRPO's group statistics assume (sample j of group i at row i * k + j);
    prompts repeat across groups only when there are fewer prompts than groups.
    """
    groups = num_envs // k
    return np.repeat(rng.choice(num_prompts, size=groups, replace=groups > num_prompts), k)


def policy_logprobs(
    policy: PreTrainedModel,
    batch: Rollout,
    with_entropy: bool = False,
    overhead_tokens: float | None = None,
    sampling: SamplingOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One teacher-forced forward over the rollout: log q of the response tokens (B, N), and q's entropy.

    As `rlhf_base.lm.response_logprobs`, plus the per-token entropy from the same logits when asked.
    q is the policy through `sampling` (the env's `envs.sampling`, which the rollout drew from: the score
    function must be that of the sampling distribution); None: the policy itself. Rows run in length
    groups (`by_response_length`, with `overhead_tokens`: the env's `speed.overhead_tokens`), so the update
    computes little padding.
    """

    def forward(ids: torch.Tensor, mask: torch.Tensor, start: int) -> tuple[torch.Tensor, ...]:
        _, logits = teacher_forced(policy, ids, mask, start)  # (b, n, V)
        if sampling is not None:
            logits = sampling.logits(logits)  # q's logits (the same tensor for the default options)
        logprobs = logprobs_from_logits(logits, ids[:, start:])  # (b, n)
        return (logprobs, entropy_from_logits(logits)) if with_entropy else (logprobs,)

    parts = by_response_length(
        forward, batch.input_ids, batch.attention_mask, batch.response_start, overhead_tokens
    )
    return parts[0], parts[1] if with_entropy else None


# --------------------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------------------
class ReinforceAgent:
    """REINFORCE with a baseline (RLOO by default) on `envs.policy`, rolled out KV-cached through the env.

    Args:
        envs: the vector env; `envs.num_envs` sequences per rollout (`num_envs / samples_per_prompt`
            prompts with "rloo").
        config: a `ReinforceConfig`.
    """

    name = "reinforce"
    Config = ReinforceConfig
    distributed = True  # trains over the ranks of a torchrun launch (see the module docstring)

    @staticmethod
    def check_num_envs(config: ReinforceConfig, num_envs: int) -> None:
        """The env's batch size against `config` (`agents.base.check_num_envs`: also run by `train` and the
        sweep's planner on the env's config, before any model loads)."""
        k = config.samples_per_prompt
        if config.baseline == "rloo" and num_envs % k:
            each = f" (each of the {world_size()} processes' share)" if is_distributed() else ""
            raise ValueError(  # under torchrun a rank holds whole groups, so the global batch is W * k * m
                f"num_envs={num_envs}{each} is not divisible by samples_per_prompt={k}: RLOO fills each "
                f"rollout with {k} samples of num_envs / {k} prompts; choose num_envs a multiple of "
                f"{k * world_size()}"
            )
        if config.baseline == "whiten" and num_envs < 2:
            raise ValueError("baseline 'whiten' needs num_envs >= 2 to estimate a standard deviation")

    def __init__(self, envs: text_env.TextGenVectorEnv, config: ReinforceConfig) -> None:
        if config.baseline not in BASELINES:
            raise ValueError(f"unknown baseline {config.baseline!r}; valid: {list(BASELINES)}")
        self.check_num_envs(config, envs.num_envs)
        self.envs, self.config = envs, config
        self.history: list[dict[str, float]] = []
        torch.manual_seed(config.seed)
        params = prepare_policy(envs, config.lora, config.seed, self.name)  # LoRA: the adapter's alone
        self.device = next(envs.policy.parameters()).device
        broadcast_parameters(envs.policy.parameters())  # under torchrun: every rank starts from rank 0's
        seed = rank_seed(config.seed)  # config.seed on one process; under torchrun, each rank's own streams
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.rng = np.random.default_rng(seed)  # prompt draws
        self.optimizer = adam(
            params,
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
            eps=config.adam_eps,
        )
        self.ema_state: float | None = None  # the moving-average baseline so far

    @property
    def samples_per_prompt(self) -> int:
        return self.config.samples_per_prompt if self.config.baseline == "rloo" else 1

    def _prompt_indices(self) -> np.ndarray:
        """(B,) prompts of the next rollout: num_envs / k distinct prompts, k consecutive copies each."""
        return group_prompt_indices(
            self.rng, len(self.envs.prompts), self.envs.num_envs, self.samples_per_prompt
        )

    def learn(
        self, iterations: int | None = None, callback: Callback | None = None
    ) -> list[dict[str, float]]:
        """Roll out, compute advantages, take `epochs` gradient steps; repeat `iterations` times."""
        return run_iterations(self, self._iteration, iterations, callback)

    def _iteration(self, iteration: int) -> Iteration:
        """One rollout of B responses, their advantages, then `epochs` gradient steps."""
        self.envs.policy.eval()  # no dropout: the sampled and the trained policy must be the same function
        batch = text_env.rollout(self.envs, prompt_indices=self._prompt_indices(), generator=self.generator)
        return Iteration(batch, batch.num_tokens, self._update(batch, iteration))

    def _update(self, batch: Rollout, iteration: int) -> dict[str, float]:
        """Learn from one rollout: its advantages, then `epochs` gradient steps; return the metrics."""
        cfg, policy = self.config, self.envs.policy
        mask = batch.response_mask  # (B, N)
        kl_settings = (cfg.kl_estimator, cfg.kl_granularity)
        kl = kl_penalty(batch.logprobs, batch.ref_logprobs, mask, *kl_settings).sum(-1)  # (B,)
        if cfg.kl_in == "loss":
            rewards = batch.rm_scores  # the KL term goes to the loss below
        elif cfg.kl_estimator == "k1":
            rewards = batch.rewards  # the env's rm_score - beta * kl: k1, the same at either granularity
        else:
            rewards = batch.rm_scores - self.envs.beta * kl
        b_advantages, b_baselines, self.ema_state = advantages(
            rewards, cfg.baseline, cfg.samples_per_prompt, self.ema_state, cfg.ema_decay
        )  # (B,), (B,)
        # A mean over this rank's tokens times its share (1.0 on one process) averages, over ranks, to the
        # mean over all ranks' tokens (rlhf_base.distributed); a mean over its rows needs none.
        token_share = token_shares([mask.sum()])[0]
        loss_share = token_share if cfg.token_mean else 1.0

        for _ in range(cfg.epochs):
            logprobs, entropy = policy_logprobs(
                policy, batch, cfg.ent_coef > 0, self.envs.speed.overhead_tokens, self.envs.sampling
            )
            if cfg.epochs == 1:
                loss = reinforce_loss(logprobs, b_advantages, mask, cfg.token_mean)
            else:  # off-policy after the first step: clip the ratio to the rollout policy (PPO)
                loss = clipped_reinforce_loss(
                    logprobs, batch.logprobs, b_advantages, mask, cfg.clip_range, cfg.token_mean
                )
            loss = loss * loss_share
            if entropy is not None:
                loss = loss - cfg.ent_coef * masked_mean(entropy, mask) * token_share
            if cfg.kl_in == "loss":  # beta * the KL term, averaged as reinforce_loss averages
                kl_term = kl_penalty(logprobs, batch.ref_logprobs, mask, *kl_settings, "loss")  # (B, N)
                kl_loss = (
                    masked_mean(kl_term, mask) if cfg.token_mean else masked_sum(kl_term, mask, -1).mean()
                )
                loss = loss + self.envs.beta * kl_loss * loss_share
            check_finite(loss, "policy loss", iteration)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(policy.parameters())  # the mean over ranks (nothing on one process)
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            check_finite(
                grad_norm, "policy gradient norm", iteration
            )  # a finite loss can still have inf grads
            self.optimizer.step()

        advantage_std = b_advantages.std().item() if len(b_advantages) > 1 else 0.0
        if is_distributed():  # over every rank's rows
            advantage_std = global_masked_var(b_advantages, torch.ones_like(b_advantages)).sqrt().item()
        # The means over ranks: of this rank's share of the loss (the global loss), of its rows' means.
        means = mean_over_ranks(
            {"loss": loss.item(), "baseline": b_baselines.mean().item(), "kl_objective": kl.mean().item()}
        )
        metrics = {
            "loss": means["loss"],
            "advantage_std": advantage_std,
            "baseline": means["baseline"],
            "grad_norm": grad_norm.item(),  # of the gradient averaged over ranks: the same on every rank
            "kl_objective": means["kl_objective"],  # the KL term optimised; the shared `kl` is the env's k1
        }
        return metrics

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return act_with_policy(self.envs.policy, obs, envs=self.envs)

    def evaluate(self, num_episodes: int = 256, seed: int = 0) -> dict[str, float]:
        return evaluate_policy(self.envs, num_episodes=num_episodes, seed=seed)

    def save(self, path: str | Path) -> None:
        save_policy(self.envs.policy, self.envs.tokenizer, path, self.config.lora)

    def load(self, path: str | Path) -> None:
        """Load policy weights saved by `save` (safetensors via `from_pretrained`, never a pickle)."""
        load_policy(self.envs.policy, path)

    def state_dict(self) -> dict[str, Any]:
        """What the next iterations depend on, for a checkpoint: the policy, AdamW's state, the sampling and
        prompt RNGs, the moving-average baseline so far, the env's state, and the metrics so far."""
        return {
            "policy": policy_state(self.envs.policy),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "rng": self.rng.bit_generator.state,
            "ema_state": self.ema_state,
            "env": env_state(self.envs),
            "history": [dict(row) for row in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a `state_dict()` into this agent (same env and config), in place."""
        load_policy_state(self.envs.policy, state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.rng.bit_generator.state = state["rng"]
        self.ema_state = state["ema_state"]
        load_env_state(self.envs, state["env"])
        self.history = [dict(row) for row in state["history"]]
