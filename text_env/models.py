"""Deprecated: model loading moved to `rlhf_base.models`; `TinyConfig` and `tiny_gpt2` to the reviews task
(`text_env.tasks.reviews.model`), which owns the tiny model."""

from rlhf_base.deprecation import moved_names

_BASE = ("cache_dir", "frozen_copy", "fuse_gelu", "load_causal_lm", "resolve_device", "smollm2_gguf_path",
         "trainable_copy", "builtin_models", "register_model")  # fmt: skip
__getattr__ = moved_names(
    __name__,
    {**{name: "rlhf_base.models" for name in _BASE},
     "TinyConfig": "text_env.tasks.reviews.model", "tiny_gpt2": "text_env.tasks.reviews.model"},
)  # fmt: skip
