"""Sampling options log the distribution actually sampled (issue 12), checked against exact computations.

q is the policy through the sampling options (temperature, EOS banned before min_new_tokens, top-k/top-p).
The env's options define the task's policy and apply to pi_ref too (KL 0 for pi_ref against itself); an
agent's own tweak changes only q (the real KL(q || pi_ref)). Exact references: teacher-forced full
distributions, and the exact KL of two-token responses, enumerated over every first token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import agents
import text_env
from agents.reinforce import policy_logprobs
from rlhf_base.lm import position_ids_from_mask, teacher_forced
from rlhf_base.maths import entropy_from_logits
from rlhf_base.models import trainable_copy
from tests.helpers import fresh_envs, perturbed, replay_kl
from text_env.core import EnvCore
from text_env.sampling import SamplingOptions


def make_core(core: EnvCore, policy: torch.nn.Module | None = None, **kwargs) -> EnvCore:
    """A core on the session's pi_ref and tokenizer (nothing loaded again) with its own options."""
    policy = policy if policy is not None else trainable_copy(core.reference)
    return EnvCore(reference=core.reference, tokenizer=core.tokenizer, policy=policy, **kwargs)


def forced_logits(model: torch.nn.Module, batch: text_env.Rollout) -> torch.Tensor:
    """(B, N, V) teacher-forced logits of the rollout's response tokens under `model`."""
    with torch.no_grad():
        _, logits = teacher_forced(model, batch.input_ids, batch.attention_mask, batch.response_start)
    return logits


def gathered(logprobs: torch.Tensor, batch: text_env.Rollout) -> torch.Tensor:
    """(B, N) the entries of (B, N, V) `logprobs` at the sampled tokens, 0 past each row's end."""
    mask = batch.response_mask
    return logprobs.gather(-1, batch.response_ids[..., None]).squeeze(-1).masked_fill(mask == 0, 0.0)


# ---------------------------------------------------------------------------------------------------------
# The options themselves
# ---------------------------------------------------------------------------------------------------------
def test_the_default_options_return_the_logits_themselves_and_the_rest_transform_them():
    logits = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(0))  # (B, N, V)
    assert SamplingOptions().logits(logits) is logits, "the default path is bit-identical: no copy"
    tempered = SamplingOptions(temperature=0.5).logits(logits)
    torch.testing.assert_close(tempered, logits * 2)
    banned = SamplingOptions(min_new_tokens=2, eos_token_id=5).logits(logits)  # steps 0 and 1 ban EOS
    assert torch.isinf(banned[:, :2, 5]).all() and torch.equal(banned[:, 2:], logits[:, 2:])
    assert torch.equal(banned[..., :5], logits[..., :5])
    step = SamplingOptions(min_new_tokens=2, eos_token_id=5)
    assert torch.isinf(step.logits(logits[:, 0], step=1)[:, 5]).all()
    assert torch.equal(step.logits(logits[:, 0], step=2), logits[:, 0]), "past the ban: unchanged"
    per_row = step.logits(logits[:, 0], step=torch.tensor([0, 2, 5]))  # one step per row
    assert torch.isinf(per_row[0, 5]) and torch.isfinite(per_row[1:, 5]).all()
    top2 = SamplingOptions(top_k=2).logprobs(logits).exp()
    assert ((top2 > 0).sum(-1) == 2).all() and torch.allclose(top2.sum(-1), torch.ones(3, 4))


@pytest.mark.parametrize(
    "bad, match",
    [
        (
            {"temperature": 0.0},
            r"SamplingOptions\.temperature = 0\.0: must be > 0 \(valid range \(0, inf\)\)",
        ),
        ({"top_k": -1}, r"SamplingOptions\.top_k = -1: must be >= 0 \(valid range \[0, inf\)\)"),
        ({"top_p": 0.0}, r"SamplingOptions\.top_p = 0\.0: must be > 0 and <= 1 \(valid range \(0, 1\]\)"),
        ({"min_new_tokens": 2}, "needs eos_token_id"),
    ],
)
def test_bad_options_say_what_is_wrong(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingOptions(**bad)


# ---------------------------------------------------------------------------------------------------------
# The env's temperature: the task's policy, applied to pi_ref too
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.5, 0.7, 1.5])
def test_pi_ref_at_the_envs_temperature_has_kl_zero_and_logs_the_tempered_log_probs(core, temperature):
    envs = text_env.TextGenVectorEnv(16, core=make_core(core, temperature=temperature, max_new_tokens=12))
    batch = text_env.rollout(envs, seed=0, generator=torch.Generator().manual_seed(0))
    assert envs.sampling.temperature == temperature
    torch.testing.assert_close(batch.kl, torch.zeros(16), atol=1e-4, rtol=0)
    logits = forced_logits(core.reference, batch) / temperature  # the tempered q, computed from scratch
    mask = batch.response_mask
    q = torch.log_softmax(logits, -1)
    torch.testing.assert_close(batch.logprobs, gathered(q, batch), atol=2e-4, rtol=0)
    torch.testing.assert_close(batch.ref_logprobs * mask, gathered(q, batch), atol=2e-4, rtol=0)
    torch.testing.assert_close(batch.entropy, entropy_from_logits(logits) * mask, atol=2e-4, rtol=0)
    untempered = gathered(torch.log_softmax(logits * temperature, -1), batch)
    assert (batch.logprobs - untempered).abs().max() > 0.1, "the logged log-probs are not pi's own"


