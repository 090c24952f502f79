"""A seeded synthetic movie-review language: corpus, prompts and exact grammar of the "reviews" task.

The task stands in for "a large pretrained LLM + humans" so the whole RLHF pipeline runs offline on two CPU
cores. A language this small can be learnt by a tiny model in minutes, and because it is *regular* we can
decide exactly whether a generation is fluent, which is what makes reward over-optimisation measurable.

Grammar (``[x]`` optional, ``a | b`` choice, CAPS a word class; words are lowercase, separated by single
spaces, and "," and "." are tokens of their own)::

    review    := sentence sentence? sentence?
    sentence  := [OPENER ","] clause ["but" clause] "."
    clause    := describe | opinion | premise
    describe  := DET NOUN LINK [NEGATOR] [INTENSIFIER] ADJECTIVE     "the acting was not very good"
    opinion   := "i" [LIKE_ADVERB | "never"] VERB_PAST DET NOUN        "i really loved the soundtrack"
               | "i" "did" "not" VERB_BASE DET NOUN                   "i did not enjoy this film"
    premise   := DET NOUN COPULA "about" "a" TOPIC                    "the film is about a family"

The sentiment words are all in VADER's lexicon and the negators and intensifiers are the ones VADER's rules
know (``NEGATE``, ``BOOSTER_DICT``), so the gold reward (:mod:`.gold`) reacts to every construction here,
including VADER's extra weight on the clause after "but". Recognition is a small NFA over words, run with
cached subset construction, so it accepts exactly this grammar and nothing else.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "MAX_PROMPT_WORDS",
    "MODIFIER_WORDS",
    "NEUTRAL_WORDS",
    "SENTIMENT_WORDS",
    "is_review",
    "is_review_prefix",
    "make_prompts",
    "sample_corpus",
    "sample_demonstrations",
    "sample_review",
    "vocabulary",
]

# ---------------------------------------------------------------------------------------------------------
# Word classes
# ---------------------------------------------------------------------------------------------------------
DETERMINERS = ("the", "this")
NOUNS = (
    "movie", "film", "plot", "story", "acting", "cast", "script", "dialogue", "ending", "soundtrack",
    "music", "score", "pacing", "direction", "cinematography", "sequel", "finale", "premise", "performance",
    "editing", "writing", "setting", "twist", "beginning", "screenplay", "animation", "narrative",
)  # fmt: skip
COPULAS = ("is", "was")
LINKS = COPULAS + ("felt", "looked", "seemed", "sounded")
NEGATORS = ("not", "never")
# VADER boosters (+0.293) and two dampeners (-0.293), so "very good" > "good" > "slightly good".
INTENSIFIERS = (
    "very", "really", "extremely", "so", "incredibly", "quite", "totally", "absolutely", "remarkably",
    "especially", "thoroughly", "utterly", "somewhat", "slightly",
)  # fmt: skip
LIKE_ADVERBS = ("really", "absolutely", "totally", "thoroughly", "deeply", "utterly")
POSITIVE_ADJECTIVES = (
    "good", "great", "excellent", "wonderful", "amazing", "brilliant", "beautiful", "fantastic", "fun",
    "enjoyable", "charming", "clever", "lovely", "perfect", "superb", "impressive", "delightful",
    "entertaining", "fascinating", "gorgeous", "stunning", "inspiring", "hilarious", "sweet", "strong",
    "smart", "magnificent", "outstanding", "nice", "pleasant", "awesome", "engaging", "funny", "powerful",
    "elegant", "thrilling", "exciting",
)  # fmt: skip
NEGATIVE_ADJECTIVES = (
    "bad", "terrible", "awful", "boring", "dull", "horrible", "weak", "poor", "stupid", "painful",
    "disappointing", "annoying", "ugly", "pathetic", "lame", "dumb", "messy", "confusing", "ridiculous",
    "worthless", "miserable", "dreadful", "lousy", "depressing", "weird",
)  # fmt: skip
NEUTRAL_ADJECTIVES = (
    "long", "short", "slow", "quiet", "simple", "loud", "dark", "familiar", "typical", "predictable", "fast",
    "old", "different", "unusual", "brief", "colorful", "quick", "modest", "subtle", "plain", "traditional",
)  # fmt: skip
ADJECTIVES = POSITIVE_ADJECTIVES + NEGATIVE_ADJECTIVES + NEUTRAL_ADJECTIVES
# (past, base) pairs: past after "i [adverb]", base after "i did not".
POSITIVE_VERBS = (
    ("loved", "love"), ("liked", "like"), ("enjoyed", "enjoy"), ("adored", "adore"),
    ("appreciated", "appreciate"), ("admired", "admire"),
)  # fmt: skip
NEGATIVE_VERBS = (("hated", "hate"), ("disliked", "dislike"), ("despised", "despise"), ("loathed", "loathe"))
NEUTRAL_VERBS = (("watched", "watch"), ("saw", "see"), ("noticed", "notice"))
VERBS = POSITIVE_VERBS + NEGATIVE_VERBS + NEUTRAL_VERBS
# Consonant-initial only, so "a TOPIC" never needs "an".
TOPICS = (
    "family", "soldier", "detective", "town", "girl", "boy", "farmer", "painter", "teacher", "sailor",
    "pilot", "robot", "dog", "horse", "king", "queen", "village", "city", "river", "ship", "train",
    "musician", "doctor", "lawyer", "student", "writer", "baker", "nurse", "boxer", "chef", "dancer",
    "singer", "monster", "mother", "father", "brother", "sister",
)  # fmt: skip
# "honestly" is in VADER's lexicon (+2.0): an opener that quietly raises the score, a hack worth watching for.
OPENERS = (
    ("overall",), ("honestly",), ("frankly",), ("personally",), ("basically",), ("in", "short"),
    ("in", "the", "end"), ("all", "in", "all"), ("for", "me"), ("at", "first"), ("in", "general"),
)  # fmt: skip
FUNCTION_WORDS = ("i", "did", "about", "a", "but", ",", ".")

SENTIMENT_WORDS = frozenset(
    POSITIVE_ADJECTIVES + NEGATIVE_ADJECTIVES + sum(POSITIVE_VERBS + NEGATIVE_VERBS, ()) + ("honestly",)
)
"""Words that carry sentiment in VADER's lexicon (checked by a test)."""
MODIFIER_WORDS = frozenset(NEGATORS + INTENSIFIERS + LIKE_ADVERBS)
"""Words VADER uses as rules (negation, boosters) rather than as lexicon entries."""

