"""`TextGenEnv`: one episode is one response to one prompt, written a token at a time."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from text_env.core import EnvCore
from text_env.surface import EnvSurface

__all__ = ["TextGenEnv"]


class TextGenEnv(EnvSurface, gym.Env):
    """Token-level text generation scored by a reward model minus a KL penalty to the reference.

    ## Description
    RLHF step 3 as an episodic MDP (Ziegler et al. 2019; Ouyang et al. 2022): the state is the prompt plus
    the response so far, the action is the next token, and the finished response is judged once.

    ## Action Space
    `Discrete(vocab_size)`: the id of the next token.

    ## Observation Space
    `Dict(input_ids=Box(0, vocab_size - 1, (P + N,), int64), attention_mask=Box(0, 1, (P + N,), int64))`:
    the prompt left-padded into the first P columns, the response so far right-padded after it (response
    token i at column P + i), and the mask of real tokens.

    ## Rewards
    0 at every step but the last. At the last step, `rm_score - beta * kl`: the reward model's score of
    (prompt, response) and the summed per-token KL estimate (k1: `log pi(y_i) - log pi_ref(y_i)`) between
    the policy and the reference, both from one teacher-forced forward pass over the whole response. Both
    are taken through the env's sampling options (`sampling`: its temperature, EOS banned before
    `min_new_tokens`), which define the task's policy: pi_ref acting by them has KL 0. Always k1: it is the
    unbiased KL estimate of the sampled response, and the one estimator that, paid in the reward, climbs
    `E[rm_score] - beta * KL(pi || pi_ref)` (see `rlhf_base.maths.kl_penalty`).

    ## Starting State
    A prompt drawn uniformly from the task with `self.np_random` (or `options={"prompt_index": i}`).

    ## Episode End
    Terminated when the action is EOS or when the response reaches `max_new_tokens` (the limit is part of
    the task: the cut-off response is scored, so it is termination, not a `TimeLimit` truncation). EOS
    before `min_new_tokens` response tokens is an error: the task forbids it.
    `truncated` is always False. Stepping a finished episode without `reset` is an error.

    ## Info
    At the last step: `rm_score`, `kl`, `gold_score` (NaN if the task has none; for evaluation only),
    `prompt`, `response` (text, without EOS), `response_length` (tokens, EOS included), and per-token
    `logprobs`, `ref_logprobs` (arrays of that length). Reset info: `prompt`, `prompt_index`.

    ## Arguments
    See `text_env.core.EnvCore` (task, prompts, model, reference, policy, tokenizer, reward_model, beta,
    max_new_tokens, max_prompt_tokens, min_new_tokens, temperature, device, speed), plus `render_mode`
    ("ansi") and `core` to share an existing core (or `TextGenEnv.sharing(envs)`).

    ## Attributes
    Shared with `TextGenVectorEnv` (`text_env.surface.EnvSurface`): `beta` (settable: the env owns the one
    KL coefficient), `kl_estimator`, `policy` and `set_policy`, `reference` and `set_reference`, `tokenizer`,
    `reward_model`, `task`, `prompts`, `check_prompt_index`, `max_new_tokens`, `min_new_tokens`, `sampling`,
    `response_start`, `speed`.
    Through Gymnasium's wrappers, reach them with `env.unwrapped`, e.g. `env.unwrapped.beta = 0.1`. `core` is
    the shared implementation behind them, not part of the contract.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}  # fps only matters to human-mode viewers

    def __init__(
        self, task: Any = "reviews", *, render_mode: str | None = None, core: EnvCore | None = None, **kwargs
    ):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode {render_mode!r} is not supported; valid: {self.metadata['render_modes']}"
            )
        self.core = core if core is not None else EnvCore(task, **kwargs)
        self.render_mode = render_mode
        self.observation_space = self.core.observation_space
        self.action_space = self.core.action_space
        self._episodes = self.core.new_episodes(1)
        self._last_info: dict[str, Any] = {}

    @classmethod
    def sharing(cls, env: Any, render_mode: str | None = None) -> TextGenEnv:
        """A single env on the same models, prompts and judge as `env` (a `TextGenEnv` or a
        `TextGenVectorEnv`, wrapped or not): nothing is copied or loaded again."""
        return cls(render_mode=render_mode, core=env.unwrapped.core)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        unknown = set(options) - {"prompt_index"}
        if unknown:
            raise ValueError(f"unknown reset option(s) {sorted(unknown)}; valid: ['prompt_index']")
        if "prompt_index" in options:
            index = self.core.check_prompt_index(options["prompt_index"])
        else:
            index = int(self.np_random.integers(len(self.core.task.prompts)))
        self._episodes.reset(np.array([0]), np.array([index]))
        self._last_info = {"prompt": self.core.task.prompts[index], "prompt_index": index}
        return self._episodes.observation(0), dict(self._last_info)

    def step(self, action):
        if not self._episodes.started[0]:
            raise RuntimeError("step() called before reset(): call env.reset() first")
        if self._episodes.done[0]:
            raise RuntimeError(
                "step() called after the episode ended (EOS or max_new_tokens): call env.reset()"
            )
        token = self.core.check_action(action)
        self.core.check_min_new_tokens(np.array([token]), self._episodes.num_generated, np.array([True]))
        finished = self._episodes.append(np.array([token], dtype=np.int64))
        reward, info = 0.0, {}
        if finished[0]:
            scores = self.core.score_rows(self._episodes, np.array([0]))
            info, reward = scores.episode_info(0), float(scores.reward[0])
            self._last_info = {**self._last_info, **info}
        return self._episodes.observation(0), reward, bool(finished[0]), False, info

    def state_dict(self) -> dict[str, Any]:
        """The episode in progress and the prompt RNG's state, for a checkpoint taken mid-episode (SB3 stops
        collecting at a step count, not at an episode's end). Not part of Gymnasium's API; an rlhf-gym
        extension read by `agents.sb3`."""
        return {"np_random": self.np_random.bit_generator.state, "episode": self._episodes.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a `state_dict()` into an env on the same task and settings."""
        self.np_random.bit_generator.state = state["np_random"]
        self._episodes.load_state_dict(state["episode"])

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        ids = self._episodes.input_ids[0][self._episodes.attention_mask[0] == 1]
        return self.core.tokenizer.decode(ids, skip_special_tokens=False)
