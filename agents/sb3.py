"""stable-baselines3 on the text env, with the language model itself as SB3's policy.

An SB3 user's algorithm (PPO, A2C, or any `OnPolicyAlgorithm` that takes an `ActorCriticPolicy`) trains the
very model the env judges: `LMActorCriticPolicy` wraps `envs.policy` as a submodule, so SB3's optimiser
updates it in place and the env's KL term is taken against the model being trained.

    agent = make_agent("sb3_ppo", envs, {"iterations": 5})
    history = agent.learn()

The policy (Ziegler et al. 2019, arXiv:1909.08593, with SB3's losses): the action logits are the LM head's
logits at the last real position of the observation, the value is `Linear(hidden, 1)` on the LM's last
hidden state there, and the action distribution is a categorical over the vocabulary.

Honest about speed: SB3 steps one token per env step through a full forward of the whole padded
observation (no KV cache), one `TextGenEnv` at a time inside `DummyVecEnv`, scoring each finished episode
on its own. It is for running SB3's algorithms as they are, not for throughput; `benchmarks/sb3_speed.py`
measures the gap to `text_env.rollout`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import nn
from transformers import PreTrainedModel

import text_env
from agents.base import (
    Callback,
    act_with_policy,
    check_finite,
    env_state,
    evaluate_policy,
    load_env_state,
    load_policy,
    save_policy,
)
from agents.loop import Iteration, run_iterations
from rlhf_base.io import load_tensors, save_tensors
from rlhf_base.lm import position_ids_from_mask
from rlhf_base.ranges import SEED, Range, check_ranges
from text_env.sampling import SamplingOptions

__all__ = [
    "EpisodeStatsCallback",
    "LMActorCriticPolicy",
    "SB3A2CAgent",
    "SB3A2CConfig",
    "SB3PPOAgent",
    "SB3PPOConfig",
    "make_sb3_vec_env",
    "right_align",
]

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class SB3Config:
    """What SB3's PPO and A2C share (SB3's own names, so its docs apply)."""

    RANGES: ClassVar[dict[str, Range]] = {
        "iterations": Range(ge=1),
        "timesteps_per_iteration": Range(ge=1),
        "n_envs": Range(ge=1),
        "n_steps": Range(ge=1),
        "learning_rate": Range(gt=0),
        "gamma": Range(ge=0, le=1),
        "gae_lambda": Range(ge=0, le=1),
        "ent_coef": Range(ge=0),
        "vf_coef": Range(ge=0),
        "max_grad_norm": Range(gt=0),
        "seed": SEED,
    }

    iterations: int = 10  # default learn() budget: evaluations, each after `timesteps_per_iteration` steps
    timesteps_per_iteration: int = 2048  # env steps (= generated tokens) SB3 collects per iteration
    n_envs: int = 16  # single TextGenEnvs in SB3's DummyVecEnv, all sharing the env's models
    n_steps: int = 64  # steps per env per SB3 rollout: an update sees n_envs * n_steps tokens
    learning_rate: float = 1e-4  # optimiser step size for the LM and the value head
    gamma: float = 1.0  # discount: 1, the reward comes once at the end of the response
    gae_lambda: float = 0.95  # GAE lambda (Schulman et al. 2016)
    ent_coef: float = 0.0  # entropy bonus weight; the KL penalty already keeps the policy spread
    vf_coef: float = 0.5  # value loss weight
    max_grad_norm: float = 0.5  # global gradient norm clip
    normalize_advantage: bool = True  # whiten advantages per minibatch (PPO) / per batch (A2C)
    seed: int = 0  # seeds SB3 (torch's global RNG, env prompt draws) and the evaluation sampler

    def __post_init__(self) -> None:
        check_ranges(self)  # with a subclass's own RANGES merged in


@dataclass
class SB3PPOConfig(SB3Config):
    """SB3 PPO (Schulman et al. 2017, arXiv:1707.06347) on the LM policy."""

    RANGES: ClassVar[dict[str, Range]] = {
        "batch_size": Range(ge=1),
        "n_epochs": Range(ge=1),
        "clip_range": Range(gt=0),
        "target_kl": Range(ge=0),  # 0: stop once the approx-KL is above 0
    }

    batch_size: int = 256  # minibatch size in tokens (env steps)
    n_epochs: int = 4  # passes over each rollout buffer
    clip_range: float = 0.2  # PPO ratio clip epsilon
    target_kl: float | None = (
        None  # stop an update's epochs early past this approx KL(old || new); None: never
    )


@dataclass
class SB3A2CConfig(SB3Config):
    """SB3 A2C (Mnih et al. 2016, arXiv:1602.01783) on the LM policy: one gradient step per rollout."""

    n_steps: int = 32  # steps per env per update (A2C updates after every rollout)
    normalize_advantage: bool = False  # SB3's A2C default
    use_rms_prop: bool = False  # SB3's default is RMSprop; Adam is the usual choice for fine-tuning an LM


# --------------------------------------------------------------------------------------------------------
# The policy: the LM as SB3's actor, a linear value head as its critic
# --------------------------------------------------------------------------------------------------------
def right_align(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Roll each row so that its last real token sits in the last column; padding wraps to the front.

    An observation is `[pad | prompt | response | pad]`; after the roll it is `[pad pad | prompt response]`,
    the left-padded layout of batched generation, so `logits_to_keep=1` gives every row's next-token logits
    from the model's own forward (any logit scaling or soft-capping included) without (B, T, V) logits.
    """
    width = attention_mask.shape[1]
    last = width - 1 - torch.argmax(attention_mask.flip(-1), dim=-1)  # (B,) column of the last real token
    shift = (width - 1 - last)[:, None]  # (B, 1)
    # (B, T): column j of the result is column index[j] of the input
    index = (torch.arange(width, device=input_ids.device)[None] - shift) % width
    return input_ids.gather(1, index), attention_mask.gather(1, index)


