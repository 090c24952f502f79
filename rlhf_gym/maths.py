"""Deprecated alias of `rlhf_base.maths` (moved to floor 1 by the layering redesign)."""

from rlhf_base.deprecation import alias_module

alias_module(__name__, "rlhf_base.maths")
