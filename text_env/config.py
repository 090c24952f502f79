"""`EnvConfig`: the env as a typed config, for commands and sweeps that build envs from YAML."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from rlhf_base.ranges import Range, check_ranges
from text_env.core import EnvCore
from text_env.judge import KL_ESTIMATOR_MOVED
from text_env.speed import SpeedOptions
from text_env.vector_env import TextGenVectorEnv

__all__ = ["EnvConfig"]


@dataclass
class EnvConfig:
    """What `TextGenVectorEnv` is built from (see `EnvCore` for the meaning of each).

    `kl_estimator` was a setting here (the env's reward and logged kl used it); the env now always uses k1
    and the agents choose what they optimise, so naming it is an error that says where (`MOVED_KEYS`).
    """

    MOVED_KEYS: ClassVar[dict[str, str]] = {"kl_estimator": KL_ESTIMATOR_MOVED}
    RANGES: ClassVar[dict[str, Range]] = {
        "beta": Range(ge=0),  # 0: no KL penalty; a negative one would pay the policy to drift
        "max_new_tokens": Range(ge=1),
        "min_new_tokens": Range(ge=0),  # and <= max_new_tokens (__post_init__)
        "temperature": Range(gt=0),  # 0 would divide the logits by zero
        "num_envs": Range(ge=1),
        "reward_uwo_lambda": Range(ge=0),
    }

    task: str = "reviews"  # a built-in task name, or a user's Task as "module:attr"
    # None = the task's own prompts; a JSONL/JSON/CSV/Parquet file (field "prompt"), a saved Dataset folder,
    # "hf:NAME[@SPLIT]", or "module:attr" (a list of strings, a Dataset, or a function returning one)
    prompts: str | None = None
    model: str | None = None  # pi_ref: None = tiny-reviews, else an SFT output / HF model dir / hub id
    # The reward agents optimise: None = the task's gold reward; a saved reward model or HF sequence
    # classifier folder; "module:function" (prompts, responses) -> scores; "module:Class" (built with no args)
    reward_model: str | None = None
    # What gold_score logs (evaluation only): None = the task's gold if it judges these prompts (not with
    # user prompts and a reward_model of one's own: then NaN, "no gold"); "task"; "none"; or as reward_model
    gold_reward: str | None = None
    # An ensemble reward_model's combination, overriding the one it was saved with (None: as saved):
    # "mean", "worst" (min over members) or "uwo" (mean - reward_uwo_lambda * variance), so one trained
    # ensemble serves a sweep over all three (Coste et al. 2024); a single reward model refuses it
    reward_combine: Literal["mean", "worst", "uwo"] | None = None
    reward_uwo_lambda: float | None = None  # UWO's weight on the members' variance; None: as saved
    beta: float = 0.05  # KL coefficient of the env reward rm_score - beta * kl (kl: k1, the log-ratio sum)
    max_new_tokens: int = 32  # response length limit
    min_new_tokens: int = 0  # EOS is forbidden before this many tokens (fixed-length runs)
    temperature: float = 1.0  # the task's sampling temperature, applied to the policy and pi_ref alike
    num_envs: int = 64  # rows per batch of episodes
    device: str = "cpu"  # "cpu", "cuda", "auto"
    speed: SpeedOptions = field(default_factory=SpeedOptions)  # speed fixes only (e.g. speed.sampler)

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens={self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}: "
                "EOS would be banned at every step a response has"
            )

    def make(self) -> TextGenVectorEnv:
        core = EnvCore(
            self.task,
            prompts=self.prompts,
            model=self.model,
            reward_model=self.reward_model,
            gold_reward=self.gold_reward,
            reward_combine=self.reward_combine,
            reward_uwo_lambda=self.reward_uwo_lambda,
            beta=self.beta,
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            temperature=self.temperature,
            device=self.device,
            speed=self.speed,
        )
        return TextGenVectorEnv(num_envs=self.num_envs, core=core)
