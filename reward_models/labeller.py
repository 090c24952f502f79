"""Deprecated alias of `rlhf_gym.label`: the labeller is a pipeline stage, so it moved to the top floor."""

from rlhf_base.deprecation import alias_module

alias_module(__name__, "rlhf_gym.label")
