"""TextGenVectorEnv and the KV-cached sampler: shapes, lockstep semantics, and cache == teacher forcing."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import text_env
from rlhf_base.lm import position_ids_from_mask, response_logprobs
from rlhf_base.maths import entropy_from_logits
from tests.helpers import perturbed, replay_kl


def test_make_vec_returns_batched_observations(core):
    envs = gym.make_vec("text_env/TextGen-v0", num_envs=64, max_new_tokens=16)
    assert isinstance(envs, text_env.TextGenVectorEnv)
    obs, info = envs.reset(seed=0)
    width = envs.response_start + 16
    assert obs["input_ids"].shape == (64, width) and obs["attention_mask"].shape == (64, width)
    assert obs["input_ids"].dtype == np.int64 and envs.observation_space.contains(obs)
    assert info["prompt"].shape == (64,)
    obs, rewards, terminated, truncated, _ = envs.step(envs.action_space.sample())
    assert rewards.shape == (64,) and terminated.shape == (64,) and truncated.shape == (64,)
    assert envs.metadata["autoreset_mode"] == gym.vector.AutoresetMode.DISABLED


def test_finished_rows_are_absorbing_until_reset(core):
    envs = text_env.TextGenVectorEnv(num_envs=3, core=core)
    envs.reset(seed=0)
    assert envs.done.tolist() == [False, False, False]
    eos, word = envs.tokenizer.eos_token_id, envs.tokenizer.convert_tokens_to_ids("good")
    obs, rewards, terminated, _, info = envs.step(np.array([eos, word, word]))
    assert terminated.tolist() == [True, False, False] and envs.done.tolist() == [True, False, False]
    assert (
        info["_rm_score"].tolist() == [True, False, False]
        and rewards[0] == info["rm_score"][0] - 0.05 * info["kl"][0]
    )
    before = obs["input_ids"][0].copy()
    obs, rewards, terminated, truncated, info = envs.step(np.array([word, eos, word]))
    assert np.array_equal(obs["input_ids"][0], before), "a finished row ignores its action"
    assert rewards[0] == 0.0 and terminated.tolist() == [False, True, False], "an episode ends once"
    assert not truncated.any() and envs.done.tolist() == [True, True, False]
    assert info["_rm_score"].tolist() == [False, True, False]
    assert not envs.all_done
    done = envs.done
    done[2] = True  # a copy: the env's flags are read-only
    assert envs.done.tolist() == [True, True, False]
    obs, _ = envs.reset(options={"reset_mask": [True, False, False]})
    _, _, terminated, _, _ = envs.step(np.array([word, word, word]))
    assert not terminated.any() and envs.done.tolist() == [False, True, False], (
        "only the masked row restarted"
    )


def _play(envs, rng: np.random.Generator, steps: int, returns: list, lengths: list) -> None:
    """Step `envs` with random tokens (EOS a third of the time) for `steps` steps, appending each ended
    episode's reward and response length, as the env's own terminal-step info reports them."""
    eos = envs.unwrapped.tokenizer.eos_token_id
    for _ in range(steps):
        actions = envs.action_space.sample()
        actions[rng.random(envs.num_envs) < 1 / 3] = eos
        _, rewards, terminated, truncated, info = envs.step(actions)
        assert not truncated.any()
        ended = np.flatnonzero(terminated)
        np.testing.assert_array_equal(ended, np.flatnonzero(info.get("_response_length", [])))
        assert not rewards[~terminated].any(), "the reward arrives on the terminal step only"
        returns += rewards[ended].tolist()
        lengths += info["response_length"][ended].tolist() if len(ended) else []


def test_gymnasiums_episode_statistics_count_each_episode_once(core):
    """Gymnasium's own `RecordEpisodeStatistics` on the vector env: 8 rows are 8 episodes, with the env's
    returns and lengths, however long the rows are stepped after ending; a reset_mask restart adds those."""
    from gymnasium.wrappers.vector import RecordEpisodeStatistics

    from text_env.core import EnvCore

    small = EnvCore(reference=core.reference, tokenizer=core.tokenizer, max_new_tokens=6)
    envs = RecordEpisodeStatistics(text_env.TextGenVectorEnv(num_envs=8, core=small))
    envs.action_space.seed(0)
    rng, returns, lengths = np.random.default_rng(0), [], []
    envs.reset(seed=0)
    _play(envs, rng, 6 + 3, returns, lengths)  # every row ends within 6 steps; 3 more are no-ops
    assert envs.unwrapped.all_done and envs.episode_count == 8 and len(returns) == 8
    assert min(lengths) < 6 and max(lengths) == 6, "rows end at EOS and at the limit"
    np.testing.assert_allclose(list(envs.return_queue), returns, atol=1e-6)
    assert list(envs.length_queue) == lengths

    restart = np.array([True, False, True, False, False, True, False, False])
    envs.reset(options={"reset_mask": restart})
    assert envs.unwrapped.done.tolist() == (~restart).tolist()
    _play(envs, rng, 6 + 2, returns, lengths)
    assert envs.episode_count == 8 + 3 and len(returns) == 11
    np.testing.assert_allclose(list(envs.return_queue), returns, atol=1e-6)
    assert list(envs.length_queue) == lengths


def test_vector_env_errors(core):
    envs = text_env.TextGenVectorEnv(num_envs=2, core=core)
    with pytest.raises(RuntimeError, match="before reset"):
        envs.step(np.array([1, 1]))
    envs.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        envs.step(np.array([1, 1, 1]))
    with pytest.raises(ValueError, match="env 1 is outside the vocabulary"):
        envs.step(np.array([1, 10**6]))
    with pytest.raises(ValueError, match=r"int array of shape \(2,\).*dtype float64"):
        envs.step(np.array([1.0, 2.0]))
    envs.step(np.array([1, 2], dtype=np.uint8))  # any integer dtype is a token id
    with pytest.raises(ValueError, match=r"prompt_indices has shape"):
        envs.reset(options={"prompt_indices": [0]})


def test_rollout_kv_cache_matches_teacher_forcing(core):
    """The sampler's cached log-probs equal a full teacher-forced forward over the padded batch."""
    envs = text_env.TextGenVectorEnv(num_envs=16, core=core)
    batch = text_env.rollout(envs, seed=0, generator=torch.Generator().manual_seed(0))
    assert envs.all_done
    forced = response_logprobs(envs.policy, batch.input_ids, batch.attention_mask, batch.response_start)
    mask = batch.response_mask
    torch.testing.assert_close(batch.logprobs * mask, forced * mask, atol=2e-4, rtol=0)
    # The env's reference log-probs and KL agree with the rollout's record; the policy is a copy of pi_ref.
    assert torch.allclose(batch.kl, torch.zeros_like(batch.kl), atol=1e-4)
    assert batch.num_tokens == int(mask.sum()) and len(batch.responses) == 16
    lengths = batch.lengths.long()
    for i in range(16):
        ids = batch.response_ids[i, : lengths[i]].tolist()
        text = envs.tokenizer.decode(ids, skip_special_tokens=True)
        assert text == batch.responses[i]
    assert torch.isfinite(batch.rewards).all() and torch.equal(
        batch.rewards, batch.rm_scores - 0.05 * batch.kl
    )