def exact_two_token_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    core: EnvCore,
    prompt: int,
    q: SamplingOptions,
    p: SamplingOptions,
) -> float:
    """KL(q || p) of whole responses of at most 2 tokens to `prompt`, enumerated over every first token.

    q samples from `policy` through its options, p is `reference` through its options; a response ends at
    EOS or after two tokens: KL = sum_y1 q(y1) [log q(y1)/p(y1) + (y1 != EOS) KL(q(.|y1) || p(.|y1))].
    """
    ids = torch.as_tensor(core.prompt_ids[prompt])
    mask = torch.as_tensor(core.prompt_mask[prompt])
    vocab = core.vocab_size

    def next_logits(model: torch.nn.Module, first: torch.Tensor | None) -> torch.Tensor:
        if first is None:  # (1, V) after the prompt
            x, m = ids[None], mask[None]
        else:  # (V, V): after the prompt and each first token
            x = torch.cat([ids.expand(len(first), -1), first[:, None]], 1)
            m = torch.cat([mask.expand(len(first), -1), torch.ones(len(first), 1, dtype=mask.dtype)], 1)
        with torch.no_grad():
            return (
                model(input_ids=x, attention_mask=m, position_ids=position_ids_from_mask(m))
                .logits[:, -1]
                .float()
            )

    def kl_terms(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:  # (..., V) -> (...)
        log_q, log_p = log_q.double(), log_p.double()
        terms = log_q.exp() * (log_q - log_p)
        return torch.where(log_q > -torch.inf, terms, torch.zeros_like(terms)).sum(-1)

    first = torch.arange(vocab)
    q0 = q.logprobs(next_logits(policy, None), step=0)[0]  # (V,)
    p0 = p.logprobs(next_logits(reference, None), step=0)[0]
    q1 = q.logprobs(next_logits(policy, first), step=1)  # (V, V): row y1
    p1 = p.logprobs(next_logits(reference, first), step=1)
    continues = (first != core.tokenizer.eos_token_id).double()
    per_first = (q0 - p0).double() + continues * kl_terms(q1, p1)  # (V,)
    weights = q0.double().exp()
    return float((weights * torch.where(weights > 0, per_first, torch.zeros_like(per_first))).sum())


def mean_and_error(kl: torch.Tensor) -> tuple[float, float]:
    return kl.double().mean().item(), (kl.double().std() / len(kl) ** 0.5).item()


def test_the_kl_at_the_envs_temperature_matches_the_exact_kl_of_the_tempered_distributions(core):
    policy = perturbed(core.reference)
    fixed = make_core(core, policy, temperature=0.7, max_new_tokens=2)
    envs = text_env.TextGenVectorEnv(2048, core=fixed)
    batch = text_env.rollout(
        envs, prompt_indices=np.full(2048, 3), generator=torch.Generator().manual_seed(0)
    )
    exact = exact_two_token_kl(policy, core.reference, fixed, 3, fixed.sampling, fixed.sampling)
    mean, error = mean_and_error(batch.kl)
    assert exact > 0.01 and abs(mean - exact) < 4 * error, (mean, error, exact)


# ---------------------------------------------------------------------------------------------------------
# An agent's own temperature: the real KL of what it sampled against the env's reference
# ---------------------------------------------------------------------------------------------------------
def test_pi_ref_sampled_at_its_own_temperature_reports_the_exact_kl_not_zero(core):
    """RAFT's or the labeller's temperature: the env (temperature 1) pays the real KL(q_0.7 || pi_ref)."""
    plain = make_core(core, max_new_tokens=2)
    envs = text_env.TextGenVectorEnv(2048, core=plain)
    batch = text_env.rollout(
        envs, prompt_indices=np.full(2048, 6), temperature=0.7, generator=torch.Generator().manual_seed(0)
    )
    q = SamplingOptions(temperature=0.7)
    exact = exact_two_token_kl(core.reference, core.reference, plain, 6, q, plain.sampling)
    mean, error = mean_and_error(batch.kl)
    assert exact > 0.05 and abs(mean - exact) < 4 * error, (mean, error, exact)
    # Token by token: the logged log-probs are q's, the reference's pi_ref's own.
    logits = forced_logits(core.reference, batch)
    torch.testing.assert_close(
        batch.logprobs, gathered(torch.log_softmax(logits / 0.7, -1), batch), atol=2e-4, rtol=0
    )
    mask = batch.response_mask
    torch.testing.assert_close(
        batch.ref_logprobs * mask, gathered(torch.log_softmax(logits, -1), batch), atol=2e-4, rtol=0
    )


def test_top_k_logs_the_renormalised_filtered_distribution(core):
    envs = text_env.TextGenVectorEnv(8, core=make_core(core, max_new_tokens=8))
    batch = text_env.rollout(envs, seed=1, top_k=5, generator=torch.Generator().manual_seed(1))
    logits = forced_logits(core.reference, batch)
    kth = logits.topk(5, dim=-1).values[..., -1:]
    q = torch.log_softmax(logits.masked_fill(logits < kth, -torch.inf), -1)
    torch.testing.assert_close(batch.logprobs, gathered(q, batch), atol=2e-4, rtol=0)
    assert (batch.kl > 0).all(), "a filtered pi_ref is not pi_ref: each response pays a real KL"


# ---------------------------------------------------------------------------------------------------------
# min_new_tokens
# ---------------------------------------------------------------------------------------------------------
def masked_log_q(logits: torch.Tensor, eos: int, banned_steps: int) -> torch.Tensor:
    """log of the renormalised distribution with EOS removed at steps < banned_steps."""
    logits = logits.clone()
    logits[:, :banned_steps, eos] = -torch.inf
    return torch.log_softmax(logits, -1)


def test_the_envs_min_new_tokens_bans_eos_in_the_reference_too_so_pi_ref_has_kl_zero(core):
    fixed = make_core(core, max_new_tokens=10, min_new_tokens=6)
    envs = text_env.TextGenVectorEnv(16, core=fixed)
    batch = text_env.rollout(envs, seed=2, generator=torch.Generator().manual_seed(2))
    assert batch.lengths.min() >= 6
    torch.testing.assert_close(batch.kl, torch.zeros(16), atol=1e-4, rtol=0)
    logits, eos = forced_logits(core.reference, batch), core.tokenizer.eos_token_id
    q = gathered(masked_log_q(logits, eos, 6), batch)
    torch.testing.assert_close(batch.logprobs, q, atol=2e-4, rtol=0)
    plain = gathered(torch.log_softmax(logits, -1), batch)
    assert (batch.logprobs[:, :6] - plain[:, :6]).sum() > 0, "renormalised: the kept tokens gain mass"


def test_a_rollouts_own_min_new_tokens_pays_exactly_minus_log_one_minus_p_eos_per_banned_step(core):
    """Banning EOS moves q off pi_ref by a known amount: log q(y) - log p(y) = -log(1 - p(EOS)) for every
    token y at a banned step, so each response's KL is exactly the sum of those over its first steps."""
    envs = text_env.TextGenVectorEnv(16, core=make_core(core, max_new_tokens=10))
    batch = text_env.rollout(envs, seed=2, min_new_tokens=6, generator=torch.Generator().manual_seed(2))
    logits, eos = forced_logits(core.reference, batch), core.tokenizer.eos_token_id
    p_eos = torch.softmax(logits, -1)[:, :6, eos].double()  # (B, 6) at the sampled prefixes
    exact = -torch.log1p(-p_eos).sum(-1)  # (B,)
    assert (exact > 0).all()
    torch.testing.assert_close(batch.kl.double(), exact, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(
        batch.logprobs, gathered(masked_log_q(logits, eos, 6), batch), atol=2e-4, rtol=0
    )


def test_eos_before_the_envs_min_new_tokens_is_refused(core):
    fixed = make_core(core, max_new_tokens=8, min_new_tokens=3)
    envs = text_env.TextGenVectorEnv(2, core=fixed)
    with pytest.raises(ValueError, match="below the env's 3"):
        text_env.rollout(envs, min_new_tokens=1)
    envs.reset(seed=0)
    eos, word = core.tokenizer.eos_token_id, core.tokenizer.convert_tokens_to_ids("good")
    with pytest.raises(ValueError, match="env 1 chose EOS as response token 0: the env's min_new_tokens=3"):
        envs.step(np.array([word, eos]))
    single = text_env.TextGenEnv(core=fixed)
    single.reset(seed=0)
    for _ in range(3):
        single.step(word)
    assert single.step(eos)[2], "from min_new_tokens on, EOS ends the episode"


# ---------------------------------------------------------------------------------------------------------
# The agents re-score with the same distribution: on-policy ratio, consistent KL
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tempered(core) -> EnvCore:
    """The env's temperature and min_new_tokens both on, with a policy that differs from pi_ref."""
    return make_core(core, perturbed(core.reference), temperature=0.7, max_new_tokens=8, min_new_tokens=3)


def test_ppo_and_reinforce_rescore_the_rollout_with_the_distribution_it_was_drawn_from(tempered):
    envs = fresh_envs(tempered, 8)
    envs.set_policy(perturbed(envs.reference))  # PPO trains it: a copy of its own
    batch = text_env.rollout(envs, seed=0, generator=torch.Generator().manual_seed(0))
    mask, p = batch.response_mask, batch.response_start
    ppo = agents.make_agent("ppo", envs, {"iterations": 1})
    with torch.no_grad():
        old, _ = ppo._forward(batch.input_ids, batch.attention_mask, p)  # what PPO's ratio divides by
    torch.testing.assert_close(old * mask, batch.logprobs, atol=2e-4, rtol=0)
    logprobs, entropy = policy_logprobs(envs.policy, batch, True, sampling=envs.sampling)
    torch.testing.assert_close(logprobs.detach() * mask, batch.logprobs, atol=2e-4, rtol=0)
    torch.testing.assert_close(entropy.detach() * mask, batch.entropy, atol=2e-4, rtol=0)
    (metrics,) = ppo.learn(1)
    assert np.isfinite(metrics["approx_kl"]) and np.isfinite(metrics["policy_loss"])


def test_the_judge_rescores_a_replayed_episode_through_the_envs_options(tempered):
    """Without the sampler's log-probs (an agent stepping by hand) the judge runs the policy through the
    env's options itself: the same KL as the rollout's."""
    envs = text_env.TextGenVectorEnv(8, core=tempered)
    batch = text_env.rollout(envs, seed=0, generator=torch.Generator().manual_seed(0))
    kl = replay_kl(envs, batch)
    assert np.abs(kl).max() > 1e-2
    np.testing.assert_allclose(batch.kl.numpy(), kl, atol=5e-4)


def test_sb3s_and_acts_action_distribution_is_the_envs(tempered):
    envs = text_env.TextGenVectorEnv(4, core=tempered)
    agent = agents.make_agent("sb3_ppo", envs, {"n_envs": 2, "n_steps": 8, "batch_size": 16})
    obs, _ = envs.reset(seed=0)
    dist = agent.policy.get_distribution({k: torch.as_tensor(v) for k, v in obs.items()})
    with torch.no_grad():
        mask = torch.as_tensor(obs["attention_mask"])
        logits = (
            envs.policy(
                input_ids=torch.as_tensor(obs["input_ids"]),
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask),
            )
            .logits[:, envs.response_start - 1]
            .float()
        )
    expected = envs.sampling.logprobs(logits, step=0)
    torch.testing.assert_close(dist.distribution.logits, expected, atol=2e-4, rtol=0)
    assert (dist.distribution.probs[:, core_eos(envs)] == 0).all(), "EOS is banned at step 0"
    for _ in range(20):
        assert (agent.act(obs) != core_eos(envs)).all()


def core_eos(envs: text_env.TextGenVectorEnv) -> int:
    return envs.tokenizer.eos_token_id


def test_a_reward_model_sharing_the_reference_forward_reads_pi_refs_own_log_probs(core, tmp_path):
    """The shared forward (one pi_ref forward for the KL and the reward model) feeds the reward model the
    untempered log-probs it was trained on and the KL the env's tempered, EOS-banned ones: the same scores
    and KL as two separate forwards."""
    from reward_models import build_reward_model, load_reward_model

    torch.manual_seed(0)
    build_reward_model(logprob_features=True).save(tmp_path / "rm")
    rm = load_reward_model(tmp_path / "rm")  # its frozen LM is pi_ref: the judge shares the forward
    batches = {}
    for share in (True, False):
        options = dict(temperature=0.7, min_new_tokens=2, max_new_tokens=6, reward_model=rm)
        speed = text_env.SpeedOptions(share_reference_forward=share)
        envs = text_env.TextGenVectorEnv(
            16, core=make_core(core, perturbed(core.reference), speed=speed, **options)
        )
        calls = []
        hook = rm.reference.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        batches[share] = text_env.rollout(envs, seed=5, generator=torch.Generator().manual_seed(5))
        hook.remove()
        assert (calls == []) == share, "shared: the reward model's own copy of pi_ref never runs"
    shared, separate = batches[True], batches[False]
    assert torch.equal(shared.input_ids, separate.input_ids)
    torch.testing.assert_close(shared.rm_scores, separate.rm_scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(shared.ref_logprobs, separate.ref_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.kl, separate.kl, atol=1e-4, rtol=0)