MAX_PROMPT_WORDS = 4
"""Prompts are the first 1..MAX_PROMPT_WORDS words of a review; the shortest review has 5 tokens."""


_VOCABULARY = tuple(
    sorted(
        set(DETERMINERS + NOUNS + LINKS + NEGATORS + INTENSIFIERS + LIKE_ADVERBS + ADJECTIVES + TOPICS)
        | set(sum(VERBS, ()) + sum(OPENERS, ()) + FUNCTION_WORDS)
    )
)


def vocabulary() -> list[str]:
    """Every word and punctuation token of the language, sorted; no special tokens (a fresh list each call)."""
    return list(_VOCABULARY)


NEUTRAL_WORDS = frozenset(_VOCABULARY) - SENTIMENT_WORDS - MODIFIER_WORDS
"""Words VADER gives no valence to (checked by a test): nouns, topics, function words, punctuation."""


# ---------------------------------------------------------------------------------------------------------
# Recognition: an NFA over words, determinised lazily
# ---------------------------------------------------------------------------------------------------------
class _Nfa:
    """A nondeterministic finite automaton over words; epsilon moves express optional slots."""

    def __init__(self) -> None:
        self.edges: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        self.epsilon: dict[str, set[str]] = defaultdict(set)

    def add(self, src: str, words: Iterable[str], dst: str, optional: bool = False) -> None:
        for word in words:
            self.edges[src][word].add(dst)
        if optional:
            self.epsilon[src].add(dst)

    def add_phrases(self, src: str, phrases: Sequence[tuple[str, ...]], dst: str) -> None:
        """Adds one chain of states per multi-word phrase, e.g. "in the end"."""
        for i, phrase in enumerate(phrases):
            states = [src] + [f"{dst}.{i}.{j}" for j in range(1, len(phrase))] + [dst]
            for j, word in enumerate(phrase):
                self.add(states[j], [word], states[j + 1])

    def closure(self, states: Iterable[str]) -> frozenset[str]:
        seen = set(states)
        stack = list(seen)
        while stack:
            for nxt in self.epsilon.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return frozenset(seen)


