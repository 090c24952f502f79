"""Deprecated: split by the layering redesign into `rlhf_base.lm` (forward-pass helpers for any causal LM)
and `text_env.judge` (`Judge`, `as_reward_fn`)."""

from rlhf_base.deprecation import moved_names

_LM = ("CALL_OVERHEAD_TOKENS", "by_response_length", "call_overhead_tokens", "length_groups",
       "position_ids_from_mask", "response_logprobs", "teacher_forced", "token_logprobs")  # fmt: skip
__getattr__ = moved_names(
    __name__,
    {**{name: "rlhf_base.lm" for name in _LM}, "Judge": "text_env.judge", "as_reward_fn": "text_env.judge"},
)
