"""Name a user's Python object in a config: `"package.module:attr"`, the entry-point format.

A config file can only hold strings, so a user's reward function, reward class, task or prompt source is
named the way Python packaging names entry points (`module:attr`, the attribute path dotted). One loader
for every such key gives one set of error messages: a missing module, a missing attribute (with the names
the module does have), a module that fails while importing, or a function with the wrong parameters.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections.abc import Callable
from typing import Any

__all__ = ["PluginError", "check_arity", "is_import_spec", "load_object"]

_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class PluginError(ValueError):
    """A `module:attr` name cannot be loaded, or what it names cannot serve; the message says which."""


def is_import_spec(text: Any) -> bool:
    """True for a string shaped `module:attr` that is not an existing file or folder (a path wins)."""
    return isinstance(text, str) and bool(_SPEC.match(text)) and not os.path.exists(text)


def load_object(spec: str, what: str) -> Any:
    """The object `spec` ("package.module:attr.sub") names.

    Args:
        spec: `module:attr`, as in an entry point.
        what: what the object is for, e.g. "env.reward_model", to start every message with.

    Raises:
        PluginError: `spec` is malformed, its module is not importable (named, with the import's own error
            when the module exists but fails), or the attribute is missing (the module's public names listed).
    """
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise PluginError(f"{what}: {spec!r} is not of the form 'package.module:attribute'")
    module_name, _, attr_path = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and module_name.startswith(e.name):
            raise PluginError(
                f"{what}: no module named {e.name!r} (from {spec!r}); is its package installed in this "
                "environment, or its folder on PYTHONPATH?"
            ) from None
        raise PluginError(f"{what}: importing {module_name!r} (from {spec!r}) failed: {e}") from e
    except Exception as e:  # the user's module raised while importing: say so, keep the cause chained
        raise PluginError(
            f"{what}: importing {module_name!r} (from {spec!r}) failed: {type(e).__name__}: {e}"
        ) from e
    obj: Any = module
    for i, part in enumerate(attr_path.split(".")):
        if not hasattr(obj, part):
            owner = ".".join([module_name, *attr_path.split(".")[:i]])
            names = sorted(n for n in dir(obj) if not n.startswith("_"))[:20]
            raise PluginError(f"{what}: {owner!r} has no attribute {part!r} (from {spec!r}); it has: {names}")
        obj = getattr(obj, part)
    return obj


def check_arity(fn: Callable[..., Any], num_args: int, what: str, expected: str) -> None:
    """A PluginError unless `fn` can be called with `num_args` positional arguments.

    Args:
        fn: the function or callable object.
        num_args: how many positional arguments it will be given.
        what: the config key or role, for the message.
        expected: the expected parameters in words, e.g. "(prompts, responses)".
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: it will speak for itself when called
        return
    try:
        signature.bind(*([None] * num_args))
    except TypeError:
        name = getattr(fn, "__qualname__", type(fn).__name__)
        raise PluginError(
            f"{what}: {name}{signature} cannot be called as {expected}: it must take {num_args} positional "
            "argument(s)"
        ) from None
