"""`EnvSurface`: the public handles `TextGenEnv` and `TextGenVectorEnv` share, all read from their `EnvCore`.

Agents, samplers and stages read the env through these (and through what `reset`, `step` and
`score_pending` return), never through `env.core` or the episode buffers, so the core can change inside.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from text_env.core import EnvCore
from text_env.sampling import SamplingOptions
from text_env.speed import SpeedOptions
from text_env.tasks import Task

__all__ = ["EnvSurface"]


class EnvSurface:
    """Properties over `self.core`, mixed into both envs (which set `core` in their `__init__`)."""

    core: EnvCore

    @property
    def policy(self) -> PreTrainedModel:
        """The model pi whose log-probs enter the KL term (the agent's, once handed over by `set_policy`)."""
        return self.core.judge.policy

    def set_policy(self, policy: PreTrainedModel) -> None:
        """Hand the env the agent's policy model, so the KL is taken against the model being trained."""
        self.core.judge.policy = policy

    @property
    def reference(self) -> PreTrainedModel:
        """pi_ref, frozen: the KL's other side (with LoRA, the policy with its adapter off)."""
        return self.core.reference

    def set_reference(self, reference: PreTrainedModel) -> None:
        """Make `reference` pi_ref (see `EnvCore.set_reference`); agents with `lora` hand the policy with
        its adapter off, so that pi_ref needs no copy of the weights of its own."""
        self.core.set_reference(reference)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.core.tokenizer

    @property
    def reward_model(self) -> Any:
        """What the env scores responses with: a reward model object, or a plain `(prompts, responses) ->
        scores` callable (the task's gold reward when none was given)."""
        return self.core.reward_model

    @property
    def reward_name(self) -> str:
        """How messages name the reward model: its config value (`reward_model my_pkg:score`, a folder), or
        the task's gold reward. A score it returns that is NaN or inf is refused naming it and the rows."""
        return self.core.judge.reward_name

    @property
    def beta(self) -> float:
        """The KL coefficient of the terminal reward `rm_score - beta * kl`; settable (a finite number >= 0).

        The env owns this one value: an agent that adapts beta (PPO's KL controller) writes it here, so the
        reward the env pays and the agent's own reward use the same beta. Envs built on one shared core
        (`sharing`, `core=`) share it too.
        """
        return self.core.beta

    @beta.setter
    def beta(self, value: float) -> None:
        self.core.beta = value

    @property
    def kl_estimator(self) -> str:
        """Always "k1": the env's `kl` and reward sum log pi - log pi_ref over the response (the true KL
        estimate). Agents choose the KL term they optimise in their own configs (issue 12)."""
        return "k1"

    @property
    def task(self) -> Task:
        """The task: its `name`, `prompts` and `gold_reward` (for evaluation only)."""
        return self.core.task

    @property
    def prompts(self) -> tuple[str, ...]:
        """The task's prompts; `prompt_index` (reset info and options) indexes into them."""
        return self.core.task.prompts

    def check_prompt_index(self, index: Any) -> int:
        """`index` as an int if it names one of `prompts`; a ValueError giving the valid range if not."""
        return self.core.check_prompt_index(index)

    @property
    def max_new_tokens(self) -> int:
        """N: the response length limit; reaching it ends the episode."""
        return self.core.max_new_tokens

    @property
    def min_new_tokens(self) -> int:
        """EOS is not a valid action before this many response tokens (0: a response may end at any step)."""
        return self.core.min_new_tokens

    @property
    def sampling(self) -> SamplingOptions:
        """The task's policy as sampling options (its temperature, EOS banned before `min_new_tokens`).

        Samplers draw from `sampling.logits(policy_logits, step)`, and an agent that re-scores its tokens
        teacher-forced (PPO's ratio, REINFORCE's score function) applies `sampling.logits` to its logits,
        so its log-probs are those of the distribution sampled; the judge scores both sides of the KL
        through it (`text_env.sampling`). Read-only: set at construction (`EnvConfig.temperature`).
        """
        return self.core.sampling

    @property
    def speed(self) -> SpeedOptions:
        """The speed fixes this env's scoring and `text_env.rollout` use (read-only: set at construction)."""
        return self.core.speed

    @property
    def response_start(self) -> int:
        """P: the observation column of the first response token (prompts are left-padded to P columns)."""
        return self.core.prompt_width
