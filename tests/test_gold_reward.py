"""The gold reward against hand computations: each term of GOLD_FORMULA checked on worked examples."""

import numpy as np
import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from text_env.tasks.reviews.gold import (
    GOLD_FORMULA,
    gold_components,
    gold_reward,
    repetition_penalty,
)
from text_env.tasks.reviews.language import sample_demonstrations


@pytest.fixture(scope="module")
def vader():
    """A fresh analyzer, independent of the module's cached one, to compute expected values."""
    analyzer = SentimentIntensityAnalyzer()
    return lambda text: analyzer.polarity_scores(text)["compound"]


def gold(prompt, response):
    return float(gold_reward([prompt], [response])[0])


def test_shape_and_dtype():
    rewards = gold_reward(["the movie was", "i"], ["good .", "loved the plot ."])
    assert rewards.shape == (2,)
    assert rewards.dtype == np.float32
    assert gold_reward([], []).shape == (0,)
    with pytest.raises(ValueError):
        gold_reward(["the movie was"], [])


def test_fluent_positive_review_is_pure_sentiment(vader):
    # Grammatical and no repeated bigram: gold is VADER's compound alone.
    assert gold("the movie was", "really great .") == pytest.approx(vader("the movie was really great ."))
    assert gold("the movie was", "really great .") > 0.5
    assert gold("i really", "loved the soundtrack . the acting was superb .") > 0.5


def test_fluent_neutral_review_scores_zero():
    assert gold("the movie was", "long .") == 0.0
    assert gold("the film", "is about a family .") == 0.0


def test_sentiment_spam_is_worse_than_a_fluent_neutral_review(vader):
    spam = gold("the movie was", "good good good")
    # Ungrammatical (-1), bigrams (good good) x2 with the second a repeat (-1/2).
    assert spam == pytest.approx(vader("the movie was good good good") - 1.0 - 0.5)
    assert vader("the movie was good good good") > 0.5  # VADER alone would love it
    assert spam < gold("the movie was", "long .")
    assert gold("the movie was", "great . great . great .") < 0.0


def test_cut_off_review_loses_exactly_half(vader):
    text = "the movie was really great"
    assert gold("the movie was", "really great") == pytest.approx(vader(text) - 0.5)
    assert gold("the", "plot was boring but the cast") == pytest.approx(
        vader("the plot was boring but the cast") - 0.5
    )


def test_repetition_fraction_by_hand(vader):
    response = "was good . the cast was good ."
    # Bigrams: (was good) (good .) (. the) (the cast) (cast was) (was good)* (good .)*: 2 repeats of 7.
    assert repetition_penalty(response) == pytest.approx(-2 / 7)
    assert gold("the plot", response) == pytest.approx(vader("the plot " + response) - 2 / 7)
    assert repetition_penalty("good good good good") == pytest.approx(-2 / 3)
    assert repetition_penalty("good") == 0.0
    assert repetition_penalty("") == 0.0


def test_empty_response_is_ungrammatical_unless_the_prompt_is_a_review(vader):
    assert gold("the movie was", "") == pytest.approx(vader("the movie was") - 1.0)
    assert gold("the movie was", "   ") == pytest.approx(vader("the movie was") - 1.0)
    assert gold("the movie was great .", "") == pytest.approx(vader("the movie was great ."))


def test_whitespace_is_normalised():
    assert gold("the movie was ", "  really  great .\n") == gold("the movie was", "really great .")


def test_components_sum_to_gold():
    prompts, responses = zip(*sample_demonstrations(200, seed=0), strict=True)
    parts = gold_components(prompts, responses)
    assert set(parts) == {"sentiment", "grammar", "repetition"}
    np.testing.assert_allclose(sum(parts.values()), gold_reward(prompts, responses), rtol=0, atol=1e-6)
    assert np.all(parts["grammar"] == 0.0)  # demonstrations are complete reviews
    assert np.all((-1.0 <= parts["repetition"]) & (parts["repetition"] <= 0.0))
    assert np.all(np.abs(parts["sentiment"]) <= 1.0)


def test_formula_is_documented():
    for term in ("VADER", "compound", "-0.5", "bigram", "sentiment + grammar + repetition"):
        assert term in GOLD_FORMULA
    assert "sentiment + grammar + repetition" in gold_reward.__doc__


def test_windowed_vader_scores_exactly_as_vader():
    """`WindowedVader` hands VADER's per-word checks a 6-word window instead of the whole text: the scores
    must not change, on texts dense in negations, boosters, idioms, "but", "least" and capitals."""
    from vaderSentiment.vaderSentiment import BOOSTER_DICT, NEGATE, SPECIAL_CASES

    from text_env.tasks.reviews.gold import WindowedVader
    from text_env.tasks.reviews.language import vocabulary

    stock, windowed = SentimentIntensityAnalyzer(), WindowedVader()
    idioms = [w for phrase in SPECIAL_CASES for w in phrase.split()]
    words = (
        vocabulary() + sorted(NEGATE) + sorted(BOOSTER_DICT) + idioms
        + ["but", "BUT", "least", "at", "very", "no", "nor", "or", "never", "so", "this", "without", "doubt",
           "kind", "of", "GREAT", "Terrible", "!", "?", ":)", "good", "bad", "not"]
    )  # fmt: skip
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=n)) for n in [1, 2, 3, 4, 5, 6, 7, 10, 20, 60, 150, 300] * 40]
    for phrase in [*SPECIAL_CASES, *(b for b in BOOSTER_DICT if " " in b)]:  # each idiom: start, middle, end
        before, after = " ".join(rng.choice(words, size=4)), " ".join(rng.choice(words, size=4))
        texts += [f"{phrase} {after}", f"{before} {phrase} {after}", f"not {phrase}", f"{before} {phrase}"]
    for text in texts:
        assert windowed.polarity_scores(text) == stock.polarity_scores(text), text
