"""Deprecated alias of `rlhf_gym.train`: the `train` command is a stage, so it moved to the top floor."""

from rlhf_base.deprecation import alias_module

alias_module(__name__, "rlhf_gym.train")