def test_rollout_with_prompt_indices_and_min_new_tokens(core):
    envs = text_env.TextGenVectorEnv(num_envs=8, core=core)
    prompts = np.repeat(np.array([2, 9]), 4)
    batch = text_env.rollout(
        envs, prompt_indices=prompts, min_new_tokens=32, generator=torch.Generator().manual_seed(1)
    )
    assert batch.prompt_indices.tolist() == prompts.tolist()
    assert batch.lengths.tolist() == [32.0] * 8, "EOS is masked until min_new_tokens"
    assert batch.num_tokens == 8 * 32


def test_same_generator_seed_same_rollout(core):
    envs = text_env.TextGenVectorEnv(num_envs=4, core=core)
    a = text_env.rollout(envs, seed=3, generator=torch.Generator().manual_seed(5))
    b = text_env.rollout(envs, seed=3, generator=torch.Generator().manual_seed(5))
    assert a.responses == b.responses and torch.equal(a.input_ids, b.input_ids)


def test_known_logprobs_give_the_same_kl_as_the_policy_forward(core):
    """Skipping the policy forward (sampler-supplied log-probs) must not change the env's KL or reward."""
    from text_env.core import EnvCore

    policy = perturbed(core.reference)
    envs = text_env.TextGenVectorEnv(
        num_envs=8, core=EnvCore(reference=core.reference, tokenizer=core.tokenizer, policy=policy)
    )
    batch = text_env.rollout(envs, seed=0, generator=torch.Generator().manual_seed(0))
    assert envs._episodes.has_logprobs.all()  # white-box: scoring skipped the policy
    # Replay the same tokens without log-probs: the env runs the policy forward itself.
    kl = replay_kl(envs, batch)
    assert not envs._episodes.has_logprobs.any()
    assert np.abs(kl).max() > 1e-2
    np.testing.assert_allclose(batch.kl.numpy(), kl, atol=5e-4)


