"""Every way to name a reward, resolved in one place: the env's `reward_model` and `gold_reward` keys.

A config (YAML, a CLI override, a sweep grid) can only hold strings, so each string form maps to one kind
of reward:

* `"package.module:function"`: a plain function `(prompts, responses) -> scores`;
* `"package.module:Class"`: a class built with no arguments whose instances are such callables or have
  `.score(prompts, responses)` (e.g. a wrapper that loads its own model in `__init__`);
* a folder: a reward model saved by `RewardModel.save` / `rlhf-gym train-rm`, or any Hugging Face
  sequence-classification model (`reward_models.load_reward_model`).

A path that exists wins over the `module:attr` reading. In Python, the object itself (a callable, or
anything with `.score`) may be passed instead of a string.
"""

from __future__ import annotations

import os
from typing import Any

from rlhf_base.plugins import PluginError, check_arity, is_import_spec, load_object

__all__ = ["describe_reward", "recombine_reward", "resolve_reward"]

_EXPECTED = "(prompts, responses) -> one score per response"


def _check_reward_object(obj: Any, what: str) -> Any:
    """`obj` if it can serve as a reward (`.score` or a call with two arguments), else a PluginError."""
    score = getattr(obj, "score", None)
    if callable(score):
        check_arity(score, 2, f"{what} (.score)", _EXPECTED)
        return obj
    if callable(obj):
        check_arity(obj, 2, what, _EXPECTED)
        return obj
    raise PluginError(
        f"{what}: a {type(obj).__name__} is no reward: give a function {_EXPECTED}, a class whose instances "
        "are such callables or have .score(prompts, responses), or a saved reward model's folder"
    )


def resolve_reward(spec: Any, device: Any = "cpu", what: str = "reward_model") -> Any:
    """The reward object `spec` names (see the module docstring); None stays None.

    Args:
        spec: a `module:attr` string, a folder path, or a reward object.
        device: where a loaded reward model goes.
        what: the config key, for messages (e.g. "env.reward_model").

    Raises:
        PluginError: the module or attribute is missing, a class cannot be built with no arguments, or the
            object has the wrong signature.
        FileNotFoundError / ValueError: a path that is not a saved reward model (the message names it).
    """
    if spec is None:
        return None
    if isinstance(spec, (str, os.PathLike)):
        if is_import_spec(spec):
            obj = load_object(str(spec), what)
            if isinstance(obj, type):
                try:
                    obj = obj()
                except TypeError as e:
                    raise PluginError(
                        f"{what}: class {spec!r} cannot be built with no arguments ({e}); give a class whose "
                        "__init__ takes none (it may load its own model), or a function"
                    ) from None
            return _check_reward_object(obj, f"{what} {spec!r}")
        from reward_models import load_reward_model

        return load_reward_model(spec, device=device)
    return _check_reward_object(spec, what)


def recombine_reward(reward: Any, combine: str | None, uwo_lambda: float | None) -> Any:
    """`reward`, an ensemble, under another combination (`reward_combine`, `reward_uwo_lambda`): the same
    members, shared. Anything else is refused, since a single model has no members to combine.

    Raises:
        ValueError: `reward` is not an ensemble, or the combination is unknown.
    """
    recombined = getattr(reward, "recombined", None)
    if recombined is None:
        raise ValueError(
            f"reward_combine={combine!r} / reward_uwo_lambda={uwo_lambda!r} need an ensemble reward_model "
            f"(a folder with ensemble.json, `rlhf-gym train-rm ensemble_size=k`), got {type(reward).__name__}"
        )
    return recombined(reward.combine if combine is None else combine, uwo_lambda)


def describe_reward(spec: Any, resolved: Any) -> str:
    """How messages name a reward: its config string, else its function or class name."""
    if isinstance(spec, (str, os.PathLike)):
        return str(spec)
    return getattr(resolved, "__qualname__", None) or type(resolved).__name__
