"""The embedded default task "reviews": a synthetic movie-review language, its tokenizer and gold reward.

It stands in for "a large pretrained LLM + humans" so the whole RLHF pipeline runs offline on a laptop CPU.
"""

from text_env.tasks.reviews.gold import GOLD_FORMULA, gold_components, gold_reward
from text_env.tasks.reviews.language import (
    is_review,
    is_review_prefix,
    make_prompts,
    sample_corpus,
    sample_demonstrations,
    sample_review,
    vocabulary,
)
from text_env.tasks.reviews.tokenizer import build_tokenizer

__all__ = [
    "GOLD_FORMULA",
    "build_tokenizer",
    "gold_components",
    "gold_reward",
    "is_review",
    "is_review_prefix",
    "make_prompts",
    "sample_corpus",
    "sample_demonstrations",
    "sample_review",
    "vocabulary",
]
