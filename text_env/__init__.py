"""rlhf-gym's environment: RLHF as an episodic token-level Gymnasium env.

Importing this package registers `text_env/TextGen-v0` with Gymnasium, with `TextGenEnv` as its entry
point and `TextGenVectorEnv` as its `vector_entry_point`:

    import gymnasium as gym
    import text_env
    env = gym.make("text_env/TextGen-v0")
    envs = gym.make_vec("text_env/TextGen-v0", num_envs=64)
"""

from gymnasium.envs.registration import register, registry

from rlhf_base.models import load_causal_lm
from text_env.core import EnvCore
from text_env.env import TextGenEnv
from text_env.sampler import Rollout, rollout
from text_env.sampling import SamplingOptions
from text_env.scores import Scores
from text_env.speed import SpeedOptions
from text_env.tasks import Task, get_task, load_prompts
from text_env.vector_env import TextGenVectorEnv

__all__ = [
    "EnvCore",
    "Rollout",
    "SamplingOptions",
    "Scores",
    "SpeedOptions",
    "Task",
    "TextGenEnv",
    "TextGenVectorEnv",
    "get_task",
    "load_causal_lm",
    "load_prompts",
    "rollout",
]

ENV_ID = "text_env/TextGen-v0"

if ENV_ID not in registry:
    register(
        id=ENV_ID,
        entry_point="text_env.env:TextGenEnv",
        vector_entry_point="text_env.vector_env:TextGenVectorEnv",
        # No max_episode_steps: the length limit is part of the task (termination), not a TimeLimit.
    )
