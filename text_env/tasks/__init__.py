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

from rlhf_base.io import DataError, read_records
from rlhf_base.plugins import PluginError, check_arity, is_import_spec, load_object

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


def _prompts_from_source(source: Any) -> Any:
    """Resolve a config string naming prompts: `module:attr` (a list, a Dataset, or a function returning
    one), `hf:NAME[@SPLIT]` (`datasets.load_dataset`, split "train" by default), a folder written by
    `Dataset.save_to_disk`; anything else is left to `read_records` (a JSONL/JSON/CSV/Parquet file)."""
    if is_import_spec(source):
        obj = load_object(source, "prompts")
        if callable(obj) and not isinstance(obj, type):
            check_arity(obj, 0, f"prompts {source!r}", "a function of no arguments")
            obj = obj()
        return obj
    if isinstance(source, str) and source.startswith("hf:"):
        import datasets

        name, _, split = source.removeprefix("hf:").partition("@")
        return datasets.load_dataset(name, split=split or "train")
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        import datasets

        try:
            return datasets.load_from_disk(str(source))
        except FileNotFoundError as e:
            raise DataError(
                f"prompts: {source} is a folder but not a dataset saved with Dataset.save_to_disk ({e}); "
                "give a JSONL/JSON/CSV/Parquet file, 'hf:NAME[@SPLIT]' or 'module:attr'"
            ) from None
    return source


def load_prompts(source: Sequence[str] | str | os.PathLike | Any) -> tuple[str, ...]:
    """Prompts from a list of strings, a JSONL/JSON/CSV/Parquet file or a `datasets.Dataset` (field "prompt").

    A string may also name a Python object, `module:attr` (a list of strings, a Dataset, or a function of
    no arguments returning one), a hub dataset `hf:NAME[@SPLIT]`, or a folder saved by
    `Dataset.save_to_disk`.
    """
    source = _prompts_from_source(source)
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


def _task_from_spec(spec: str) -> Task:
    """A user's task named `module:attr`: a `Task`, or a function of no arguments returning one."""
    obj = load_object(spec, "task")
    if callable(obj) and not isinstance(obj, Task):
        check_arity(obj, 0, f"task {spec!r}", "a function of no arguments returning a Task")
        obj = obj()
    if not isinstance(obj, Task):
        raise PluginError(
            f"task {spec!r} is a {type(obj).__name__}; expected a text_env.tasks.Task (prompts, optional "
            "gold_reward) or a function returning one"
        )
    return obj


def get_task(task: str | Task = "reviews", prompts: Any = None, *, keep_gold: bool = False) -> Task:
    """Resolve a task by name (built-in, or `module:attr` of a user's `Task`) or object.

    `prompts` replaces its prompts. The task's gold reward judges the task's own prompts, so with other
    prompts it is dropped (the env then logs gold_score as NaN and reports say "no gold") unless
    `keep_gold` says the user's prompts are of the same kind.
    """
    if isinstance(task, str):
        if task in TASKS:
            task = TASKS[task]()
        elif is_import_spec(task):
            task = _task_from_spec(task)
        else:
            raise ValueError(
                f"unknown task {task!r}; available tasks: {sorted(TASKS)}, or a user's Task as 'module:attr'"
            )
    elif not isinstance(task, Task):
        raise TypeError(f"task must be a task name, 'module:attr' or a Task; got {type(task).__name__}")
    if prompts is not None:
        gold = task.gold_reward if keep_gold else None
        description = task.description if keep_gold else f"{task.name} with user prompts (no gold reward)"
        task = Task(task.name, load_prompts(prompts), gold, description)
    elif not task.prompts:
        raise ValueError(f"task {task.name!r} has an empty prompt set: give at least one prompt")
    return task
