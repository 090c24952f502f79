"""Speed switches are explicit options (`SpeedOptions`), not patched globals: each one off changes the work
done (observed here) and nothing else (the same draws, log-probs and rewards to float tolerance)."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest
import torch

import text_env
from rlhf_base.config import ConfigError, load_config
from text_env.config import EnvConfig
from text_env.core import EnvCore
from text_env.kv_cache import PreallocatedLayer
from text_env.speed import SpeedOptions

PROMPTS = np.repeat([4, 0, 7, 4], 4)  # RLOO-like: 3 distinct prompts in 16 rows, so the prefill is shared


@pytest.fixture()
def work(core, monkeypatch):
    """Counts of what a rollout did: policy/reference forwards (rows of each), cache writes and row drops."""
    seen: Counter = Counter()
    hooks = [
        core.judge.policy.register_forward_hook(lambda m, a, kw, out: seen.update([f"policy{len(kw['input_ids'])}"]), with_kwargs=True),
        core.reference.register_forward_hook(lambda *_: seen.update(["reference"])),
    ]  # fmt: skip
    update, select = PreallocatedLayer.update, PreallocatedLayer.batch_select_indices
    monkeypatch.setattr(
        PreallocatedLayer, "update", lambda s, *a, **k: seen.update(["prealloc"]) or update(s, *a, **k)
    )
    monkeypatch.setattr(
        PreallocatedLayer, "batch_select_indices", lambda s, i: seen.update(["select"]) or select(s, i)
    )
    multinomial = torch.multinomial
    monkeypatch.setattr(
        torch, "multinomial", lambda *a, **k: seen.update(["multinomial"]) or multinomial(*a, **k)
    )
    yield seen
    for hook in hooks:
        hook.remove()


def _rollout(core, speed: SpeedOptions | None, seen: Counter) -> tuple[text_env.Rollout, Counter]:
    seen.clear()
    envs = text_env.TextGenVectorEnv(16, core=core)
    batch = text_env.rollout(
        envs, prompt_indices=PROMPTS, generator=torch.Generator().manual_seed(2), speed=speed
    )
    return batch, Counter(seen)


def _assert_same_results(a: text_env.Rollout, b: text_env.Rollout) -> None:
    assert torch.equal(a.input_ids, b.input_ids), "the same random draws give the same tokens"
    for name in ("logprobs", "ref_logprobs", "entropy", "rewards", "rm_scores", "kl"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=2e-5, rtol=0, msg=name)


def _assert_consistent(core, batch: text_env.Rollout) -> None:
    """Another draw, the same policy: the logged log-probs are the teacher-forced ones of the drawn tokens."""
    from rlhf_base.lm import response_logprobs

    mask = batch.response_mask
    for model, logged in ((core.judge.policy, batch.logprobs), (core.reference, batch.ref_logprobs)):
        forced = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_start)
        torch.testing.assert_close(logged * mask, forced * mask, atol=2e-4, rtol=0)
    torch.testing.assert_close(batch.rewards, batch.rm_scores - 0.05 * batch.kl, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "off, what_changes",
    [
        ({"share_prefill_below": 0.0}, lambda on, off: on["policy3"] == 1 and not off["policy3"]),
        ({"preallocate_cache": False}, lambda on, off: on["prealloc"] > 0 and off["prealloc"] == 0),
    ],
    ids=lambda x: next(iter(x)) if isinstance(x, dict) else "",
)
def test_a_speed_option_off_does_other_work_for_the_same_draws_and_results(core, work, off, what_changes):
    batch_on, on = _rollout(core, None, work)
    batch_off, seen_off = _rollout(core, SpeedOptions(**off), work)
    assert what_changes(on, seen_off), (dict(on), dict(seen_off))
    _assert_same_results(batch_on, batch_off)


@pytest.mark.parametrize(
    "off", [{"compact_below": 0.0}, {"compact_min_rows": 1}], ids=lambda x: next(iter(x))
)
def test_dropping_rows_sooner_or_never_changes_the_draws_not_the_policy(core, work, off):
    """The sampler draws one number per live row, so dropping rows at other steps draws other tokens; each
    rollout's log-probs and rewards still equal the teacher-forced ones of its own tokens."""
    layers = core.reference.config.n_layer
    batch_on, on = _rollout(core, None, work)
    batch_off, seen_off = _rollout(core, SpeedOptions(**off), work)
    assert on["select"] > layers, "by default ended rows leave the batch (after the shared prefill's copy)"
    if off.get("compact_below") == 0.0:
        assert seen_off["select"] == layers, "only the shared prefill's copy: every row decodes to the end"
    else:
        assert seen_off["select"] > on["select"], "rows leave sooner, a few at a time"
    for batch in (batch_on, batch_off):
        _assert_consistent(core, batch)


