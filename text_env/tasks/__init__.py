"""Tasks: where prompts come from and, where there is one, the gold reward that stands in for the human.

A task is data, not behaviour: prompts plus an optional gold reward `(prompts, responses) -> scores`. The
gold reward is for evaluation only; agents learn from the reward model the env is given.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlhf_base.io import read_records

__all__ = ["TASKS", "RewardFn", "Task", "get_task", "load_prompts", "reviews_task"]

#: A reward model in its plainest form: prompts and responses in, one score per pair out.
RewardFn = Callable[[Sequence[str], Sequence[str]], Any]


@dataclass(frozen=True)
class Task:
    """Prompts for episodes, and the gold reward where the task has one."""

    name: str  # how runs and reports refer to the task
    prompts: tuple[str, ...]  # episode openings; reset() draws one uniformly with the env's np_random
    gold_reward: RewardFn | None = field(default=None, compare=False)  # evaluation only, never for learning
    description: str = ""  # one line for reports


def reviews_task(num_prompts: int = 256, seed: int = 0) -> Task:
    """The embedded default: openings of synthetic movie reviews, gold = VADER sentiment + fluency."""
    from text_env.tasks.reviews import gold_reward, make_prompts

    return Task(
        name="reviews",
        prompts=tuple(make_prompts(num_prompts, seed=seed)),
        gold_reward=gold_reward,
        description="synthetic movie reviews; gold reward = VADER compound sentiment + fluency terms",
    )


#: Built-in tasks by name.
TASKS: dict[str, Callable[[], Task]] = {"reviews": reviews_task}


def load_prompts(source: Sequence[str] | str | os.PathLike | Any) -> tuple[str, ...]:
    """Prompts from a list of strings, a JSONL/JSON/CSV/Parquet file or a `datasets.Dataset` (field "prompt")."""
    if isinstance(source, (list, tuple, np.ndarray)) and all(isinstance(p, str) for p in source):
        prompts = tuple(source)
    else:
        prompts = tuple(
            record["prompt"] for record in read_records(source, required=["prompt"], what="prompt")
        )
    if not prompts:
        raise ValueError("the prompt set is empty: give at least one prompt (a non-empty string)")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ValueError(f"prompts must be non-empty strings; prompt(s) at index {empty[:10]} are empty")
    return prompts


def get_task(task: str | Task = "reviews", prompts: Any = None) -> Task:
    """Resolve a task by name or object; `prompts` replaces its prompts (its gold reward is kept)."""
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; available tasks: {sorted(TASKS)}")
        task = TASKS[task]()
    if prompts is not None:
        task = Task(task.name, load_prompts(prompts), task.gold_reward, task.description)
    elif not task.prompts:
        raise ValueError(f"task {task.name!r} has an empty prompt set: give at least one prompt")
    return task
