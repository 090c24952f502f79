"""What the single and the vector env share: models, tokenizer, tokenised prompts, the judge and the spaces.

Built once per env (or once for all B rows of a vector env), so a 64-row vector env holds one policy and
one reference, not 64 of each.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from gymnasium import spaces
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_base.lm import context_length
from rlhf_base.models import frozen_copy, load_causal_lm, resolve_device, trainable_copy
from text_env.episodes import EpisodeBatch
from text_env.judge import KL_ESTIMATOR_MOVED, Judge, as_reward_fn, check_beta
from text_env.rewards import describe_reward, recombine_reward, resolve_reward
from text_env.sampling import SamplingOptions
from text_env.scores import Scores
from text_env.speed import SpeedOptions
from text_env.tasks import Task, get_task

__all__ = ["EnvCore"]


class EnvCore:
    """Models, prompts and scoring for `TextGenEnv` and `TextGenVectorEnv`.

    Args:
        task: a built-in task name ("reviews") or a `Task`.
        prompts: replaces the task's prompts: a list of strings, a JSONL/JSON/CSV/Parquet file with a
            "prompt" field, or a `datasets.Dataset`.
        model: the reference model to load: None/"tiny-reviews" (built-in), a local directory or a hub id.
        reference: an already-loaded reference model (then `tokenizer` is required); overrides `model`.
        policy: the model pi whose log-probs enter the KL; default: a trainable copy of the reference.
            Agents hand theirs with `env.unwrapped.set_policy(model)`.
        tokenizer: the tokenizer, when `reference` is given as an object.
        reward_model: the reward the agents optimise: a callable `(prompts, responses) -> scores`, an
            object with `.score`, or a string: `module:function`, `module:Class` (built with no arguments),
            a saved reward model's folder or a Hugging Face sequence classifier's (`text_env.rewards`);
            default: the task's gold reward (until a learned one is trained), also with user prompts.
        gold_reward: what `gold_score` logs, for evaluation only: None = the task's gold reward, which
            judges the task's own prompts, so with user `prompts` and a `reward_model` of one's own there is
            none (gold_score NaN, reports say "no gold"); "task" keeps the task's gold with user prompts;
            "none" logs none; or any reward as `reward_model` takes.
        reward_combine, reward_uwo_lambda: an ensemble reward_model's combination ("mean", "worst",
            "uwo") and UWO's variance weight, overriding those it was saved with; None: as saved.
        beta: KL coefficient in `reward = rm_score - beta * kl`.
        kl_estimator: only "k1", the sum of log-ratios (kept so that old calls passing it still work): the
            env's `kl` and reward always use it; any other value is an error that names the agents'
            settings (`KL_ESTIMATOR_MOVED`).
        max_new_tokens: response length limit N; reaching it ends the episode (it is part of the task).
        max_prompt_tokens: prompt width P; default: the longest prompt. Longer prompts are an error.
        min_new_tokens: EOS is not a valid action before this many response tokens (as `generate`'s
            min_new_tokens), e.g. for fixed-length runs such as the scaling benchmark; 0 lets a response end
            at any step. Samplers ban it, `step` refuses it, and the reference is scored with it banned
            too, so that pi_ref sampled by the task's rules has KL 0 (`text_env.sampling`).
        temperature: the task's sampling temperature: the policy's and the reference's logits are both
            divided by it (as TRL does), so the KL is between the two tempered distributions and pi_ref
            against itself has KL 0 at any temperature. 1: the models' own distributions.
        device: "cpu", "cuda", or None/"auto".
        speed: the speed fixes the judge and the sampler use (`SpeedOptions`; the defaults are the fast
            path, and no option changes a result beyond float tolerance).
        reward_name: how messages name `reward_model` (a reward returning NaN is refused naming it and the
            rows); default: "reward_model" and its config value, or the task's gold reward. The labeller
            names its judge so.
    """

    def __init__(
        self,
        task: str | Task = "reviews",
        *,
        prompts: Any = None,
        model: str | os.PathLike | None = None,
        reference: PreTrainedModel | None = None,
        policy: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        reward_model: Any = None,
        gold_reward: Any = None,
        reward_combine: str | None = None,
        reward_uwo_lambda: float | None = None,
        beta: float = 0.05,
        kl_estimator: str = "k1",
        max_new_tokens: int = 32,
        max_prompt_tokens: int | None = None,
        min_new_tokens: int = 0,
        temperature: float = 1.0,
        device: str | None = "cpu",
        speed: SpeedOptions | None = None,
        reward_name: str | None = None,
    ) -> None:
        if kl_estimator != "k1":
            raise ValueError(
                f"kl_estimator={kl_estimator!r} is no env setting any more: {KL_ESTIMATOR_MOVED}"
            )
        keep_gold = gold_reward == "task" or (reward_model is None and gold_reward is None)
        self.task = get_task(task, prompts, keep_gold=keep_gold)
        self.device = resolve_device(device)
        # The rewards first: a misnamed reward fails before any model loads.
        if reward_model is None and self.task.gold_reward is None:
            raise ValueError(f"task {self.task.name!r} has no gold reward, so a reward_model=... is required")
        # The object the env scores with (a loaded path becomes its reward model), for callers that need
        # the model itself (e.g. a benchmark timing its forwards); the judge calls its `.score`.
        self.reward_model = (
            self.task.gold_reward
            if reward_model is None
            else resolve_reward(reward_model, self.device, "reward_model")
        )
        if reward_combine is not None or reward_uwo_lambda is not None:
            self.reward_model = recombine_reward(self.reward_model, reward_combine, reward_uwo_lambda)
        if gold_reward in (None, "task"):
            gold = self.task.gold_reward
        elif gold_reward == "none":
            gold = None
        else:
            gold = resolve_reward(gold_reward, self.device, "gold_reward")
        #: The gold reward gold_score logs (None: the task has none here, and gold_score is NaN).
        self.gold_reward = gold
        if reference is None:
            reference, tokenizer = load_causal_lm(model, device=self.device)
            reference = frozen_copy(reference)
        elif tokenizer is None:
            raise ValueError("a reference model given as an object needs its tokenizer: pass tokenizer=...")
        else:
            reference.requires_grad_(False)
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "the tokenizer has no EOS token, so an episode could never end by choice; set one"
            )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if not isinstance(min_new_tokens, (int, np.integer)) or not 0 <= min_new_tokens <= max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be an int in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens!r}"
            )
        self.tokenizer, self.reference = tokenizer, reference
        self.max_new_tokens, self.min_new_tokens = int(max_new_tokens), int(min_new_tokens)
        # The task's policy: what samplers draw from unless an agent tweaks it, and how the judge scores.
        self.sampling = SamplingOptions(
            temperature=temperature, min_new_tokens=self.min_new_tokens, eos_token_id=tokenizer.eos_token_id
        )
        self.speed = SpeedOptions() if speed is None else speed
        if not isinstance(self.speed, SpeedOptions):
            raise TypeError(f"speed must be a text_env.SpeedOptions, got {type(self.speed).__name__}")
        self.vocab_size = int(reference.config.vocab_size)
        self.prompt_ids, self.prompt_mask = self._tokenise_prompts(max_prompt_tokens)
        self.judge = Judge(
            reference=reference,
            policy=policy if policy is not None else trainable_copy(reference),
            reward_fn=as_reward_fn(self.reward_model),
            gold_fn=as_reward_fn(gold) if gold is not None else None,
            reward_name=reward_name
            or (
                f"reward_model {describe_reward(reward_model, self.reward_model)}"
                if reward_model is not None
                else f"the {self.task.name} task's gold reward (the reward model)"
            ),
            gold_name=f"gold_reward {describe_reward(gold_reward, gold)}"
            if gold_reward not in (None, "task")
            else f"the {self.task.name} task's gold reward",
            beta=beta,
            tokenizer=tokenizer,
            speed=self.speed,
            sampling=self.sampling,
        )
        width = self.prompt_width + self.max_new_tokens
        self.observation_space = spaces.Dict(
            {
                "input_ids": spaces.Box(0, self.vocab_size - 1, shape=(width,), dtype=np.int64),
                "attention_mask": spaces.Box(0, 1, shape=(width,), dtype=np.int64),
            }
        )
        self.action_space = spaces.Discrete(self.vocab_size)

    def set_reference(self, reference: Any) -> None:
        """Make `reference` pi_ref for every env on this core: the judge's KL and `envs.reference`.

        A LoRA agent hands the policy with its adapter off (`rlhf_base.lora.AdapterOff`): pi_ref is then
        computed on the policy's own base weights, and the frozen copy this core loaded is released (one
        copy of the weights in the process). It must score the same vocabulary.
        """
        vocab = int(reference.config.vocab_size)
        if vocab != self.vocab_size:
            raise ValueError(
                f"the new reference has a vocabulary of {vocab} tokens, the env's {self.vocab_size}: pi_ref must "
                "score the env's token ids"
            )
        self.reference = reference
        self.judge.reference = reference

    @property
    def beta(self) -> float:
        """The KL coefficient of `reward = rm_score - beta * kl`: the judge's, the one value every env on
        this core scores with."""
        return self.judge.beta

    @beta.setter
    def beta(self, value: float) -> None:
        self.judge.beta = check_beta(value)

    @property
    def prompt_width(self) -> int:
        """P: prompt columns; response token i sits at column P + i."""
        return self.prompt_ids.shape[1]

    def _tokenise_prompts(self, max_prompt_tokens: int | None) -> tuple[np.ndarray, np.ndarray]:
        encoded = self.tokenizer(list(self.task.prompts))["input_ids"]
        lengths = np.array([len(ids) for ids in encoded])
        empty = np.flatnonzero(lengths == 0)
        if len(empty):
            raise ValueError(f"prompt(s) at index {empty[:10].tolist()} tokenise to no tokens")
        width = int(lengths.max()) if max_prompt_tokens is None else int(max_prompt_tokens)
        too_long = np.flatnonzero(lengths > width)
        if len(too_long):
            i = int(too_long[0])
            raise ValueError(
                f"prompt {i} ({self.task.prompts[i][:60]!r}...) has {lengths[i]} tokens, more than "
                f"max_prompt_tokens={width}; {len(too_long)} prompt(s) are too long: shorten them or raise the limit"
            )
        context = context_length(self.reference)
        if context is not None and width + self.max_new_tokens > context:
            raise ValueError(
                f"prompt width {width} + max_new_tokens {self.max_new_tokens} = {width + self.max_new_tokens} "
                f"tokens exceeds the model's context of {context}: use shorter prompts or fewer new tokens"
            )
        ids = np.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encoded), width), dtype=np.int64)
        for i, row in enumerate(encoded):  # once, at construction
            ids[i, width - len(row) :] = row
            mask[i, width - len(row) :] = 1
        return ids, mask

    def new_episodes(self, num_rows: int) -> EpisodeBatch:
        return EpisodeBatch(
            num_rows, self.prompt_ids, self.prompt_mask, self.max_new_tokens,
            self.tokenizer.pad_token_id, self.tokenizer.eos_token_id,
        )  # fmt: skip

    def score_rows(self, episodes: EpisodeBatch, rows: np.ndarray) -> Scores:
        """Score finished `rows` (ascending) of `episodes` in one batched forward per model."""
        prompts = [self.task.prompts[i] for i in episodes.prompt_index[rows]]
        responses = self.tokenizer.batch_decode(
            [episodes.response_ids(r) for r in rows], skip_special_tokens=True
        )
        known = episodes.logprobs[rows] if episodes.has_logprobs[rows].all() else None
        scores = self.judge.score(
            episodes.input_ids[rows],
            episodes.attention_mask[rows],
            self.prompt_width,
            prompts,
            responses,
            known,
        )
        return Scores(
            rows=np.asarray(rows, dtype=np.int64),
            prompt=prompts,
            response=responses,
            response_length=episodes.num_generated[rows].copy(),
            **scores,
        )

    def check_action(self, action: Any) -> int:
        if isinstance(action, np.ndarray) and action.shape == ():
            action = action.item()
        if not isinstance(action, (int, np.integer)) or isinstance(action, bool):
            raise TypeError(f"action must be an int token id in [0, {self.vocab_size}), got {action!r}")
        if not 0 <= action < self.vocab_size:
            raise ValueError(
                f"action {action} is outside the vocabulary: valid token ids are 0..{self.vocab_size - 1}"
            )
        return int(action)

    def check_min_new_tokens(
        self, actions: np.ndarray, num_generated: np.ndarray, active: np.ndarray
    ) -> None:
        """A ValueError if an active row would end with EOS before `min_new_tokens`: the task forbids it.

        Args:
            actions, num_generated, active: (B,) each row's action, response tokens so far, and whether it
                is still generating.
        """
        if self.min_new_tokens == 0:
            return
        early = active & (actions == self.tokenizer.eos_token_id) & (num_generated < self.min_new_tokens)
        if early.any():
            row = int(np.flatnonzero(early)[0])
            raise ValueError(
                f"env {row} chose EOS as response token {int(num_generated[row])}: the env's min_new_tokens="
                f"{self.min_new_tokens} forbids it (sample with the env's options: `envs.sampling`)"
            )

    def check_prompt_index(self, index: Any) -> int:
        """`index` as an int if it names one of the task's prompts; a ValueError saying the range if not."""
        if not isinstance(index, (int, np.integer)) or not 0 <= index < len(self.task.prompts):
            raise ValueError(
                f"prompt_index {index!r} is invalid: valid indices are 0..{len(self.task.prompts) - 1}"
            )
        return int(index)