def test_the_env_holds_the_speed_options_the_sampler_and_the_judge_use(core, work):
    """`group_by_length=False` on the env (not only on one rollout) reaches the judge's reference forward."""
    flat = EnvCore(
        reference=core.reference, tokenizer=core.tokenizer, policy=core.judge.policy,
        speed=SpeedOptions(group_by_length=False, preallocate_cache=False),
    )  # fmt: skip
    assert text_env.TextGenVectorEnv(2, core=flat).speed is flat.speed is flat.judge.speed
    batch_on, on = _rollout(core, None, work)
    batch_off, off = _rollout(flat, None, work)
    assert on["reference"] > 1 and off["reference"] == 1 and off["prealloc"] == 0
    _assert_same_results(batch_on, batch_off)


def test_multinomial_sampling_draws_other_tokens_from_the_same_policy(core, work):
    batch_on, on = _rollout(core, None, work)
    batch_off, off = _rollout(core, SpeedOptions(sampler="multinomial"), work)
    assert on["multinomial"] == 0 and off["multinomial"] >= batch_off.lengths.max()
    assert not torch.equal(batch_on.input_ids, batch_off.input_ids), "other random numbers, other draws"
    _assert_consistent(core, batch_off)


def test_the_reference_forward_is_shared_with_the_reward_model_only_when_asked(core, tmp_path):
    from reward_models import load_reward_model
    from tests.test_reward_models import build_reward_model

    torch.manual_seed(0)
    build_reward_model(logprob_features=True).save(tmp_path / "rm")
    rm = load_reward_model(tmp_path / "rm")  # its frozen LM is a copy of pi_ref: sharing applies
    calls = []
    hook = rm.reference.register_forward_hook(lambda *_: calls.append(1))
    batches = {}
    for share in (True, False):
        calls.clear()
        speed = SpeedOptions(share_reference_forward=share)
        own = EnvCore(
            reference=core.reference, tokenizer=core.tokenizer, reward_model=rm, max_new_tokens=6, speed=speed
        )
        envs = text_env.TextGenVectorEnv(16, core=own)
        batches[share] = text_env.rollout(envs, seed=9, generator=torch.Generator().manual_seed(3))
        assert bool(calls) is not share, "the reward model's own pi_ref runs only when nothing is shared"
    hook.remove()
    _assert_same_results(batches[True], batches[False])


def test_an_agents_update_follows_the_envs_group_by_length(core):
    from agents.reinforce import policy_logprobs

    batch = text_env.rollout(
        text_env.TextGenVectorEnv(16, core=core), generator=torch.Generator().manual_seed(1)
    )
    assert batch.lengths.min() < batch.lengths.max()
    calls = []
    hook = core.judge.policy.register_forward_hook(lambda *_: calls.append(1))
    grouped, _ = policy_logprobs(core.judge.policy, batch, overhead_tokens=SpeedOptions().overhead_tokens)
    groups, calls[:] = len(calls), []
    flat, _ = policy_logprobs(
        core.judge.policy, batch, overhead_tokens=SpeedOptions(group_by_length=False).overhead_tokens
    )
    hook.remove()
    assert groups > 1 and len(calls) == 1 and SpeedOptions(group_by_length=False).overhead_tokens == math.inf
    mask = batch.response_mask
    torch.testing.assert_close(grouped * mask, flat * mask, atol=2e-5, rtol=0)


def test_speed_options_are_validated_and_load_from_the_env_config():
    cfg = load_config(EnvConfig, overrides=["speed.sampler=multinomial", "speed.compact_below=0"])
    assert cfg.speed == SpeedOptions(sampler="multinomial", compact_below=0.0)
    assert EnvConfig().speed == SpeedOptions()
    with pytest.raises(ConfigError, match="speed.sampler"):
        load_config(EnvConfig, overrides=["speed.sampler=gumbel"])
    for bad, match in [
        (
            {"compact_below": 1.5},
            r"SpeedOptions\.compact_below = 1\.5: must be >= 0 and <= 1 \(valid range \[0, 1\]\)",
        ),
        ({"compact_min_rows": 0}, r"SpeedOptions\.compact_min_rows = 0: must be >= 1"),
        ({"sampler": "gumbel"}, "unknown sampler 'gumbel'"),
    ]:
        with pytest.raises(ValueError, match=match):
            SpeedOptions(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        SpeedOptions().compact_below = 0.0  # type: ignore[misc]


def test_the_old_sampler_globals_warn_and_name_the_option():
    import text_env.sampler

    with pytest.warns(
        DeprecationWarning, match=r"COMPACT_BELOW is no longer read: pass SpeedOptions\(compact_below"
    ):
        assert text_env.sampler.COMPACT_BELOW == 0.75
    with pytest.warns(DeprecationWarning, match="preallocate_cache"):
        assert text_env.sampler.PREALLOCATE is True
    with pytest.raises(AttributeError):
        text_env.sampler.NOT_A_SWITCH  # noqa: B018