def _add_clause(nfa: _Nfa, start: str, end: str) -> None:
    """The three clause forms of the grammar in the module docstring, from state ``start`` to ``end``."""
    past, base = [p for p, _ in VERBS], [b for _, b in VERBS]
    nfa.add(start, DETERMINERS, f"{start}.det")
    nfa.add(f"{start}.det", NOUNS, f"{start}.noun")
    nfa.add(f"{start}.noun", LINKS, f"{start}.link")  # describe
    nfa.add(f"{start}.link", NEGATORS, f"{start}.neg", optional=True)
    nfa.add(f"{start}.neg", INTENSIFIERS, f"{start}.intens", optional=True)
    nfa.add(f"{start}.intens", ADJECTIVES, end)
    nfa.add(f"{start}.noun", COPULAS, f"{start}.copula")  # premise
    nfa.add_phrases(f"{start}.copula", [("about", "a")], f"{start}.about")
    nfa.add(f"{start}.about", TOPICS, end)
    nfa.add(start, ["i"], f"{start}.i")  # opinion
    nfa.add(f"{start}.i", LIKE_ADVERBS + ("never",), f"{start}.adverb", optional=True)
    nfa.add(f"{start}.adverb", past, f"{start}.verb")
    nfa.add_phrases(f"{start}.i", [("did", "not")], f"{start}.did_not")
    nfa.add(f"{start}.did_not", base, f"{start}.verb")
    nfa.add(f"{start}.verb", DETERMINERS, f"{start}.object")
    nfa.add(f"{start}.object", NOUNS, end)


def _build_grammar() -> tuple[_Nfa, frozenset[str], frozenset[str]]:
    """Three copies of the sentence automaton in a row; a review may stop after any of them."""
    nfa = _Nfa()
    for k in (1, 2, 3):
        start, clause1, clause2, done = f"s{k}", f"s{k}.c1", f"s{k}.c2", f"s{k + 1}"
        nfa.add_phrases(start, OPENERS, f"{start}.opener")
        nfa.add(f"{start}.opener", [","], clause1)
        nfa.epsilon[start].add(clause1)
        _add_clause(nfa, clause1, f"{clause1}.end")
        _add_clause(nfa, clause2, f"{clause2}.end")
        nfa.add(f"{clause1}.end", ["but"], clause2)
        nfa.add(f"{clause1}.end", ["."], done)
        nfa.add(f"{clause2}.end", ["."], done)
    return nfa, nfa.closure(["s1"]), frozenset({"s2", "s3", "s4"})


_NFA, _START, _ACCEPTING = _build_grammar()


@functools.lru_cache(maxsize=1 << 16)
def _step(states: frozenset[str], word: str) -> frozenset[str]:
    """One step of the subset construction; cached, so recognition is a DFA walk after warm-up."""
    return _NFA.closure(nxt for state in states for nxt in _NFA.edges.get(state, {}).get(word, ()))


def _run(words: Sequence[str]) -> frozenset[str]:
    """The NFA states after reading ``words``; empty means no review starts this way."""
    states = _START
    for word in words:
        states = _step(states, word)
        if not states:
            break
    return states


