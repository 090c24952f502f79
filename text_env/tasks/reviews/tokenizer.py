"""A word-level tokenizer for the reviews language: one id per word, so one env step writes one word.

Word-level ids keep the action space small (a few hundred actions) and make every action a whole word, which
is what the grammar in :mod:`.language` is defined over. Built offline from the vocabulary, never downloaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from text_env.tasks.reviews.language import vocabulary

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["EOS_TOKEN", "MODEL_MAX_LENGTH", "PAD_TOKEN", "SPECIAL_TOKENS", "UNK_TOKEN", "build_tokenizer"]

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
"""The specials take ids 0, 1, 2 in this order; the words follow in sorted order."""
MODEL_MAX_LENGTH = 128
"""Longer than any review (3 sentences of at most 20 tokens) plus its end-of-sequence token."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The Hugging Face tokenizer for the reviews language.

    Prompts are left-padded (``padding_side="left"``) so that in batched generation every row's next token
    is predicted from the last column. No BOS/EOS is added automatically; the env appends ``<eos>`` itself.
    """
    # Imported here so that the language and the gold reward load in well under a second without transformers.
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Join words with single spaces on decode; without an explicit decoder the spacing depends on defaults.
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # keep " ." and " ,": punctuation is a word in this language
    )
