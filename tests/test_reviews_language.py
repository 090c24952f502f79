"""The reviews language: its sampler and recogniser agree, prompts and demonstrations are well formed, the
words line up with VADER's lexicon, and the word-level tokenizer round-trips."""

import re

import pytest
from vaderSentiment.vaderSentiment import BOOSTER_DICT, NEGATE, SentimentIntensityAnalyzer

from text_env.tasks.reviews.gold import sentiment
from text_env.tasks.reviews.language import (
    MAX_PROMPT_WORDS,
    MODIFIER_WORDS,
    NEUTRAL_WORDS,
    SENTIMENT_WORDS,
    is_review,
    is_review_prefix,
    make_prompts,
    sample_corpus,
    sample_demonstrations,
    vocabulary,
)
from text_env.tasks.reviews.tokenizer import build_tokenizer

GRAMMATICAL = [
    "the acting was not very good .",
    "i really loved the soundtrack .",
    "honestly , the plot was boring but the cast was great .",
    "the movie was long .",
    "the film is about a family .",
    "in the end , i did not enjoy this film . the movie was long .",
    "i never hated the ending . all in all , this score sounded slightly weird but i liked the twist . "
    "the story was about a dog .",
]
PREFIXES_NOT_REVIEWS = [
    "",
    "the",
    "i really",
    "honestly ,",
    "the movie was",
    "the movie was good",  # complete sentence but for its full stop
    "the film is about a family . the",
    "the plot was boring but",
]
UNGRAMMATICAL = [
    "good good good",
    "the the movie was good .",
    "the movie was very not good .",  # intensifier before negator
    "overall the movie was good .",  # opener without its comma
    "the film felt about a family .",  # a premise needs "is" or "was"
    "i did enjoy the film .",
    "i loved the movie , the cast was good .",
    "the movie was good but .",
    "the movie was good . .",
    "the movie was good . the movie was good . the movie was good . the movie was good .",  # 4 sentences
    "The movie was good .",  # uppercase is not in the language
    "the movie was good!",
]


@pytest.fixture(scope="module")
def corpus():
    return sample_corpus(2000, seed=0)


@pytest.mark.parametrize("text", GRAMMATICAL)
def test_hand_written_reviews_are_reviews_and_prefixes(text):
    assert is_review(text)
    assert is_review_prefix(text)


@pytest.mark.parametrize("text", PREFIXES_NOT_REVIEWS)
def test_unfinished_reviews_are_prefixes_only(text):
    assert is_review_prefix(text)
    assert not is_review(text)


@pytest.mark.parametrize("text", UNGRAMMATICAL)
def test_ungrammatical_text_is_rejected(text):
    assert not is_review(text)
    assert not is_review_prefix(text)


def test_recognition_normalises_whitespace():
    assert is_review("  the movie   was good .\n")
    assert is_review_prefix("\tthe  movie ")


def test_every_sampled_review_is_grammatical(corpus):
    assert all(is_review(review) for review in corpus)
    n_sentences = {review.count(".") for review in corpus}
    assert n_sentences == {1, 2, 3}
    assert all(review == " ".join(review.split()) for review in corpus)  # single spaces, no padding


def test_corpus_is_reproducible():
    assert sample_corpus(50, seed=3) == sample_corpus(50, seed=3)
    assert sample_corpus(50, seed=3) != sample_corpus(50, seed=4)


def test_corpus_is_mixed_in_sentiment(corpus):
    scores = [sentiment(review) for review in corpus]
    positive = sum(s > 0.05 for s in scores) / len(scores)
    negative = sum(s < -0.05 for s in scores) / len(scores)
    assert 0.25 < positive < 0.75
    assert 0.25 < negative < 0.75
    assert 1 - positive - negative > 0.02  # some neutral reviews too
    assert sum(" but " in review for review in corpus) > 200


def test_vocabulary_is_sorted_unique_and_plain():
    words = vocabulary()
    assert words == sorted(set(words))
    assert 150 <= len(words) <= 300
    assert {",", ".", "but", "not", "very"} <= set(words)
    assert not any(w.startswith("<") or not w or w != w.strip().lower() for w in words)


def test_corpus_uses_only_vocabulary(corpus):
    assert {w for review in corpus for w in review.split()} <= set(vocabulary())


def test_word_classes_match_vaders_lexicon():
    lexicon = SentimentIntensityAnalyzer().lexicon
    assert SENTIMENT_WORDS | MODIFIER_WORDS | NEUTRAL_WORDS == set(vocabulary())
    assert not SENTIMENT_WORDS & NEUTRAL_WORDS
    assert not MODIFIER_WORDS & NEUTRAL_WORDS
    assert sorted(w for w in SENTIMENT_WORDS if w not in lexicon) == []
    assert sorted(w for w in NEUTRAL_WORDS if w in lexicon) == []
    # Negators and intensifiers act through VADER's rules, not its lexicon.
    assert sorted(w for w in MODIFIER_WORDS if w in lexicon) == []
    assert all(w in NEGATE or w in BOOSTER_DICT for w in MODIFIER_WORDS)


def test_prompts_are_distinct_unfinished_openings():
    prompts = make_prompts(500, seed=0)
    assert len(prompts) == len(set(prompts)) == 500
    for prompt in prompts:
        assert 1 <= len(prompt.split()) <= MAX_PROMPT_WORDS
        assert is_review_prefix(prompt)
        assert not is_review(prompt)
        assert not prompt.endswith(".")
    assert make_prompts(500, seed=0) == prompts
    assert make_prompts(500, seed=1) != prompts


def test_too_many_prompts_raises_with_the_count():
    with pytest.raises(ValueError, match=re.compile(r"only \d+ openings")):
        make_prompts(10**7, seed=0)


def test_demonstrations_complete_their_prompts():
    demos = sample_demonstrations(500, seed=0)
    assert demos == sample_demonstrations(500, seed=0)
    for prompt, response in demos:
        assert 1 <= len(prompt.split()) <= MAX_PROMPT_WORDS
        assert response.strip()
        assert is_review(prompt + " " + response)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_tokenizer_special_tokens_and_settings(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "<eos>", "<unk>"]
    assert tokenizer.padding_side == "left"
    assert tokenizer.model_max_length == 128
    assert len(tokenizer) == 3 + len(vocabulary())


def test_every_word_has_its_own_id(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(vocabulary())
    assert ids == list(range(3, 3 + len(vocabulary())))
    assert tokenizer("the movie was amazing .")["input_ids"] == tokenizer.convert_tokens_to_ids(
        ["the", "movie", "was", "amazing", "."]
    )
    assert tokenizer("the zzz")["input_ids"][1] == tokenizer.unk_token_id


def test_left_padded_batch_decodes_back_to_the_text(tokenizer, corpus):
    reviews = corpus[:16]
    batch = tokenizer(reviews, padding=True)
    lengths = [sum(mask) for mask in batch["attention_mask"]]
    assert any(length < len(batch["input_ids"][0]) for length in lengths)
    for mask in batch["attention_mask"]:
        assert mask == sorted(mask)  # left padding: zeros first
    decoded = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert decoded == reviews
    assert tokenizer.decode([*tokenizer("i loved the plot .")["input_ids"], 1], skip_special_tokens=True) == (
        "i loved the plot ."
    )


def test_tokenizer_survives_save_and_load(tokenizer, corpus, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    reviews = corpus[:200]
    assert loaded(reviews)["input_ids"] == tokenizer(reviews)["input_ids"]
    assert loaded.padding_side == "left"
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)
    assert loaded.decode(loaded(reviews[0])["input_ids"]) == reviews[0]