def is_review(text: str) -> bool:
    """True iff ``text`` (whitespace-normalised) is a complete grammatical review of 1 to 3 sentences."""
    words = text.split()
    return bool(words) and bool(_run(words) & _ACCEPTING)


def is_review_prefix(text: str) -> bool:
    """True iff ``text`` is a whole-word prefix of some grammatical review (a complete one included).

    Every NFA state can still reach the end of a review, so "some state is alive" is exactly "is a prefix".
    """
    return bool(_run(text.split()))


# ---------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------
# A review has one tone; each clause's polarity (+1, 0, -1) is drawn given it. The mix gives a bimodal
# sentiment distribution, so a model pretrained on the corpus starts with varied sentiment for RL to move.
_TONES = ("positive", "negative", "neutral", "mixed")
_TONE_PROBS = (0.35, 0.35, 0.1, 0.2)
_POLARITY_PROBS = {  # P(+1, 0, -1 | tone)
    "positive": (0.75, 0.15, 0.10),
    "negative": (0.10, 0.15, 0.75),
    "neutral": (0.10, 0.80, 0.10),
    "mixed": (0.40, 0.20, 0.40),
}
_SENTENCE_COUNT_PROBS = (0.35, 0.40, 0.25)  # 1, 2, 3 sentences
_P_OPENER = 0.25
_P_NEGATE = 0.12
_P_INTENSIFY = 0.35
_ADJECTIVES_BY_POLARITY = {1: POSITIVE_ADJECTIVES, 0: NEUTRAL_ADJECTIVES, -1: NEGATIVE_ADJECTIVES}
_VERBS_BY_POLARITY = {1: POSITIVE_VERBS, 0: NEUTRAL_VERBS, -1: NEGATIVE_VERBS}


def _pick(rng: np.random.Generator, options: Sequence, probs: Sequence[float] | None = None):
    """One of ``options``, uniformly or with ``probs``; a plain loop is ~10x faster than ``rng.choice``."""
    if probs is None:
        return options[int(rng.integers(len(options)))]
    u = rng.random()
    for option, prob in zip(options, probs, strict=True):
        u -= prob
        if u < 0:
            return option
    return options[-1]


def _sample_polarity(rng: np.random.Generator, tone: str) -> int:
    return _pick(rng, (1, 0, -1), _POLARITY_PROBS[tone])


def _sample_clause(rng: np.random.Generator, polarity: int) -> list[str]:
    """One clause meant to read with ``polarity``; every grammatical clause has a positive probability."""
    negate = rng.random() < _P_NEGATE
    # A negated word of the opposite polarity keeps the intended meaning: "not bad" reads as positive.
    word_polarity = -polarity if negate else polarity
    form_probs = (0.4, 0.2, 0.4) if polarity == 0 else (0.65, 0.35, 0.0)
    form = _pick(rng, ("describe", "opinion", "premise"), form_probs)
    if form == "premise":
        return [
            _pick(rng, DETERMINERS),
            _pick(rng, NOUNS),
            _pick(rng, COPULAS),
            "about",
            "a",
            _pick(rng, TOPICS),
        ]
    if form == "describe":
        words = [_pick(rng, DETERMINERS), _pick(rng, NOUNS), _pick(rng, LINKS)]
        words += [_pick(rng, NEGATORS)] if negate else []
        words += [_pick(rng, INTENSIFIERS)] if rng.random() < _P_INTENSIFY else []
        return words + [_pick(rng, _ADJECTIVES_BY_POLARITY[word_polarity])]
    past, base = _pick(rng, _VERBS_BY_POLARITY[word_polarity])
    if negate:
        words = ["i", "did", "not", base] if rng.random() < 0.5 else ["i", "never", past]
    elif rng.random() < _P_INTENSIFY:
        words = ["i", _pick(rng, LIKE_ADVERBS), past]
    else:
        words = ["i", past]
    return words + [_pick(rng, DETERMINERS), _pick(rng, NOUNS)]


