"""Length-grouped teacher forcing: the same numbers and gradients as one padded forward, less padding."""

import numpy as np
import pytest
import torch

import text_env
from rlhf_base.lm import by_response_length, length_groups, response_logprobs


def padded_positions(groups, lengths, offset):
    return sum(len(g) * (offset + lengths[g].max()) for g in groups)


def test_length_groups_cover_every_row_once_and_cut_padding():
    lengths = np.array([3, 32, 5, 4, 30, 6, 2, 31, 3, 4, 5, 3])
    groups = length_groups(lengths, width_offset=8, overhead_tokens=10)
    assert sorted(np.concatenate(groups).tolist()) == list(range(12))
    assert padded_positions(groups, lengths, 8) < len(lengths) * (8 + 32)
    # The long rows go together and no group mixes a 30+ row with a row of 6 or fewer.
    assert all(len(set(lengths[g] >= 30)) == 1 for g in groups)
    # A huge call overhead (a GPU) makes one group; none makes one group per distinct length.
    assert len(length_groups(lengths, 8, overhead_tokens=10**6)) == 1
    assert len(length_groups(lengths, 8, overhead_tokens=0)) == len(set(lengths.tolist()))


def test_length_groups_dynamic_programme_is_optimal_on_a_small_case():
    lengths = np.array([10, 9, 2, 1])  # offset 0, overhead 5: {10, 9} + {2, 1} costs 20 + 4 + 10 = 34
    groups = length_groups(lengths, 0, overhead_tokens=5)
    assert sorted(sorted(g.tolist()) for g in groups) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("device_overhead", [0, 48])
def test_grouped_logprobs_and_gradients_equal_the_padded_forward(core, device_overhead):
    from rlhf_base.models import trainable_copy

    envs = text_env.TextGenVectorEnv(num_envs=12, core=core)
    batch = text_env.rollout(envs, seed=1, generator=torch.Generator().manual_seed(1))
    assert batch.lengths.min() < batch.lengths.max()
    model = trainable_copy(core.reference)
    mask, ids, attn, p = batch.response_mask, batch.input_ids, batch.attention_mask, batch.response_start

    def loss_and_grads(logprobs):
        model.zero_grad()
        loss = (logprobs * mask).sum()
        loss.backward()
        return loss.detach(), [q.grad.clone() for q in model.parameters()]

    full = response_logprobs(model, ids, attn, p)
    grouped = by_response_length(
        lambda i, m, s: (response_logprobs(model, i, m, s),), ids, attn, p, overhead_tokens=device_overhead
    )[0]
    torch.testing.assert_close(grouped * mask, full * mask, atol=1e-5, rtol=0)
    assert torch.isfinite(grouped).all()
    loss_full, grads_full = loss_and_grads(full)
    loss_grouped, grads_grouped = loss_and_grads(grouped)
    torch.testing.assert_close(loss_grouped, loss_full, atol=1e-4, rtol=1e-6)
    for a, b in zip(grads_grouped, grads_full, strict=True):
        # fp32 sums over ~200 tokens in another order: equal to ~1e-5 of the tensor's largest entry
        # (a mis-grouped row would be off by O(1) of it)
        torch.testing.assert_close(a, b, atol=1e-4 * float(b.abs().max()), rtol=1e-4)


def test_inverse_cdf_sampling_matches_the_distribution_and_never_draws_a_zero():
    from text_env.sampler import sample_categorical

    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0]]).repeat(20000, 1)  # (40000, 4)
    tokens = sample_categorical(probs, torch.Generator().manual_seed(0)).view(20000, 2)
    freq = torch.bincount(tokens[:, 0], minlength=4).float() / 20000
    torch.testing.assert_close(freq, probs[0], atol=0.01, rtol=0)  # 4 sigma of a binomial at n = 20000
    assert (tokens[:, 1] == 3).all(), "all mass on the last token: the clamp never moves a draw"
    again = sample_categorical(probs, torch.Generator().manual_seed(0)).view(20000, 2)
    assert torch.equal(tokens, again), "the generator makes it reproducible"


def test_call_overhead_grows_with_cpu_threads_and_calls_per_group():
    """A call's fixed cost stays while a position's falls with the threads: the overhead in positions grows."""
    from rlhf_base.lm import CALL_OVERHEAD_TOKENS, call_overhead_tokens

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = call_overhead_tokens(torch.device("cpu"))
        assert one == CALL_OVERHEAD_TOKENS["cpu"]
        assert call_overhead_tokens(torch.device("cpu"), calls=2) == 2 * one
        torch.set_num_threads(2)
        assert call_overhead_tokens(torch.device("cpu")) == 2 * one
        assert call_overhead_tokens(torch.device("cuda")) == CALL_OVERHEAD_TOKENS["cuda"]  # threads: CPU only
    finally:
        torch.set_num_threads(threads)