def test_a_rollout_survives_the_next_reset(core):
    envs = text_env.TextGenVectorEnv(num_envs=4, core=core)
    batch = text_env.rollout(envs, seed=0, generator=torch.Generator().manual_seed(0))
    before = batch.input_ids.clone()
    envs.reset(seed=1)
    assert torch.equal(batch.input_ids, before)


@pytest.mark.parametrize("prompts", [np.repeat([4, 0, 7, 4], 4), np.arange(16)], ids=["shared", "distinct"])
def test_shared_prefill_and_dropped_rows_match_teacher_forcing(core, prompts, monkeypatch):
    """k rows of one prompt share one prefill, and ended rows leave the batch: neither may change a log-prob."""
    from text_env.kv_cache import PreallocatedLayer

    selects = []
    select = PreallocatedLayer.batch_select_indices
    monkeypatch.setattr(
        PreallocatedLayer, "batch_select_indices", lambda self, i: selects.append(len(i)) or select(self, i)
    )
    envs = text_env.TextGenVectorEnv(num_envs=16, core=core)
    eager = text_env.SpeedOptions(compact_min_rows=1)  # drop rows as soon as a quarter ended
    batch = text_env.rollout(
        envs, prompt_indices=prompts, generator=torch.Generator().manual_seed(2), speed=eager
    )
    lengths = batch.lengths
    assert lengths.min() < lengths.max(), "rows must end at different steps for rows to be dropped"
    layers = core.reference.config.n_layer
    prefill_selects = layers if len(set(prompts.tolist())) <= 8 else 0  # the k copies of a shared prefill
    assert selects[:prefill_selects] == [16] * prefill_selects
    assert len(selects) >= prefill_selects + 2 * layers and min(selects) < 16, "rows were dropped twice"
    forced = response_logprobs(envs.policy, batch.input_ids, batch.attention_mask, batch.response_start)
    mask = batch.response_mask
    torch.testing.assert_close(batch.logprobs * mask, forced * mask, atol=2e-4, rtol=0)
    assert torch.equal(batch.logprobs * (1 - mask), torch.zeros_like(mask)), "no log-prob after a row ends"
    # The logged entropy is the policy's, per step, as a teacher-forced forward computes it.
    logits = envs.policy(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids_from_mask(batch.attention_mask),
    ).logits[:, batch.response_start - 1 : -1]
    torch.testing.assert_close(batch.entropy, entropy_from_logits(logits) * mask, atol=2e-4, rtol=0)
    assert batch.prompt_indices.tolist() == prompts.tolist()
    assert torch.equal(batch.rewards, batch.rm_scores - 0.05 * batch.kl)


