"""The env's public surface is the whole contract: agents and the sampler read nothing else (issue 11)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import text_env

ROOT = Path(__file__).resolve().parents[1]
# Users of the env that must keep to its public surface: the sampler, every agent, the stages.
CLIENTS = sorted(
    [ROOT / "text_env" / "sampler.py", *(ROOT / "agents").glob("*.py"), *(ROOT / "rlhf_gym").glob("*.py")]
)
# Inside the env: the shared core and its parts, and the envs' own buffers.
PRIVATE = {"core", "judge", "_episodes", "_pending", "score_rows", "new_episodes"}
ENV_NAME = re.compile(r"\b(envs?|vec_env|unwrapped)\b")


def private_reads(source: str) -> list[str]:
    """`line: expression` for every read of the env's insides in `source`: an attribute in PRIVATE, or
    `episodes` on something named like an env (an agent's own `self.episodes` counter is its business)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        if node.attr in PRIVATE or (node.attr == "episodes" and ENV_NAME.search(ast.unparse(node.value))):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_agents_the_sampler_and_the_stages_read_only_the_public_surface():
    leaks = {str(p.relative_to(ROOT)): private_reads(p.read_text()) for p in CLIENTS}
    assert len(leaks) > 10 and "agents/ppo.py" in leaks
    assert not {k: v for k, v in leaks.items() if v}, "use the env's public surface (text_env/surface.py)"


def test_the_check_catches_a_read_of_the_envs_insides():
    source = (
        "beta = self.envs.core.judge.beta\n"
        "done = envs.episodes.done\n"
        "n = env.unwrapped._pending.sum()\n"
        "self.episodes['kl'].append(1)\n"  # an agent's own bookkeeping: allowed
    )
    assert set(private_reads(source)) == {
        "1: self.envs.core.judge",
        "1: self.envs.core",
        "2: envs.episodes",
        "3: env.unwrapped._pending",
    }


@pytest.mark.parametrize("make", ["single", "vector"])
def test_both_envs_share_the_documented_handles(core, make):
    env = text_env.TextGenEnv(core=core) if make == "single" else text_env.TextGenVectorEnv(3, core=core)
    assert env.prompts == core.task.prompts and env.task is core.task
    assert env.kl_estimator == "k1" and env.beta == core.judge.beta
    assert (env.max_new_tokens, env.min_new_tokens) == (core.max_new_tokens, core.min_new_tokens)
    assert env.response_start == core.prompt_width and env.reference is core.reference
    assert env.reward_model is core.task.gold_reward  # no reward model given: the task's gold reward
    assert env.check_prompt_index(np.int64(3)) == 3
    with pytest.raises(ValueError, match=rf"valid indices are 0\.\.{len(core.task.prompts) - 1}"):
        env.check_prompt_index(len(core.task.prompts))


def test_sharing_builds_envs_on_one_core(core):
    wrapped = gym.make("text_env/TextGen-v0", core=core)
    envs = text_env.TextGenVectorEnv.sharing(wrapped, num_envs=5)
    single = text_env.TextGenEnv.sharing(envs)
    assert envs.num_envs == 5 and envs.core is core and single.core is core
    assert envs.policy is single.policy is wrapped.unwrapped.policy


def test_score_pending_returns_one_entry_per_row_and_the_episode_buffers_are_deprecated(core):
    envs = text_env.TextGenVectorEnv(num_envs=4, core=core)
    obs, info = envs.reset(seed=0)
    eos, word = envs.tokenizer.eos_token_id, envs.tokenizer.convert_tokens_to_ids("good")
    envs.step(np.array([eos, word, word, eos]), defer_scoring=True)
    assert envs.pending.tolist() == [True, False, False, True]
    scores = envs.score_pending()
    assert scores.rows.tolist() == [0, 3] and scores.response_length.tolist() == [1, 1]
    assert scores.logprobs.shape == scores.ref_logprobs.shape == (2, envs.max_new_tokens)
    assert scores.prompt == [info["prompt"][0], info["prompt"][3]]
    np.testing.assert_allclose(scores.reward, scores.rm_score - envs.beta * scores.kl, atol=1e-6)
    empty = envs.score_pending()
    assert len(empty) == 0 and empty.logprobs.shape == (0, envs.max_new_tokens)
    with pytest.warns(DeprecationWarning, match="episodes is internal"):
        assert envs.episodes.done.tolist() == [True, False, False, True]
    with pytest.warns(DeprecationWarning, match=r"unpacking it as \(rewards, info\) is deprecated"):
        rewards, old_info = scores  # the return value before Scores still unpacks
    assert rewards.shape == (4,) and rewards[[1, 2]].tolist() == [0.0, 0.0]
    np.testing.assert_array_equal(rewards[[0, 3]], scores.reward)
    assert old_info["_rm_score"].tolist() == [True, False, False, True]
    with pytest.warns(DeprecationWarning):
        assert tuple(empty)[1] == {}


def test_a_single_envs_info_and_a_vector_rows_info_agree(core):
    """`TextGenEnv` and `TextGenVectorEnv` build their Gymnasium info from the same `Scores`."""
    env, envs = text_env.TextGenEnv(core=core), text_env.TextGenVectorEnv(1, core=core)
    env.reset(options={"prompt_index": 2})
    envs.reset(options={"prompt_indices": [2]})
    tokens = torch.tensor([envs.tokenizer.convert_tokens_to_ids(w) for w in ("the", "film", "was")])
    for token in tokens.tolist() + [envs.tokenizer.eos_token_id]:
        _, reward, terminated, _, info = env.step(token)
        _, rewards, _, _, vector_info = envs.step(np.array([token]))
    assert terminated and reward == pytest.approx(float(rewards[0]))
    assert info["response_length"] == 4 and info["logprobs"].shape == (4,)
    for key, value in info.items():
        row = vector_info[key][0]
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(row[: len(value)], value)
        else:
            assert row == value, key


def _score_fixed_episodes(envs: text_env.TextGenVectorEnv, tokens: np.ndarray, prompts: np.ndarray):
    envs.reset(options={"prompt_indices": prompts})
    for column in tokens.T:
        envs.step(column, defer_scoring=True)
    return envs.score_pending()


def test_setting_beta_on_the_env_moves_the_reward_by_exactly_minus_delta_kl(core):
    from rlhf_base.models import trainable_copy
    from text_env.core import EnvCore

    policy = trainable_copy(core.reference)
    with torch.no_grad():  # off pi_ref, so that the KL is not ~0
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    own = EnvCore(reference=core.reference, tokenizer=core.tokenizer, policy=policy, max_new_tokens=6)
    envs = text_env.TextGenVectorEnv(4, core=own)
    prompts, tokens = np.arange(4), np.random.default_rng(0).integers(5, 200, size=(4, 6))
    before = _score_fixed_episodes(envs, tokens, prompts)
    envs.beta = 0.05 + 0.25
    after = _score_fixed_episodes(envs, tokens, prompts)
    assert np.abs(before.kl).min() > 1e-2 and envs.beta == own.judge.beta == 0.3
    np.testing.assert_array_equal(after.kl, before.kl)
    np.testing.assert_array_equal(after.rm_score, before.rm_score)
    np.testing.assert_allclose(after.reward - before.reward, -0.25 * before.kl, atol=1e-6)
    single = gym.make("text_env/TextGen-v0", core=own)
    single.unwrapped.beta = 0.0  # through Gymnasium's wrappers; one value for every env on the core
    assert envs.beta == 0.0
    assert _score_fixed_episodes(envs, tokens, prompts).reward.tolist() == before.rm_score.tolist()


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1", None])
def test_beta_must_be_a_finite_number_at_least_zero(core, bad):
    envs = text_env.TextGenVectorEnv(2, core=core)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        envs.beta = bad
    assert envs.beta == 0.05, "a rejected value leaves beta as it was"
