"""Exact draws for large vocabularies (issue 12): the inverse-CDF sampler against a chi-square test.

A float32 CDF near 1 moves in steps of 6e-8, so at a 49k vocabulary thousands of low-probability tokens
were never drawn (and others drawn too often); past `FLOAT32_CDF_MAX_VOCAB` tokens the CDF and the uniform
are float64. The tiny model's vocabulary keeps the float32 draws bit for bit.
"""

from __future__ import annotations

import torch

from text_env.sampler import FLOAT32_CDF_MAX_VOCAB, sample_categorical


def head_and_tail_probs(vocab: int = 50_000, head: int = 1_000, rare: float = 2e-8) -> torch.Tensor:
    """(1, V) float32: a Zipf head (p ~ 1/k over the first `head` ids) and `vocab - head` rare tokens of
    probability `rare` each after it (a BPE vocabulary lists rare tokens last). A float32 CDF near 1 moves
    in steps of 2**-24 = 6e-8, three times `rare`: most rare tokens get an empty interval."""
    tail = vocab - head
    zipf = 1.0 / torch.arange(1, head + 1, dtype=torch.float64)
    probs = torch.cat([zipf / zipf.sum() * (1 - tail * rare), torch.full((tail,), rare, dtype=torch.float64)])
    return probs.float()[None]


def chi_square_p_value(tokens: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's goodness-of-fit p-value of draws `tokens` against `probs` (V,), tokens pooled from the most
    to the least likely into bins of expected count >= `min_expected` (the chi-square approximation's rule)."""
    probs = probs.double()
    counts = torch.bincount(tokens.flatten(), minlength=len(probs)).double()
    order = torch.argsort(probs, descending=True)
    expected = (probs * len(tokens.flatten()))[order].tolist()
    observed = counts[order].tolist()
    bins_e, bins_o, e, o = [], [], 0.0, 0.0
    for e_i, o_i in zip(expected, observed, strict=True):
        e, o = e + e_i, o + o_i
        if e >= min_expected:
            bins_e.append(e), bins_o.append(o)
            e, o = 0.0, 0.0
    bins_e[-1], bins_o[-1] = bins_e[-1] + e, bins_o[-1] + o  # the rest joins the last bin
    bins_e, bins_o = torch.tensor(bins_e), torch.tensor(bins_o)
    statistic = ((bins_o - bins_e) ** 2 / bins_e).sum()
    dof = torch.tensor(len(bins_e) - 1.0, dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, statistic / 2))


def test_inverse_cdf_draws_a_50k_vocabulary_exactly_by_a_chi_square_test():
    probs = head_and_tail_probs()
    tokens = sample_categorical(probs, torch.Generator().manual_seed(0), num_samples=1_000_000)  # (1, 10^6)
    assert tokens.shape == (1, 1_000_000)
    assert chi_square_p_value(tokens, probs[0]) > 1e-3
    rare_draws = int((tokens >= 1_000).sum())  # expected 10^6 * 49,000 * 2e-8 = 980
    assert abs(rare_draws - 980) < 4 * 980**0.5, "the low-probability tail is reached as often as it should"


def test_the_chi_square_test_fails_a_sampler_that_never_draws_the_tail():
    """The test has power against the failure it guards: 0.1% of the mass (the rare tail) never drawn."""
    probs = head_and_tail_probs()
    head_only = probs.clone()
    head_only[:, 1_000:] = 0
    tokens = sample_categorical(head_only, torch.Generator().manual_seed(0), num_samples=1_000_000)
    assert chi_square_p_value(tokens, probs[0]) < 1e-6


def test_a_float32_cdf_misplaces_the_tail_that_the_float64_one_keeps():
    """The old sampler's mechanism (issue 12): a float32 CDF near 1 moves in steps of 6e-8, so most rare
    tokens get an empty interval (never drawn) and the rest one step each (drawn 3x too often). The CDF's
    interval widths are the distribution the search inverts: compared with p exactly, per token."""
    probs = head_and_tail_probs()[0]
    never, tv = {}, {}
    for dtype in (torch.float32, torch.float64):
        cdf = torch.cat([torch.zeros(1, dtype=dtype), probs.to(dtype).cumsum(-1)])
        widths = cdf.diff().double() / cdf[-1].double()  # (V,) what inverting this CDF draws
        never[dtype] = int((widths[1_000:] == 0).sum())
        tv[dtype] = float((widths - probs.double() / probs.double().sum()).abs().sum() / 2)
    assert never[torch.float32] > 20_000 and never[torch.float64] == 0, never
    assert tv[torch.float32] > 3e-4 and tv[torch.float64] < 1e-10, tv


def test_small_vocabularies_keep_the_fast_float32_draws_bit_for_bit():
    """The tiny model's vocabulary (221) draws exactly what the sampler drew before the float64 path."""
    probs = torch.softmax(torch.randn(64, 221, generator=torch.Generator().manual_seed(0)) * 3, -1)
    assert probs.shape[-1] <= FLOAT32_CDF_MAX_VOCAB
    generator = torch.Generator().manual_seed(1)
    cdf = probs.cumsum(-1)
    u = torch.rand(64, 1, generator=generator) * cdf[:, -1:]
    before = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=220)
    assert torch.equal(sample_categorical(probs, torch.Generator().manual_seed(1)), before)
