"""Best-of-n sampling (rejection sampling against the reward model): the strong baseline that learns nothing.

For each prompt, draw n = `samples_per_prompt` responses from the policy (pi_ref unless you load another), score them with the
**reward model** (the env's `rm_score`; the gold reward is only reported) and return the best. Nakano et al.
(2021, WebGPT) and Stiennon et al. (2020) found it competitive with RL at small KL budgets; Gao et al. (2023,
arXiv:2210.10760) use it to chart reward over-optimisation against KL.

## What "kl" means here
The env's KL is token-wise: log pi(y_t) - log pi_ref(y_t) summed over the response. Best-of-n samples every
token from pi = pi_ref, so that KL is 0 for each sample, chosen or not (reported as `kl_measured_env`). What
moves away from pi_ref is the *distribution of the selected response*, pi_n. Two numbers describe its KL:

* `kl_bound`: `log n - (n - 1) / n` (Stiennon et al. 2020, appendix G.3), long reported as "the" best-of-n
  KL. Beirami et al. (2024, arXiv:2401.01879) prove it is an upper bound, reached only when pi spreads its
  mass over many outcomes of distinct reward; it depends on n alone, never on the samples.
* `kl`: an estimate from the samples (`rlhf_base.best_of_n.best_of_n_kl_estimate`): per prompt, the exact
  KL of best-of-n over the distinct completions sampled, at their own sequence probabilities, with the
  unseen mass as an atomless continuum. It never exceeds the bound, meets it when every sample is
  improbable, and falls far below it when pi repeats a few likely completions.

`kl` is the estimate because it is the shared metric every agent reports and the report plots on the KL
axis: the RL agents' `kl` estimates their own policy's KL from its samples, so the frontier compares like
with like, and best-of-n's point no longer sits to the right of where it is (by up to the whole bound
when pi is peaked). The bound stays in its own column, named for what it is. `reward` is
`rm_score - beta * kl` with the estimate. Both are to the sampling policy: if a trained policy is loaded,
they are KLs to that policy (its sequence log-probs are used), and `kl_measured_env` carries its KL to
pi_ref.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

import text_env
from agents.base import (
    Callback,
    act_with_policy,
    check_rank_scores,
    env_state,
    load_env_state,
    load_policy,
    rollout_metrics,
    save_policy,
)
from agents.loop import Iteration, run_iterations
from rlhf_base.best_of_n import best_of_n_kl_estimate
from rlhf_base.maths import best_of_n_kl
from rlhf_base.ranges import SEED, Range, check_ranges
from text_env.sampler import Rollout

__all__ = ["BestOfN", "BestOfNAgent", "BestOfNConfig", "selection_kl"]


@dataclass
class BestOfNConfig:
    """Best-of-n settings; the defaults suit the default task (4 rounds of 64 prompts x 16 samples).

    The method's n is `samples_per_prompt`, the name RAFT and REINFORCE (RLOO) give the same knob, so one
    sweep key (`agent.samples_per_prompt`) means the same thing for all three; `n` in a YAML file or an
    override fails naming it (`RENAMED`). Metrics and the report still say n, as the papers do.
    """

    RENAMED: ClassVar[dict[str, str]] = {"n": "samples_per_prompt"}
    RANGES: ClassVar[dict[str, Range]] = {
        "samples_per_prompt": Range(ge=1),  # n = 1 is the policy itself, the frontier's KL-0 point
        "prompts_per_iteration": Range(ge=1),
        "iterations": Range(ge=1),
        "seed": SEED,
    }

    samples_per_prompt: int = 16  # n: samples per prompt; the one the reward model scores best is kept
    prompts_per_iteration: int = 64  # prompts per evaluation round of learn()
    iterations: int = 4  # evaluation rounds per learn() call (nothing is learned)
    seed: int = 0  # seeds the prompt draw and the sampling generator

    def __post_init__(self) -> None:
        check_ranges(self)


# --------------------------------------------------------------------------------------------------------
# Pieces: gathering rows of rollouts
# --------------------------------------------------------------------------------------------------------
def _concat(batches: Sequence[Rollout]) -> Rollout:
    """One Rollout holding the rows of several (same prompt width P and response width N)."""
    fields = {}
    for f in dataclasses.fields(Rollout):
        values = [getattr(b, f.name) for b in batches]
        if f.name == "response_start":
            fields[f.name] = values[0]
        elif isinstance(values[0], torch.Tensor):
            fields[f.name] = torch.cat(values)
        elif isinstance(values[0], np.ndarray):
            fields[f.name] = np.concatenate(values)
        else:
            fields[f.name] = [x for v in values for x in v]
    return Rollout(**fields)


def _take(batch: Rollout, rows: np.ndarray) -> Rollout:
    """The sub-Rollout of `rows` (in that order)."""
    index = torch.as_tensor(rows, device=batch.input_ids.device)
    fields = {}
    for f in dataclasses.fields(Rollout):
        value = getattr(batch, f.name)
        if f.name == "response_start":
            fields[f.name] = value
        elif isinstance(value, torch.Tensor):
            fields[f.name] = value[index]
        elif isinstance(value, np.ndarray):
            fields[f.name] = value[rows]
        else:
            fields[f.name] = [value[i] for i in rows]
    return Rollout(**fields)


@dataclass
class BestOfN:
    """The outcome of best-of-n on m prompts."""

    samples: Rollout  # m * n rows: the n samples of prompt i at rows i * n .. i * n + n - 1
    chosen: np.ndarray  # (m,) the row of `samples` picked for each prompt (argmax of rm_score)
    best: Rollout  # m rows: the chosen samples, in prompt order


def selection_kl(result: BestOfN, n: int) -> float:
    """The estimated KL(pi_n || pi) of best-of-n, averaged over the m prompts drawn.

    Each prompt's samples (pooled, if the prompt was drawn twice) give one estimate over its distinct
    completions (same response tokens: one outcome), at their sequence log-probs under the sampling
    policy and ranked by the reward-model score the selection used.
    """
    samples = result.samples
    mask = samples.response_mask > 0  # (B, N)
    logprobs = torch.where(mask, samples.logprobs, 0.0).sum(-1).double().cpu().numpy()  # (B,) log pi(y)
    rewards = samples.rm_scores.double().cpu().numpy()  # (B,)
    ids, mask = samples.response_ids.cpu(), mask.cpu()
    completions = [tuple(ids[i][mask[i]].tolist()) for i in range(len(ids))]
    estimate = {}
    for prompt in np.unique(samples.prompt_indices):
        rows = np.flatnonzero(samples.prompt_indices == prompt)
        estimate[prompt] = best_of_n_kl_estimate(
            logprobs[rows], rewards[rows], n, [completions[i] for i in rows]
        )
    return float(np.mean([estimate[p] for p in result.best.prompt_indices]))


# --------------------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------------------
class BestOfNAgent:
    """Best-of-n over `envs.policy` (pi_ref by default), selected by the env's reward model.

    Args:
        envs: the vector env; m prompts need m * n samples, generated `envs.num_envs` rows per KV-cached
            rollout (n may exceed num_envs: a prompt's samples then span several rollouts).
        config: a `BestOfNConfig`.
    """

    name = "best_of_n"
    Config = BestOfNConfig
    learns = False  # selects among samples of a fixed policy: the report draws it as one point per n

    def __init__(self, envs: text_env.TextGenVectorEnv, config: BestOfNConfig) -> None:
        if config.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {config.samples_per_prompt}")
        if config.prompts_per_iteration < 1:
            raise ValueError(f"prompts_per_iteration must be >= 1, got {config.prompts_per_iteration}")
        self.envs, self.config = envs, config
        self.history: list[dict[str, float]] = []
        torch.manual_seed(config.seed)
        device = next(envs.policy.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)  # prompt draws

    def best_of(
        self, prompt_indices: Sequence[int] | np.ndarray, generator: torch.Generator | None = None
    ) -> BestOfN:
        """Sample n responses for each prompt index, score them with the reward model, keep the best."""
        prompt_indices = np.asarray(prompt_indices, dtype=np.int64)  # (m,)
        n, num_envs = self.config.samples_per_prompt, self.envs.num_envs
        wanted = np.repeat(prompt_indices, n)  # (m * n,)
        chunks = []
        for lo in range(0, len(wanted), num_envs):
            rows = wanted[lo : lo + num_envs]
            padded = np.concatenate([rows, np.full(num_envs - len(rows), rows[0])])  # last chunk: filler rows
            batch = text_env.rollout(self.envs, prompt_indices=padded, generator=generator or self.generator)
            chunks.append(batch if len(rows) == num_envs else _take(batch, np.arange(len(rows))))
        samples = _concat(chunks)
        check_rank_scores(self.envs, samples.rm_scores, samples.responses, "best-of-n selects by it")
        scores = samples.rm_scores.view(-1, n)  # (m, n): the reward model's, never gold
        chosen = (
            (torch.arange(len(prompt_indices), device=scores.device) * n + scores.argmax(-1)).cpu().numpy()
        )
        return BestOfN(samples=samples, chosen=chosen, best=_take(samples, chosen))

    def _indices(self, prompts: Sequence[str] | Sequence[int] | np.ndarray) -> np.ndarray:
        """Prompt indices from indices or from prompt strings of the env's task."""
        if len(prompts) and all(isinstance(p, str) for p in prompts):
            lookup = {p: i for i, p in enumerate(self.envs.prompts)}
            missing = [p for p in prompts if p not in lookup]
            if missing:
                raise ValueError(
                    f"prompt {missing[0]!r} is not one of the env's task prompts; the env samples only its own "
                    "prompts, so build the env with prompts=[...] that include it"
                )
            return np.array([lookup[p] for p in prompts], dtype=np.int64)
        return np.asarray([self.envs.check_prompt_index(i) for i in prompts], dtype=np.int64)

    def select(self, prompts: Sequence[str] | Sequence[int] | np.ndarray) -> list[str]:
        """The best of n responses for each prompt (given as task prompt strings or prompt indices)."""
        return self.best_of(self._indices(prompts)).best.responses

    def _draw_prompts(self, m: int, rng: np.random.Generator) -> np.ndarray:
        total = len(self.envs.prompts)
        return rng.choice(total, size=m, replace=m > total)

    def selection_metrics(self, result: BestOfN) -> dict[str, float]:
        """What best-of-n reports on top of the chosen responses' shared metrics: the estimated KL of the
        selection and the `reward` with it (they replace the env's), the analytic upper bound on that KL,
        the env's measured KL, and the samples' mean score."""
        n = self.config.samples_per_prompt
        kl = selection_kl(result, n)
        return {
            "kl": kl,
            "kl_bound": best_of_n_kl(n),
            "reward": result.best.rm_scores.mean().item() - self.envs.beta * kl,
            "kl_measured_env": result.best.kl.mean().item(),  # the shared `kl` of the chosen responses
            "rm_score_all": result.samples.rm_scores.mean().item(),  # the sampling policy's own mean
            "n": float(n),
        }

    def learn(
        self, iterations: int | None = None, callback: Callback | None = None
    ) -> list[dict[str, float]]:
        """Run `iterations` rounds of best-of-n on `prompts_per_iteration` fresh prompts; nothing is trained."""
        return run_iterations(self, self._iteration, iterations, callback)

    def _iteration(self, iteration: int) -> Iteration:
        """One round: fresh prompts, n samples each, the reward model's best; every sample's tokens count."""
        result = self.best_of(self._draw_prompts(self.config.prompts_per_iteration, self.rng))
        return Iteration(result.best, result.samples.num_tokens, self.selection_metrics(result))

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """A token from the sampling policy: best-of-n is a policy over whole responses, not tokens."""
        return act_with_policy(self.envs.policy, obs, envs=self.envs)

    def evaluate(self, num_episodes: int = 256, seed: int = 0) -> dict[str, float]:
        """Best-of-n metrics on `num_episodes` prompts (each costs n samples), seeded apart from learn()."""
        start = time.perf_counter()
        device = next(self.envs.policy.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        result = self.best_of(self._draw_prompts(num_episodes, np.random.default_rng(seed)), generator)
        metrics = rollout_metrics(result.best, 0, time.perf_counter() - start, result.samples.num_tokens)
        return metrics | self.selection_metrics(result) | {"episodes": float(num_episodes)}

    def save(self, path: str | Path) -> None:
        save_policy(self.envs.policy, self.envs.tokenizer, path)

    def load(self, path: str | Path) -> None:
        """Sample from a saved policy (e.g. best-of-n on top of an RL-trained one); safetensors only."""
        load_policy(self.envs.policy, path)

    def state_dict(self) -> dict[str, Any]:
        """What the next rounds depend on, for a checkpoint: the sampling and prompt RNGs, the env's state and
        the metrics so far. No weights: best-of-n trains nothing (the policy comes from the env's config)."""
        return {
            "generator": self.generator.get_state(),
            "rng": self.rng.bit_generator.state,
            "env": env_state(self.envs),
            "history": [dict(row) for row in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a `state_dict()` into this agent (same env and config), in place."""
        self.generator.set_state(state["generator"])
        self.rng.bit_generator.state = state["rng"]
        load_env_state(self.envs, state["env"])
        self.history = [dict(row) for row in state["history"]]