class LMActorCriticPolicy(ActorCriticPolicy):
    """SB3 actor-critic policy whose actor is a causal LM and whose critic is `Linear(hidden, 1)` on it.

    Args:
        observation_space, action_space, lr_schedule: as SB3 passes them.
        lm: the causal LM to train: pass the env's own policy model (`envs.policy`) so that the env's KL is
            taken against it. It is registered as `self.lm`, so `self.parameters()` (and SB3's optimiser)
            include it. Its dropout stays off in training too: SB3's ratio needs the sampled and the
            re-evaluated policy to be the same function.
        sampling, response_start: the env's sampling options (`envs.sampling`) and response column
            (`envs.response_start`): the action distribution is the LM's next-token distribution through
            them (the env's temperature, EOS banned before min_new_tokens), the one the env's KL and the
            other agents' samplers use. None: the LM's own distribution.
        **kwargs: `ActorCriticPolicy` options; `optimizer_class`/`optimizer_kwargs` apply, the MLP ones
            (`net_arch`, `activation_fn`, `ortho_init`) are ignored, as there is no MLP.
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Discrete,
        lr_schedule,
        lm: PreTrainedModel | None = None,
        sampling: SamplingOptions | None = None,
        response_start: int = 0,
        **kwargs,
    ):
        if lm is None:
            raise ValueError("LMActorCriticPolicy needs the LM: policy_kwargs={'lm': envs.policy}")
        self.sampling, self.response_start = sampling, response_start
        # SB3's __init__ ends in `_build` (networks + optimiser), which must see the LM; nn.Module allows no
        # submodule before Module.__init__, so the LM waits in a plain tuple until then.
        self._pending_lm = (lm,)
        kwargs.update(net_arch=[], ortho_init=False)  # no MLP; orthogonal init would wipe the LM's weights
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule) -> None:
        (self.lm,) = self._pending_lm
        del self._pending_lm
        hidden = self.lm.config.get_text_config().hidden_size
        self.value_net = nn.Linear(hidden, 1)  # (H,) -> (1,) on the last hidden state
        self.init_weights(self.value_net, gain=1.0)  # SB3's value-head init: orthogonal, gain 1, zero bias
        self.value_net.to(self.lm.device)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def set_training_mode(self, mode: bool) -> None:
        super().set_training_mode(mode)
        self.lm.eval()  # no dropout: see the class docstring

    def extract_features(
        self, obs: dict[str, torch.Tensor], features_extractor=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One LM forward: next-token logits (B, V) and last hidden state (B, H) at each row's last real token.

        The logits are those of the action distribution: through `sampling` at each row's response step.
        SB3 may hand the ids as floats (its buffers, `preprocess_obs`); they are cast back to long.
        """
        ids, mask = right_align(obs["input_ids"].long(), obs["attention_mask"].long())  # (B, T) each
        steps = obs["attention_mask"][:, self.response_start :].long().sum(-1)  # (B,) response tokens so far
        out = self.lm(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1].float()  # (B, V)
        if self.sampling is not None:
            logits = self.sampling.logits(logits, step=steps)
        return logits, out.hidden_states[-1][:, -1].float()  # (B, V), (B, H)

    def _distribution(self, logits: torch.Tensor) -> Distribution:
        return self.action_dist.proba_distribution(action_logits=logits)  # Categorical over the vocabulary

    def forward(self, obs, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, hidden = self.extract_features(obs)
        distribution = self._distribution(logits)
        actions = distribution.get_actions(deterministic=deterministic)  # (B,)
        return actions, self.value_net(hidden), distribution.log_prob(actions)

    def evaluate_actions(self, obs, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, hidden = self.extract_features(obs)
        distribution = self._distribution(logits)
        return self.value_net(hidden), distribution.log_prob(actions), distribution.entropy()

    def get_distribution(self, obs) -> Distribution:
        return self._distribution(self.extract_features(obs)[0])

    def predict_values(self, obs) -> torch.Tensor:
        return self.value_net(self.extract_features(obs)[1])  # (B, 1)


def make_sb3_vec_env(envs: text_env.TextGenVectorEnv, n_envs: int) -> DummyVecEnv:
    """`n_envs` single `TextGenEnv`s sharing `envs`' models, prompts and judge in SB3's `DummyVecEnv`.

    `DummyVecEnv` resets an env as soon as its episode ends (SB3's autoreset), so `TextGenEnv`'s refusal to
    step a finished episode never fires; the finished episode's info (rm_score, kl, ...) comes with that step.
    """
    return DummyVecEnv([lambda: text_env.TextGenEnv.sharing(envs) for _ in range(n_envs)])


class EpisodeStatsCallback(BaseCallback):
    """Collects the env's end-of-episode info during SB3's rollouts, and times collection alone."""

    def __init__(self) -> None:
        super().__init__()
        self.episodes: dict[str, list[float]] = {"rm_score": [], "kl": [], "gold_score": [], "length": []}
        self.collect_seconds, self.collect_steps = 0.0, 0  # SB3's collection alone, summed over rollouts
        self._start, self._steps_at_start = 0.0, 0

    def _on_rollout_start(self) -> None:
        self._start, self._steps_at_start = time.perf_counter(), self.model.num_timesteps

    def _on_rollout_end(self) -> None:
        self.collect_seconds += time.perf_counter() - self._start
        self.collect_steps += self.model.num_timesteps - self._steps_at_start

    def _on_step(self) -> bool:
        for done, info in zip(self.locals["dones"], self.locals["infos"], strict=True):
            if done:
                for key in ("rm_score", "kl", "gold_score"):
                    self.episodes[key].append(info[key])
                self.episodes["length"].append(info["response_length"])
        return True


# --------------------------------------------------------------------------------------------------------
# The agents
# --------------------------------------------------------------------------------------------------------
class _SB3Agent:
    """What SB3's PPO and A2C agents share; a subclass names the algorithm and its keyword arguments."""

    name = "sb3"
    Config = SB3Config
    algorithm: type[OnPolicyAlgorithm]

    def _algorithm_kwargs(self) -> dict[str, Any]:
        raise NotImplementedError

    def __init__(self, envs: text_env.TextGenVectorEnv, config: SB3Config):
        self.envs, self.config, self.history = envs, config, []
        device = next(envs.policy.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.vec_env = make_sb3_vec_env(envs, config.n_envs)
        self.model = self.algorithm(
            LMActorCriticPolicy,
            self.vec_env,
            policy_kwargs={
                "lm": envs.policy,
                "sampling": envs.sampling,
                "response_start": envs.response_start,
            },
            n_steps=config.n_steps,
            learning_rate=config.learning_rate,
            gamma=config.gamma,
            gae_lambda=config.gae_lambda,
            ent_coef=config.ent_coef,
            vf_coef=config.vf_coef,
            max_grad_norm=config.max_grad_norm,
            normalize_advantage=config.normalize_advantage,
            seed=config.seed,
            device=device,
            verbose=0,
            **self._algorithm_kwargs(),
        )
        self.policy: LMActorCriticPolicy = self.model.policy
        envs.set_policy(self.policy.lm)  # already the same object; explicit, as the protocol asks
        self._iteration_number = 0  # the iteration in progress, for the NaN guard's message
        # SB3 owns backward() and step(); a hook stops a NaN/inf loss (hence gradient) before the weights move.
        self.policy.optimizer.register_step_pre_hook(self._check_gradients)

    def _check_gradients(self, optimizer, args, kwargs) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norm = torch.stack([g.norm() for g in grads]).norm()
            check_finite(norm, "SB3 loss (its gradient norm)", self._iteration_number)

    @property
    def value_head(self) -> nn.Linear:
        return self.policy.value_net

    def learn(
        self, iterations: int | None = None, callback: Callback | None = None
    ) -> list[dict[str, float]]:
        """Per iteration: `model.learn(timesteps_per_iteration)`, then one KV-cached evaluation batch."""
        return run_iterations(self, self._iteration, iterations, callback)

    def _iteration(self, iteration: int) -> Iteration:
        """SB3 collects and updates (its tokens are the cost); fresh episodes then measure the policy."""
        self._iteration_number = iteration  # for the NaN guard in `_check_gradients`
        stats, reset = EpisodeStatsCallback(), iteration == 1
        timesteps_before = 0 if reset else self.model.num_timesteps  # SB3 counts from 0 after a reset
        self.model.learn(
            total_timesteps=self.config.timesteps_per_iteration,
            callback=stats,
            reset_num_timesteps=reset,
            progress_bar=False,
        )
        batch = text_env.rollout(self.envs, generator=self.generator)  # B = envs.num_envs fresh episodes
        metrics = self._train_metrics(stats) | {"eval_tokens": float(batch.num_tokens)}
        return Iteration(batch, self.model.num_timesteps - timesteps_before, metrics)

    def _train_metrics(self, stats: EpisodeStatsCallback) -> dict[str, float]:
        """SB3's collection episodes and its last update's losses (`train/...` in SB3's logger)."""
        out = {f"train_{k}": float(np.mean(v)) if v else float("nan") for k, v in stats.episodes.items()}
        out["train_episodes"] = float(len(stats.episodes["kl"]))
        out["sb3_collect_tokens_per_s"] = stats.collect_steps / max(stats.collect_seconds, 1e-9)
        for key, value in self.model.logger.name_to_value.items():
            if key.startswith("train/"):
                out["sb3_" + key.removeprefix("train/")] = float(value)
        return out

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return act_with_policy(self.envs.policy, obs, self.generator, envs=self.envs)

    def evaluate(self, num_episodes: int = 256, seed: int = 0) -> dict[str, float]:
        return evaluate_policy(self.envs, num_episodes=num_episodes, seed=seed)

    def save(self, path: str | Path) -> None:
        """The LM as a Hugging Face directory plus `value_head.safetensors`; SB3's zip (partly pickled) is not
        written. The optimiser state is not saved: `load` then `learn` restarts Adam's moments."""
        save_policy(self.envs.policy, self.envs.tokenizer, path)
        save_tensors(self.value_head.state_dict(), Path(path) / VALUE_HEAD_FILE)

    def load(self, path: str | Path) -> None:
        """Load weights saved by `save` into the live LM and value head (safetensors, never a pickle)."""
        load_policy(self.envs.policy, path)
        head = Path(path) / VALUE_HEAD_FILE
        if head.is_file():  # a checkpoint from another agent has no value head: keep the current one
            self.value_head.load_state_dict(load_tensors(head, device=self.policy.device))

    def state_dict(self) -> dict[str, Any]:
        """What the next iterations depend on, for a checkpoint, taken from SB3 piece by piece (its own `save`
        writes a zip with pickled parts): the policy (LM and value head) and its optimiser, SB3's counters
        (`num_timesteps`, `_n_updates`), the observation and episode starts its next rollout continues from
        (collection stops at a step count, mid-episode), each single env's episode in progress and prompt
        RNG, the evaluation sampler, the env's state, and the metrics so far.

        Not saved: SB3's rollout buffer, which every collection refills from scratch; SB3's logger, made
        anew by every `model.learn`. SB3 samples actions and shuffles minibatches with torch's and numpy's
        global RNGs, which the trainer saves (`rlhf_base.checkpoint.global_rng_state`); with them restored
        a resumed run repeats the uninterrupted one exactly.
        """
        model = self.model
        return {
            "policy": self.policy.state_dict(),
            "optimizer": self.policy.optimizer.state_dict(),
            "num_timesteps": int(model.num_timesteps),
            "n_updates": int(model._n_updates),
            "last_obs": None if model._last_obs is None else dict(model._last_obs),
            "last_episode_starts": model._last_episode_starts,
            "single_envs": [env.state_dict() for env in self.vec_env.envs],
            "generator": self.generator.get_state(),
            "env": env_state(self.envs),
            "history": [dict(row) for row in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a `state_dict()` into this agent (same env and config), in place.

        SB3 seeded its vec env for a first `reset()` when the agent was built; that reset only comes with
        iteration 1 (`reset_num_timesteps`), so after a resume the restored observation is used instead.
        """
        model = self.model
        self.policy.load_state_dict(state["policy"])
        self.policy.optimizer.load_state_dict(state["optimizer"])
        model.num_timesteps, model._n_updates = state["num_timesteps"], state["n_updates"]
        last_obs = state["last_obs"]
        model._last_obs = None if last_obs is None else {k: np.array(v) for k, v in last_obs.items()}
        starts = state["last_episode_starts"]
        model._last_episode_starts = None if starts is None else np.array(starts)
        for env, env_state_ in zip(self.vec_env.envs, state["single_envs"], strict=True):
            env.load_state_dict(env_state_)
        self.generator.set_state(state["generator"])
        load_env_state(self.envs, state["env"])
        self.history = [dict(row) for row in state["history"]]


class SB3PPOAgent(_SB3Agent):
    """SB3's PPO training the env's LM policy; see the module docstring."""

    name = "sb3_ppo"
    Config = SB3PPOConfig
    algorithm = PPO

    def _algorithm_kwargs(self) -> dict[str, Any]:
        c = self.config
        return {
            "batch_size": c.batch_size,
            "n_epochs": c.n_epochs,
            "clip_range": c.clip_range,
            "target_kl": c.target_kl,
        }


class SB3A2CAgent(_SB3Agent):
    """SB3's A2C training the env's LM policy; see the module docstring."""

    name = "sb3_a2c"
    Config = SB3A2CConfig
    algorithm = A2C

    def _algorithm_kwargs(self) -> dict[str, Any]:
        return {"use_rms_prop": self.config.use_rms_prop}
