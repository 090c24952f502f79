"""`TextGenVectorEnv`: B episodes in lockstep with batched scoring, the `vector_entry_point` of TextGen-v0."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from rlhf_base.deprecation import REMOVED_IN
from text_env.core import EnvCore
from text_env.episodes import EpisodeBatch
from text_env.scores import Scores
from text_env.surface import EnvSurface

__all__ = ["TextGenVectorEnv"]


class TextGenVectorEnv(EnvSurface, VectorEnv):
    """B copies of `TextGenEnv` sharing one policy, one reference and one reward model.

    ## Autoreset mode: DISABLED, on purpose
    RLHF collects a batch of B complete responses, then learns from it. All B episodes start together at
    `reset()`; rows end at their own EOS and then stay finished (absorbing) until the next `reset()`. This
    keeps the rows aligned with the sampler's KV cache (row i of the cache is row i of the env), which
    NEXT_STEP or SAME_STEP autoreset would break by starting new prompts mid-batch.
    `reset(options={"reset_mask": m})` restarts only the rows where `m` is True, as Gymnasium's DISABLED mode
    prescribes.

    ## Episode End
    A row's episode ends on EOS or when its response reaches `max_new_tokens` (scored, so not a truncation):
    `terminated` is True for that row on that one step, as Gymnasium's vector envs report an episode end
    once. Stepping a finished row again before `reset` is an absorbing no-op: its action is ignored, its
    observation does not change, and it gets reward 0, `terminated` False and `truncated` False (a row
    never truncates). So Gymnasium's own `wrappers.vector.RecordEpisodeStatistics` counts each episode
    once, with its return and length. Which rows have finished is the read-only `done` (B,) array, and
    `all_done` says whether all have; a sampler that loops to the end of the batch reads those (or ORs the
    `terminated` it gets) rather than the last step's `terminated` alone.

    ## Spaces
    `single_observation_space` and `single_action_space` are those of `TextGenEnv`; the batched spaces are
    `batch_space(...)` of them (numpy arrays with a leading B axis; actions `MultiDiscrete([V] * B)`).

    ## Rewards and info
    As `TextGenEnv`, scored in one batched forward per model for all rows that finish on the same step.
    Info follows Gymnasium's vector convention: `info[key]` is a (B, ...) array and `info["_" + key]` the
    mask of rows it is valid for (the rows that finished this step).

    ## Known log-probs
    `step(actions, logprobs=...)` takes log q(action) per row from a sampler that computed them, q being the
    distribution it drew from; rows with every step so supplied are scored without re-running the policy,
    and their KL is that of q against the env's reference (`text_env.sampling`).

    ## Deferred scoring: the batch API
    `step(actions, defer_scoring=True)` ends rows as usual (`terminated` True on their last step) but pays
    them 0 for now and leaves them `pending`; `score_pending()` then scores every pending row in one batched
    forward per model and returns a compact `Scores` record (`rows`, and per row `reward`, `rm_score`, `kl`,
    `gold_score`, `logprobs`, `ref_logprobs`, `prompt`, `response`, `response_length`), not Gymnasium's
    padded info. A sampler that learns only from whole batches uses it: one reference and one reward-model
    forward per batch instead of one per distinct finishing step (rows end at their own EOS, so a batch of 64
    finishes on ~20 different steps). An agent that acts step by step keeps the default, where the terminal
    reward arrives on the terminal step.

    ## Reset options
    `prompt_indices`: (B,) prompts for the reset rows (e.g. k consecutive copies of a prompt for RLOO);
    `reset_mask`: (B,) bool, restart only those rows. Reset info: `prompt_index` (B,) and `prompt` (B,) of
    every row.

    ## Attributes
    `num_envs`, and what `TextGenEnv` shares (`text_env.surface.EnvSurface`): `beta` (settable: the env owns
    the one KL coefficient), `kl_estimator`, `policy` and `set_policy`, `reference` and `set_reference`,
    `tokenizer`, `reward_model`, `task`, `prompts`, `check_prompt_index`, `max_new_tokens`, `min_new_tokens`,
    `sampling`, `response_start`, `speed`. Per row, read-only: `done`, `pending`, and `all_done`. The row flags and
    prompts otherwise come from what `reset` and `step` return; `core` and the episode buffers are not part
    of the contract.
    """

    metadata = {"autoreset_mode": AutoresetMode.DISABLED, "render_modes": []}

    def __init__(self, num_envs: int = 8, task: Any = "reviews", *, core: EnvCore | None = None, **kwargs):
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        self.core = core if core is not None else EnvCore(task, **kwargs)
        self.num_envs = int(num_envs)
        self.single_observation_space = self.core.observation_space
        self.single_action_space = self.core.action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = spaces.MultiDiscrete(np.full(self.num_envs, self.core.vocab_size))
        self._episodes = self.core.new_episodes(self.num_envs)
        self._pending = np.zeros(self.num_envs, dtype=bool)  # (B,) finished, not yet scored (deferred)

    @classmethod
    def sharing(cls, env: Any, num_envs: int) -> TextGenVectorEnv:
        """A vector env of `num_envs` rows on the same models, prompts and judge as `env` (a `TextGenEnv`
        or a `TextGenVectorEnv`, wrapped or not): nothing is copied or loaded again."""
        return cls(num_envs=num_envs, core=env.unwrapped.core)

    @property
    def done(self) -> np.ndarray:
        """(B,) bool: rows whose episode has ended (or that were never reset), until `reset` restarts them
        (a copy). `step`'s `terminated` is True only on the step a row ends; this stays True after it."""
        return self._episodes.done.copy()

    @property
    def pending(self) -> np.ndarray:
        """(B,) bool: rows that ended under `defer_scoring` and await `score_pending()` (a copy)."""
        return self._pending.copy()

    @property
    def episodes(self) -> EpisodeBatch:
        """Deprecated: the env's internal episode buffers. Use what `reset`/`step`/`score_pending` return."""
        warnings.warn(
            "TextGenVectorEnv.episodes is internal and will be removed in rlhf-gym "
            f"{REMOVED_IN}: read the row flags from `done` (or step()'s `terminated`), the prompts from reset()'s "
            "info['prompt_index'], and the scores from score_pending()",
            DeprecationWarning,
            stacklevel=2,
        )
        return self._episodes

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        if isinstance(seed, (list, tuple)):
            seed = seed[0]  # one generator drives all rows' prompt draws
        super().reset(seed=seed)
        options = options or {}
        unknown = set(options) - {"prompt_indices", "reset_mask"}
        if unknown:
            raise ValueError(
                f"unknown reset option(s) {sorted(unknown)}; valid: ['prompt_indices', 'reset_mask']"
            )
        mask = np.ones(self.num_envs, dtype=bool)
        if options.get("reset_mask") is not None:
            mask = np.asarray(options["reset_mask"], dtype=bool)
            if mask.shape != (self.num_envs,):
                raise ValueError(f"reset_mask has shape {mask.shape}; expected ({self.num_envs},)")
        rows = np.flatnonzero(mask)
        if options.get("prompt_indices") is not None:
            indices = np.asarray(options["prompt_indices"], dtype=np.int64)
            if indices.shape != (self.num_envs,):
                raise ValueError(f"prompt_indices has shape {indices.shape}; expected ({self.num_envs},)")
            for i in indices[rows]:
                self.core.check_prompt_index(i)
            indices = indices[rows]
        else:
            indices = self.np_random.integers(len(self.prompts), size=len(rows))
        self._episodes.reset(rows, indices)
        self._pending[rows] = False
        info = {
            "prompt_index": self._episodes.prompt_index.copy(),
            "prompt": np.array([self.prompts[i] for i in self._episodes.prompt_index], dtype=object),
        }
        return self._episodes.observation(), info

    def step(self, actions, logprobs: np.ndarray | None = None, *, defer_scoring: bool = False):
        """Step all rows.

        Args:
            actions: (B,) int token ids; finished rows' entries are ignored.
            logprobs: (B,) optional log q(actions) from a sampler that already has them, q being the
                distribution it drew from (the env's policy, `sampling`, or its own tweak of it: the KL is
                then that of q); scoring then skips the policy's forward pass (the reference's always runs).
            defer_scoring: leave rows that finish now pending (reward 0, no info) for `score_pending()`.
        """
        if not self._episodes.started.all():
            raise RuntimeError("step() called before reset(): call envs.reset() first")
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,) or actions.dtype.kind not in "iu":  # signed or unsigned ints
            raise ValueError(
                f"actions must be an int array of shape ({self.num_envs},), one token id per env; "
                f"got shape {actions.shape} dtype {actions.dtype}"
            )
        active = ~self._episodes.done
        bad = active & ((actions < 0) | (actions >= self.core.vocab_size))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"action {int(actions[row])} of env {row} is outside the vocabulary: "
                f"valid token ids are 0..{self.core.vocab_size - 1}"
            )
        self.core.check_min_new_tokens(actions, self._episodes.num_generated, active)
        if logprobs is not None:
            logprobs = np.asarray(logprobs, dtype=np.float32)
            if logprobs.shape != (self.num_envs,):
                raise ValueError(f"logprobs has shape {logprobs.shape}; expected ({self.num_envs},)")
        finished = self._episodes.append(actions.astype(np.int64, copy=False), logprobs)
        rewards = np.zeros(self.num_envs, dtype=np.float32)
        info: dict[str, Any] = {}
        rows = np.flatnonzero(finished)
        if defer_scoring:
            self._pending[rows] = True
        elif len(rows):
            scores = self.core.score_rows(self._episodes, rows)
            rewards, info = scores.padded_rewards(self.num_envs), scores.vector_info(self.num_envs)
        terminated = finished  # the step each row ends on only: a finished row stepped again is a no-op
        truncated = np.zeros(self.num_envs, dtype=bool)
        return self._episodes.observation(), rewards, terminated, truncated, info

    def score_pending(self) -> Scores:
        """Score every row left pending by `step(..., defer_scoring=True)`, in one batched forward per model.

        Returns:
            The `Scores` of the pending rows (`scores.rows`, ascending; none if nothing was pending): what
            `step` would have paid and reported on their terminal steps, one entry per row.
            `scores.vector_info(num_envs)` and `scores.padded_rewards(num_envs)` give Gymnasium's layout.
            The rows are no longer pending afterwards.
        """
        rows = np.flatnonzero(self._pending)
        if not len(rows):
            return dataclasses.replace(Scores.empty(self.max_new_tokens), num_envs=self.num_envs)
        scores = self.core.score_rows(self._episodes, rows)
        self._pending[rows] = False
        return dataclasses.replace(scores, num_envs=self.num_envs)

    @property
    def all_done(self) -> bool:
        """True once every row's episode has ended (the batch is ready to learn from)."""
        return bool(self._episodes.done.all())