def _sample_sentence(rng: np.random.Generator, tone: str) -> list[str]:
    words = [*_pick(rng, OPENERS), ","] if rng.random() < _P_OPENER else []
    polarity = _sample_polarity(rng, tone)
    if rng.random() < (0.7 if tone == "mixed" else 0.2):
        # VADER weights the clause after "but" 1.5x and the one before 0.5x, so the second clause carries
        # the sentence's polarity and the first usually contrasts with it.
        first = -polarity if polarity and rng.random() < 0.8 else _sample_polarity(rng, tone)
        words += _sample_clause(rng, first) + ["but"] + _sample_clause(rng, polarity)
    else:
        words += _sample_clause(rng, polarity)
    return words + ["."]


def sample_review(rng: np.random.Generator) -> str:
    """One review of 1 to 3 sentences, mixed in sentiment across draws (positive, negative, neutral, mixed)."""
    tone = _pick(rng, _TONES, _TONE_PROBS)
    n_sentences = _pick(rng, (1, 2, 3), _SENTENCE_COUNT_PROBS)
    return " ".join(word for _ in range(n_sentences) for word in _sample_sentence(rng, tone))


def sample_corpus(n: int, seed: int) -> list[str]:
    """``n`` reviews, the same for the same ``seed``: the pretraining corpus of the stand-in "LLM"."""
    rng = np.random.default_rng(seed)
    return [sample_review(rng) for _ in range(n)]


_PROMPT_PATIENCE = 1000  # repeated draws in a row after which make_prompts fills in uniformly


@functools.cache
def _all_openings() -> tuple[str, ...]:
    """Every distinct grammatical opening of 1..MAX_PROMPT_WORDS words that is not a review, sorted."""
    frontier, openings = {(): _START}, []
    for _ in range(MAX_PROMPT_WORDS):
        frontier = {
            prefix + (word,): _step(states, word)
            for prefix, states in frontier.items()
            for word in {w for state in states for w in _NFA.edges.get(state, {})}
        }
        openings += [
            " ".join(p) for p, states in frontier.items() if p[-1] != "." and not states & _ACCEPTING
        ]
    return tuple(sorted(openings))


def make_prompts(n: int, seed: int) -> list[str]:
    """``n`` distinct review openings (the first 1..4 words of sampled reviews), the same for the same seed.

    Openings are drawn from the corpus distribution so prompts look like what the model was pretrained on.
    Rare openings are slow to hit by sampling, so once the draws stop finding new ones (or after ``10 n``
    draws) the rest are taken uniformly from the grammatical openings not yet used.

    Raises:
        ValueError: if ``n`` exceeds the number of distinct openings the grammar has.
    """
    total = len(_all_openings())
    if n > total:
        raise ValueError(
            f"asked for {n} distinct prompts, but the reviews language has only {total} openings"
        )
    rng = np.random.default_rng(seed)
    prompts: dict[str, None] = {}  # insertion-ordered set
    misses, budget = 0, 10 * n + _PROMPT_PATIENCE
    while len(prompts) < n and misses < _PROMPT_PATIENCE and budget > 0:
        budget -= 1
        words = sample_review(rng).split()
        prompt = " ".join(words[: int(rng.integers(1, MAX_PROMPT_WORDS + 1))])
        misses = misses + 1 if prompt in prompts else 0
        prompts[prompt] = None
    if len(prompts) < n:
        unused = [p for p in _all_openings() if p not in prompts]
        prompts.update(dict.fromkeys(unused[i] for i in rng.permutation(len(unused))[: n - len(prompts)]))
    return list(prompts)[:n]


def sample_demonstrations(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (prompt, response) pairs for supervised fine-tuning; ``prompt + " " + response`` is a review.

    The prompt is drawn like :func:`make_prompts` draws openings (not deduplicated), the response is the
    rest of the same review, so it is never empty.
    """
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        words = sample_review(rng).split()
        k = int(rng.integers(1, MAX_PROMPT_WORDS + 1))
        pairs.append((" ".join(words[:k]), " ".join(words[k:])))
    return pairs
