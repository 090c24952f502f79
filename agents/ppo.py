"""Token-level PPO for RLHF: clipped surrogate, a value head, GAE, and a fixed or adaptive KL penalty.

PPO (Schulman et al. 2017, arXiv:1707.06347) as applied to language models by Ziegler et al. (2019,
arXiv:1909.08593), Stiennon et al. (2020) and InstructGPT (Ouyang et al. 2022, arXiv:2203.02155). The
choices follow "The N Implementation Details of RLHF with PPO" (Huang, Liu & von Werra 2023), a faithful
reproduction of OpenAI's lm-human-preferences:

* **One episode = one response; one action = one token.** Rewards live on the token axis (B, N): the
  reward model's score at the last token (EOS), and the KL term where the three KL settings put it.
* **The KL term: estimator x placement x granularity** (`rlhf_base.maths.kl_penalty`, whose docstring
  derives each line; `tests/test_kl_objectives.py` checks them exactly). With `l = log pi - log pi_ref`
  of the sampled tokens, `kl_estimator` picks `k(l)` (k1 `l`, k2 `l^2 / 2`, k3 `exp(-l) - 1 + l`);
  `kl_granularity` "token" takes `k` of each token's log-ratio and pays `-beta * k_t` at that token
  (InstructGPT/TRL: a dense signal for the critic and GAE), "sequence" takes `k` of the response's
  summed log-ratio and pays it at the last token; `kl_in` "reward" pays it in the token rewards
  (detached), "loss" leaves the rewards to `rm_score` alone and adds `beta * k`, differentiated through
  the current log-probs and averaged over tokens like the surrogate, to the loss. What the update climbs:

  - k1 in the reward (the default, either granularity): `E[rm_score] - beta * KL(pi || pi_ref)`, the RLHF
    objective, whose optimum is `pi_ref * exp(rm_score / beta) / Z`.
  - k2 as a loss, granularity "sequence": the same objective (on-policy its gradient equals k1's in the
    reward). Per token it is Tang & Munos' partial gradient: it misses the optimum (myopic).
  - k1 as a loss: `E[rm_score]`, no KL at all (`E[grad log pi] = 0`).
  - k3 as a loss: `E[rm_score] - beta * KL(pi_ref || pi)`, the forward KL (GRPO's term), another optimum.
  - k2/k3 in the reward: biased; k3 even pays the policy for dropping low-reward responses to 0.

  With `whiten_advantages`, the surrogate's scale is the whitened advantages', not the reward's, so a
  loss-placed term's effective coefficient is `beta` over the advantages' standard deviation; a term in
  the reward is whitened with the reward and keeps its meaning.
* **The KL coefficient is the env's.** `beta` is `envs.beta` (set it with `env.beta` in the env config): one
  value, which the env's reward and the agent's KL term both use. It is fixed, or follows Ziegler et
  al.'s adaptive controller (`adaptive_beta`), which writes each new value to `envs.beta`, so the next
  rollout's env reward already pays it; the controller steers the true KL (the env's k1 `kl`), whatever
  estimator is optimised. The token rewards are rebuilt from the rollout's `rm_scores` and per-token
  log-ratios, with the beta that rollout was scored with. The logged `kl` is always the env's k1 of the
  sampled responses; `kl_objective` is the mean KL term of the chosen estimator and granularity.
* **Value head**: a `Linear(hidden, 1)` on the policy's last hidden state (the trunk is shared, as in
  lm-human-preferences and TRL's `AutoModelForCausalLMWithValueHead`), trained with the policy by one Adam
  optimiser weighting the value loss by `vf_coef`. It starts at **zero** (weight and bias), as in
  lm-human-preferences: V = 0 matches the centred returns at the start, so the first advantages are plain
  Monte-Carlo returns, and because the head's weight is zero, an untrained critic sends no gradient into
  the shared trunk on the first update (d loss / d hidden = w = 0): the policy is not disturbed by it.
  On the default task the critic starts weak: a least-squares linear probe of the tiny model's last hidden
  state explains ~1 % of the return's variance, so early updates are close to REINFORCE with whitened,
  lambda-discounted returns; `explained_variance` shows when the trunk has learned value features.
* **Rollout**: the KV-cached `text_env.rollout`, then one teacher-forced forward without gradients for the
  old log-probs and values. The old log-probs come from that forward, not from the sampler, so the first
  minibatch's ratio is exactly 1 (the same code path as the training forward); the KL in the rewards uses
  the sampler's log-probs, so that with k1 it sums to the env's `kl` exactly. All of them are log-probs of
  the distribution sampled, the policy through the env's sampling options (`envs.sampling`: temperature,
  EOS banned before min_new_tokens), so neither the ratio nor the KL is off-policy (issue 12).
* **Update**: GAE (gamma 1, lambda 0.95), advantages whitened over the valid tokens of the batch, the
  clipped surrogate and clipped value loss averaged over tokens, `epochs` passes over shuffled
  minibatches of rows, global gradient-norm clipping, Adam with eps 1e-5 (as OpenAI baselines' PPO; Huang
  et al. show PyTorch's Adam steps harder early on than the TensorFlow one lm-human-preferences used), and
  an optional early stop of the epochs once approx-KL exceeds `target_kl` (cleanrl).
* **Dropout off**: the policy stays in eval mode, so the sampled and the trained policy are one function.
* **Several processes** (`torchrun`, issue 15; `rlhf_base.distributed`): each rank rolls out its shard
  of the batch (`envs.num_envs` rows of `num_envs * W`) with its own prompt, sampling and shuffling
  streams, and takes its shard of every minibatch (`minibatch_size` and `num_minibatches` describe the
  global minibatch, which must split evenly over the ranks). The statistics over the batch are global:
  reward and advantage whitening, the token means of the losses (`token_shares`), the explained variance,
  the logged metrics and the KL the controller steers by; gradients are averaged over ranks before the
  clip. So an update is the one a single process makes on the global batch, up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

import text_env
from agents.base import (
    ENV_SETTINGS,
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
    mean_over_ranks,
    rank_seed,
    sum_over_ranks,
    token_shares,
    world_size,
)
from rlhf_base.io import atomic_dir, load_tensors, load_tensors_metadata, save_tensors
from rlhf_base.lm import by_response_length, teacher_forced
from rlhf_base.lora import LoraConfig
from rlhf_base.maths import (
    gae,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
)
from rlhf_base.optim import adam
from rlhf_base.ranges import SEED, Range, check_ranges
from text_env.sampler import Rollout
from text_env.vector_env import TextGenVectorEnv

__all__ = ["PPOAgent", "PPOConfig", "adaptive_beta", "explained_variance", "token_rewards"]

VALUE_HEAD_FILE = "value_head.safetensors"
PPO_METRIC_KEYS = (
    "policy_loss",
    "value_loss",
    "approx_kl",
    "clip_fraction",
    "beta",
    "explained_variance",
    "kl_objective",  # mean per-response KL term of kl_estimator x kl_granularity (the logged `kl` is k1)
)


@dataclass
class PPOConfig:
    """PPO's settings; the defaults suit the default task (tiny-reviews, responses <= 32 tokens, B = 64):
    the 60 iterations take ~5 minutes on one CPU core and lift rm_score from ~0.05 to ~0.6.

    Knobs several configs share have one name in all of them, SB3's where SB3 has one (`learning_rate`,
    `gae_lambda`, `epochs`); a YAML file or override with an old name fails naming the new one (`RENAMED`).
    The KL coefficient and the batch size are the env's settings (`env.beta`, `env.num_envs`): naming them
    here is an error that says so (`MOVED_KEYS`). The old `kl_placement` is `kl_granularity` now ("per_token"
    is "token"; "terminal", which paid the summed per-token estimates at the last token, is "sequence",
    the same rewards for k1).
    """

    RENAMED: ClassVar[dict[str, str]] = {
        "lr": "learning_rate",
        "lam": "gae_lambda",
        "ppo_epochs": "epochs",
        "kl_placement": "kl_granularity",
    }
    MOVED_KEYS: ClassVar[dict[str, str]] = ENV_SETTINGS
    RANGES: ClassVar[dict[str, Range]] = {
        "iterations": Range(ge=1),
        "seed": SEED,
        "learning_rate": Range(gt=0),
        "adam_eps": Range(gt=0),
        "epochs": Range(ge=1),
        "num_minibatches": Range(ge=1),
        "minibatch_size": Range(ge=1),
        "clip_range": Range(gt=0),
        "clip_range_value": Range(gt=0),
        "vf_coef": Range(ge=0),
        "max_grad_norm": Range(gt=0),
        "gamma": Range(ge=0, le=1),
        "gae_lambda": Range(ge=0, le=1),
        "kl_target": Range(gt=0),
        "kl_horizon": Range(ge=1),
        "target_kl": Range(ge=0),  # 0: stop after the first epoch (approx-KL is >= 0)
    }

    iterations: int = 60  # default budget of learn(): rollouts of B responses, each followed by an update
    seed: int = 0  # seeds the prompt draws, the sampling generator, minibatch shuffling and init
    learning_rate: float = 3e-4  # Adam learning rate, for the policy and the value head alike
    adam_eps: float = 1e-5  # Adam epsilon (OpenAI baselines' and cleanrl's PPO value)
    epochs: int = 4  # passes over each rollout batch (TRL's num_ppo_epochs, SB3's n_epochs)
    num_minibatches: int = 4  # minibatches per pass (rows, shuffled); ignored when minibatch_size is set
    minibatch_size: int | None = None  # rows per minibatch (all ranks', torchrun); overrides num_minibatches
    clip_range: float = 0.2  # epsilon of the clipped surrogate
    clip_range_value: float | None = 0.2  # epsilon of the value clipping; None: plain squared error
    vf_coef: float = 0.1  # weight of the value loss in the one loss (lm-human-preferences, TRL)
    max_grad_norm: float = 1.0  # global gradient-norm clip over policy and value head
    gamma: float = 1.0  # discount; 1 because the episode is short and only the whole response is judged
    gae_lambda: float = 0.95  # GAE lambda (Schulman et al. 2016)
    whiten_advantages: bool = True  # normalise advantages over the batch's valid tokens
    whiten_rewards: bool = False  # rescale token rewards to unit variance (sign kept), as TRL's option
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"  # the KL term's estimator (module doc: what each climbs)
    kl_in: Literal["reward", "loss"] = "reward"  # KL term paid in the token rewards, or added to the loss
    kl_granularity: Literal["token", "sequence"] = "token"  # estimator per token (paid there) or per response
    adaptive_kl: bool = False  # adapt beta towards kl_target with Ziegler et al.'s controller
    kl_target: float = 6.0  # target mean KL per response (nats) of the adaptive controller
    kl_horizon: int = 10_000  # horizon (episodes) of the adaptive controller
    target_kl: float | None = None  # stop an iteration's epochs once their mean approx-KL exceeds this
    # None: full fine-tuning; {r, alpha, target_modules}: a LoRA adapter trains (with the value head) and
    # pi_ref is the policy with the adapter off (`agents.base.prepare_policy`, `rlhf_base.lora.LoraConfig`)
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        check_ranges(self)
        check_kl_settings(self.kl_estimator, self.kl_in, self.kl_granularity)


# --------------------------------------------------------------------------------------------------------
# Pieces: reward layout, KL controller, critic diagnostics
# --------------------------------------------------------------------------------------------------------
def token_rewards(
    rm_scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    placement: Literal["per_token", "terminal"],
) -> torch.Tensor:
    """Lay a response's reward out on its tokens.

    Args:
        rm_scores: (B,) reward-model score of each response.
        kl: (B, N) the KL term of each token (`kl_penalty`: per token, or the response's at its last token).
        mask: (B, N) valid response tokens (EOS included), right-padded.
        beta: KL coefficient.
        placement: "per_token": `-beta * kl_t` on every token plus `rm_score` on the last valid one
            (Ouyang et al. 2022; TRL). "terminal": `rm_score - beta * sum_t kl_t` on the last valid token.

    Returns:
        (B, N) rewards, 0 at padding; each row sums to `rm_score - beta * sum_t kl_t` in both layouts.
    """
    valid = mask.bool()
    kl = torch.where(valid, kl, torch.zeros_like(kl))  # (B, N)
    last = (valid.sum(-1) - 1).clamp(min=0)  # (B,) column of the last valid token
    if placement == "per_token":
        rewards = -beta * kl  # (B, N)
        score = rm_scores
    elif placement == "terminal":
        rewards = torch.zeros_like(kl)  # (B, N)
        score = rm_scores - beta * kl.sum(-1)
    else:
        raise ValueError(f"placement must be 'per_token' or 'terminal', got {placement!r}")
    return rewards.scatter_add(1, last[:, None], score[:, None].to(rewards.dtype))


def adaptive_beta(beta: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """One step of Ziegler et al.'s (2019, section 2.2) proportional KL controller.

    `e = clip(kl / target - 1, -0.2, 0.2)`, `beta <- beta * (1 + e * n_steps / horizon)`: beta grows while
    the policy's KL exceeds the target and shrinks below it, by at most 20 % per `horizon` episodes.

    Args:
        beta: current coefficient.
        kl: mean KL per response of the batch just collected.
        target: the KL to steer towards.
        horizon: episodes over which a full proportional error is applied.
        n_steps: episodes in the batch (B).
    """
    proportional_error = float(np.clip(kl / target - 1.0, -0.2, 0.2))
    return beta * (1.0 + proportional_error * n_steps / horizon)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """`1 - Var[R - V] / Var[R]` over valid tokens (every rank's, under torchrun): 1 is a perfect critic,
    <= 0 no better than a constant."""
    if sum_over_ranks({"tokens": mask.sum().item()})["tokens"] < 2:
        return math.nan
    var_returns = global_masked_var(returns, mask).item()
    if var_returns == 0:
        return math.nan
    return 1.0 - global_masked_var(returns - values, mask).item() / var_returns


# --------------------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------------------
class PPOAgent:
    """PPO with a value head on the env's policy; see the module docstring for the choices and papers."""

    name = "ppo"
    Config = PPOConfig
    distributed = True  # trains over the ranks of a torchrun launch (see the module docstring)

    def __init__(self, envs: TextGenVectorEnv, config: PPOConfig | None = None) -> None:
        self.envs, self.config = envs, config if config is not None else PPOConfig()
        self.history: list[dict[str, float]] = []
        cfg = self.config
        torch.manual_seed(cfg.seed)
        policy_params = prepare_policy(envs, cfg.lora, cfg.seed, self.name)  # LoRA: the adapter's alone
        policy = envs.policy
        device = next(policy.parameters()).device
        policy.eval()  # no dropout: RL needs the sampled and the trained policy to be the same function
        self.value_head = nn.Linear(policy.config.hidden_size, 1, device=device)  # fp32 even for bf16 LMs
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        params = policy_params + list(self.value_head.parameters())
        broadcast_parameters(params)  # under torchrun: every rank starts from rank 0's weights
        self.optimizer = adam(params, lr=cfg.learning_rate, eps=cfg.adam_eps, decoupled=False)
        seed = rank_seed(cfg.seed)  # cfg.seed on one process; under torchrun, each rank's own streams
        self.np_random = np.random.default_rng(seed)  # prompt draws: the agent's own, not the env's
        self.generator = torch.Generator(device=device).manual_seed(seed)  # token sampling
        self.shuffle_generator = torch.Generator().manual_seed(seed)  # minibatch order
        if self._global_minibatch_size % world_size():
            raise ValueError(
                f"a minibatch of {self._global_minibatch_size} rows does not split over {world_size()} "
                "processes: choose minibatch_size (or num_envs / num_minibatches) a multiple of the process count"
            )

    @property
    def beta(self) -> float:
        """The KL coefficient: the env's one value (`envs.beta`), which the adaptive controller sets."""
        return self.envs.beta

    @beta.setter
    def beta(self, value: float) -> None:
        self.envs.beta = value

    @property
    def _global_minibatch_size(self) -> int:
        """Rows per minibatch over all ranks: `minibatch_size`, or the global batch over `num_minibatches`."""
        cfg, rows = self.config, self.envs.num_envs * world_size()
        return cfg.minibatch_size or max(1, math.ceil(rows / cfg.num_minibatches))

    @property
    def minibatch_size(self) -> int:
        """Rows per minibatch on this rank (under torchrun each rank takes its shard of every minibatch)."""
        return self._global_minibatch_size // world_size()

    def _forward(
        self, ids: torch.Tensor, attention_mask: torch.Tensor, p: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log q and V of the response tokens at columns `p:`: each (B, N), junk past a
        row's end (masked by the callers). q is the policy through the env's sampling options
        (`envs.sampling`: its temperature, EOS banned before min_new_tokens), the distribution the rollout
        drew from, so the ratio is on-policy. Rows run in length groups (`by_response_length`), so little
        padding is computed."""

        def forward(ids: torch.Tensor, mask: torch.Tensor, start: int) -> tuple[torch.Tensor, ...]:
            out, logits = teacher_forced(self.envs.policy, ids, mask, start, output_hidden_states=True)
            logits = self.envs.sampling.logits(logits)  # q's: the distribution the rollout sampled
            logprobs = logprobs_from_logits(logits, ids[:, start:])  # (b, n)
            hidden = out.hidden_states[-1][:, start - 1 : -1].float()  # (b, n, H): state before each token
            return logprobs, self.value_head(hidden).squeeze(-1)  # (b, n) each

        return by_response_length(forward, ids, attention_mask, p, self.envs.speed.overhead_tokens)

    def learn(
        self, iterations: int | None = None, callback: Callback | None = None
    ) -> list[dict[str, float]]:
        """Collect, update, repeat `iterations` times (default: the config's); bookkeeping in `run_iterations`."""
        return run_iterations(self, self._iteration, iterations, callback)

    def _iteration(self, iteration: int) -> Iteration:
        """One PPO iteration: a rollout of B responses, then `epochs` passes of minibatch updates."""
        batch = self._collect()
        return Iteration(batch, batch.num_tokens, self._update(batch, iteration))

    def _collect(self) -> Rollout:
        """B responses (KV-cached) on prompts the agent draws; under torchrun, this rank's shard."""
        prompt_indices = self.np_random.integers(len(self.envs.prompts), size=self.envs.num_envs)
        return text_env.rollout(self.envs, prompt_indices=prompt_indices, generator=self.generator)

    def _minibatch_order(self, num_rows: int) -> torch.Tensor:
        """The rows of the batch in this epoch's order (shuffled); consecutive slices are the minibatches."""
        return torch.randperm(num_rows, generator=self.shuffle_generator)

    def _update(self, batch: Rollout, iteration: int) -> dict[str, float]:
        """Learn from one rollout: score it, GAE, `epochs` passes of minibatch steps; return the metrics."""
        cfg = self.config
        num_rows = len(batch.rm_scores)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        # 1. Score the responses teacher-forced: old log q and V.
        p, n = batch.response_start, int(batch.lengths.max().item())  # drop all-padding columns
        b_ids, b_attention = batch.input_ids[:, : p + n], batch.attention_mask[:, : p + n]
        b_mask = batch.response_mask[:, :n]  # (B, N)
        b_ref_logprobs = batch.ref_logprobs[:, :n]  # (B, N)
        kl_settings = (cfg.kl_estimator, cfg.kl_granularity)
        with torch.no_grad():
            b_logprobs, b_values = self._forward(b_ids, b_attention, p)  # (B, N) each
            # The KL term of the sampled tokens (the sampler's log-probs: with k1 it sums to the env's kl).
            kl = kl_penalty(batch.logprobs[:, :n], b_ref_logprobs, b_mask, *kl_settings)  # (B, N)
            paid = kl if cfg.kl_in == "reward" else torch.zeros_like(kl)  # "loss": rm_score alone
            rewards = token_rewards(batch.rm_scores, paid, b_mask, self.beta, "per_token")  # (B, N)
            if cfg.whiten_rewards:  # (global: over every rank's tokens)
                rewards = global_masked_whiten(rewards, b_mask, shift_mean=False)
            b_advantages, b_returns = gae(rewards, b_values, b_mask, cfg.gamma, cfg.gae_lambda)  # (B, N) each
            ev = explained_variance(b_values, b_returns, b_mask)
            if cfg.whiten_advantages:
                b_advantages = global_masked_whiten(b_advantages, b_mask)

        # 2. PPO epochs over shuffled minibatches of rows.
        stats: dict[str, list[float]] = {
            k: [] for k in ("policy_loss", "value_loss", "approx_kl", "clip_fraction")
        }
        epochs_done = 0
        for _ in range(cfg.epochs):
            order = self._minibatch_order(num_rows).to(b_ids.device)
            minibatches = [
                order[lo : lo + self.minibatch_size] for lo in range(0, num_rows, self.minibatch_size)
            ]
            # Each loss below is a mean over the minibatch's tokens; its share (1.0 on one process) makes the
            # gradients' mean over ranks that of the mean over all ranks' tokens (rlhf_base.distributed).
            shares = token_shares([b_mask[mb].sum() for mb in minibatches])
            epoch_kl = []
            for mb, share in zip(minibatches, shares, strict=True):
                mb_mask = b_mask[mb]
                logprobs, values = self._forward(b_ids[mb], b_attention[mb], p)
                pg_loss, pg_stats = ppo_policy_loss(
                    logprobs, b_logprobs[mb], b_advantages[mb], mb_mask, cfg.clip_range
                )
                v_loss = ppo_value_loss(values, b_values[mb], b_returns[mb], mb_mask, cfg.clip_range_value)
                loss = pg_loss + cfg.vf_coef * v_loss
                if cfg.kl_in == "loss":  # beta * the KL term, a token mean like the surrogate
                    kl_term = kl_penalty(logprobs, b_ref_logprobs[mb], mb_mask, *kl_settings, "loss")
                    loss = loss + self.beta * masked_mean(kl_term, mb_mask)
                check_finite(loss, "PPO loss", iteration)
                self.optimizer.zero_grad(set_to_none=True)
                (loss * share).backward()
                average_gradients(params)  # the mean over ranks (nothing on one process), before the clip
                grad_norm = nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                check_finite(grad_norm, "PPO gradient norm", iteration)
                self.optimizer.step()
                # Token means times shares: their mean over ranks is the global minibatch's.
                stats["policy_loss"].append(pg_loss.item() * share)
                stats["value_loss"].append(v_loss.item() * share)
                stats["approx_kl"].append(pg_stats["approx_kl"] * share)
                stats["clip_fraction"].append(pg_stats["clip_fraction"] * share)
                epoch_kl.append(pg_stats["approx_kl"] * share)
            epochs_done += 1
            if cfg.target_kl is not None:  # every rank decides alike, on the global approx-KL
                if mean_over_ranks({"approx_kl": float(np.mean(epoch_kl))})["approx_kl"] > cfg.target_kl:
                    break  # the policy moved far from the one that collected the batch

        # 3. Metrics (with the beta these rewards used), then the KL controller's step.
        metrics = mean_over_ranks({k: float(np.mean(v)) for k, v in stats.items()})
        metrics.update(beta=self.beta, explained_variance=ev, ppo_epochs=float(epochs_done))
        # The KL term optimised (`kl` is the env's k1), and the shared `kl` the controller steers by.
        means = mean_over_ranks({"kl_objective": kl.sum(-1).mean().item(), "kl": batch.kl.mean().item()})
        metrics["kl_objective"] = means["kl_objective"]
        if cfg.adaptive_kl:
            global_rows = num_rows * world_size()
            self.beta = adaptive_beta(self.beta, means["kl"], cfg.kl_target, cfg.kl_horizon, global_rows)
        return metrics

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return act_with_policy(self.envs.policy, obs, generator=self.generator, envs=self.envs)

    def evaluate(self, num_episodes: int = 256, seed: int = 0) -> dict[str, float]:
        return evaluate_policy(self.envs, num_episodes=num_episodes, seed=seed)

    def save(self, path: str | Path) -> None:
        """The policy as a Hugging Face directory plus `value_head.safetensors` (and beta), in one atomic write."""
        with atomic_dir(Path(path)) as tmp:
            save_policy(self.envs.policy, self.envs.tokenizer, tmp, self.config.lora)
            save_tensors(
                self.value_head.state_dict(), tmp / VALUE_HEAD_FILE, metadata={"beta": repr(self.beta)}
            )

    def load(self, path: str | Path) -> None:
        """Load policy weights (safetensors only) into the env's policy, and the value head and beta if saved
        (beta into `envs.beta`, where the env and the controller read it)."""
        path = Path(path)
        policy = self.envs.policy
        load_policy(policy, path)  # in place: the optimiser keeps its parameters
        if (path / VALUE_HEAD_FILE).exists():
            self.value_head.load_state_dict(load_tensors(path / VALUE_HEAD_FILE, device=policy.device))
            self.beta = float(load_tensors_metadata(path / VALUE_HEAD_FILE).get("beta", self.beta))

    def state_dict(self) -> dict[str, Any]:
        """What the next iterations depend on, for a checkpoint: the policy, the value head, Adam's state, the
        prompt, sampling and shuffling RNGs, the env's state (its beta is the adaptive KL controller's one
        state), and the metrics so far. Tensors are the live ones (see `agents.base.Agent`)."""
        return {
            "policy": policy_state(self.envs.policy),
            "value_head": self.value_head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "np_random": self.np_random.bit_generator.state,
            "generator": self.generator.get_state(),
            "shuffle_generator": self.shuffle_generator.get_state(),
            "env": env_state(self.envs),
            "history": [dict(row) for row in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a `state_dict()` into this agent (same env and config), in place."""
        load_policy_state(self.envs.policy, state["policy"])
        self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.np_random.bit_generator.state = state["np_random"]
        self.generator.set_state(state["generator"])
        self.shuffle_generator.set_state(state["shuffle_generator"])
        load_env_state(self.envs, state["env"])
        self.history = [dict(row) for row in state["history"]]
