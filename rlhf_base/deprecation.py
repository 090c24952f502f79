"""Keep moved public names working for a release, with a warning that names their new home.

The layering redesign (issue 11) moved modules between packages. The old import paths stay importable
through one-line alias modules: `alias_module` makes the old name the new module itself (so `mock.patch`
and `isinstance` see one object), `moved_names` forwards some attributes of a module that was split.
New imports are resolved by name at run time, so a lower floor's alias does not import a higher floor
until someone uses the old path; `MOVED` lists every alias, and the layering test checks nothing else
does so.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

__all__ = ["MOVED", "REMOVED_IN", "alias_module", "moved_names"]

REMOVED_IN = "0.3"

#: old module -> where its contents (or some of its names) live now.
MOVED: dict[str, str] = {
    "rlhf_gym.maths": "rlhf_base.maths",
    "rlhf_gym.io": "rlhf_base.io",
    "rlhf_gym.config": "rlhf_base.config",
    "rlhf_gym.optim": "rlhf_base.optim",
    "text_env.models": "rlhf_base.models (tiny_gpt2, TinyConfig: text_env.tasks.reviews.model)",
    "text_env.scoring": "rlhf_base.lm (forward-pass helpers), text_env.judge (Judge, as_reward_fn)",
    "reward_models.labeller": "rlhf_gym.label",
    "reward_models.commands": "rlhf_gym.cli (the label and train-rm commands)",
    "agents.commands": "rlhf_gym.train (train), rlhf_gym.cli (add_train_command)",
    "agents.sft": "rlhf_gym.sft (SFTConfig, train_sft, run_sft), rlhf_gym.cli (add_sft_command); the loss and "
    "step stay in agents.sft",
    # modules that stay, some of whose names moved to the one CLI module
    "rlhf_gym.sweep": "rlhf_gym.cli (add_sweep_command)",
    "rlhf_gym.pipeline": "rlhf_gym.cli (add_pipeline_command, print_summary)",
    "rlhf_gym.report": "rlhf_gym.cli (add_report_command)",
}


def _caller_level() -> int:
    """The `stacklevel` of the first frame outside this module, the alias module and the import machinery:
    the user's `import` or attribute access. Python shows a DeprecationWarning by default only when it is
    attributed to `__main__`, so pointing at the alias file (or at importlib) would hide it."""
    frame, level = sys._getframe(1), 1
    alias = None
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        filename = frame.f_code.co_filename
        internal = name == __name__ or filename.startswith("<frozen") or name.startswith("importlib")
        if not internal and alias is None and frame.f_code.co_name == "<module>" and name in MOVED:
            alias, internal = name, True  # the alias module's own body (alias_module's caller)
        if not internal:
            return level
        # warnings.warn itself skips the import machinery's frames when it counts `stacklevel`
        skipped = "importlib" in filename and "_bootstrap" in filename
        frame, level = frame.f_back, level + (0 if skipped else 1)
    return level


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"{old} has moved to {new}; the old name will be removed in rlhf-gym {REMOVED_IN}",
        DeprecationWarning,
        stacklevel=_caller_level(),
    )


def alias_module(old: str, new: str) -> ModuleType:
    """Make module `old` an alias of module `new` (called from `old`'s own, otherwise empty, file)."""
    _warn(old, new)
    module = importlib.import_module(new)
    sys.modules[old] = module  # the import system returns this object for `old` from now on
    return module


def moved_names(old: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that forwards each moved attribute name to its new module, with a warning."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        _warn(f"{old}.{name}", f"{names[name]}.{name}")
        return getattr(importlib.import_module(names[name]), name)

    return __getattr__