def test_env_min_new_tokens_fixes_the_length_and_is_checked(core):
    from text_env.core import EnvCore

    fixed = EnvCore(reference=core.reference, tokenizer=core.tokenizer, max_new_tokens=12, min_new_tokens=12)
    batch = text_env.rollout(
        text_env.TextGenVectorEnv(6, core=fixed), generator=torch.Generator().manual_seed(0)
    )
    assert batch.lengths.tolist() == [12.0] * 6
    with pytest.raises(ValueError, match=r"min_new_tokens must be an int in \[0, max_new_tokens=8\]"):
        EnvCore(reference=core.reference, tokenizer=core.tokenizer, max_new_tokens=8, min_new_tokens=9)


def test_deferred_scoring_pays_later_exactly_what_the_terminal_step_would_have(core):
    """`defer_scoring=True` ends rows with reward 0 and no info; `score_pending` then pays each row the reward
    the terminal step pays without deferral, in the same info layout, and nothing is left pending."""
    envs = text_env.TextGenVectorEnv(num_envs=6, core=core)
    batch = text_env.rollout(envs, seed=4, generator=torch.Generator().manual_seed(4))
    tokens = batch.response_ids.numpy()

    def replay(defer: bool) -> tuple[np.ndarray, dict]:
        envs.reset(options={"prompt_indices": batch.prompt_indices})
        paid, infos = np.zeros(6, dtype=np.float32), {}
        for t in range(tokens.shape[1]):
            if envs.all_done:
                break
            _, reward, terminated, _, info = envs.step(tokens[:, t], defer_scoring=defer)
            if defer:
                assert not info and not reward.any(), "a deferred row is paid nothing on its terminal step"
            paid += reward
            for key in info:
                infos.setdefault(key, []).append(info[key])
        return paid, infos

    paid_now, infos = replay(defer=False)
    _, nothing = replay(defer=True)
    assert not nothing and envs.pending.all()
    scores = envs.score_pending()
    assert scores.rows.tolist() == list(range(6)) and len(scores) == 6
    np.testing.assert_allclose(scores.padded_rewards(6), paid_now, atol=1e-5)
    assert scores.response == batch.responses
    np.testing.assert_array_equal(scores.response_length, batch.lengths.numpy())
    # The step-time info (Gymnasium's layout) and the compact record say the same for every row.
    layout, checked = scores.vector_info(6), 0
    for key, parts in infos.items():
        if key.startswith("_"):
            continue
        for part, mask in zip(parts, infos[f"_{key}"], strict=True):
            for row in np.flatnonzero(mask):
                checked += 1
                got, want = layout[key][row], part[row]
                if isinstance(want, (np.ndarray, np.floating, float)):
                    np.testing.assert_allclose(got, want, atol=1e-5)
                else:
                    assert got == want, (key, row)
    assert checked == 6 * 8, "every row's 8 info keys were compared"
    assert not envs.pending.any() and len(envs.score_pending()) == 0, "scored once, then nothing is pending"
    envs.reset()
    assert not envs.pending.any()


def test_a_rollout_leaves_ordinary_tensors_that_can_enter_a_graph(core):
    """The sampler runs under inference mode; what it returns must be usable in a training step."""
    envs = text_env.TextGenVectorEnv(num_envs=4, core=core)
    batch = text_env.rollout(envs, seed=0, generator=torch.Generator().manual_seed(0))
    tensors = {k: v for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
    assert len(tensors) >= 10 and not any(t.is_inference() for t in tensors.values())
    weight = torch.ones((), requires_grad=True)
    (weight * batch.logprobs * batch.response_mask).sum().backward()  # mul saves its inputs for backward
    assert weight.grad is not None
