"""TextGenEnv: the Gymnasium contract, the reward maths by hand, termination, and errors that say what to fix."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import text_env
from rlhf_base.config import ConfigError, load_config
from tests.helpers import perturbed
from text_env.config import EnvConfig
from text_env.core import EnvCore


def test_gymnasium_and_sb3_checkers_pass_without_warnings():
    env = gym.make("text_env/TextGen-v0", max_new_tokens=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped)
        sb3_check_env(env.unwrapped, warn=True)
    ours = [w for w in caught if "gymnasium" in str(w.filename) or "stable_baselines3" in str(w.filename)]
    assert not ours, [str(w.message) for w in ours]


def test_make_with_no_arguments_and_step(env):
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert info["prompt"] in env.core.task.prompts
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert env.observation_space.contains(obs) and isinstance(reward, float) and truncated is False


def test_same_seed_same_prompt_and_episode(env):
    def episode(seed):
        obs, info = env.reset(seed=seed)
        env.action_space.seed(seed)
        trajectory, terminated = [obs["input_ids"].copy()], False
        while not terminated:
            obs, reward, terminated, _, step_info = env.step(env.action_space.sample())
            trajectory.append(obs["input_ids"].copy())
        return info["prompt"], np.stack(trajectory), reward, step_info["response"]

    a, b, c = episode(7), episode(7), episode(8)
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]
    assert not (a[0] == c[0] and np.array_equal(a[1], c[1]))


def test_kl_and_reward_match_a_hand_computation(core):
    """kl = sum_i log pi(y_i) - log pi_ref(y_i), each from a plain unpadded forward; reward = rm - beta * kl."""
    beta = 0.3
    policy = perturbed(core.reference)
    env = text_env.TextGenEnv(
        core=EnvCore(reference=core.reference, tokenizer=core.tokenizer, policy=policy, beta=beta)
    )
    tok = env.tokenizer
    obs, info = env.reset(options={"prompt_index": 3})
    response = tok("the acting was great .")["input_ids"] + [tok.eos_token_id]
    for token in response:
        obs, reward, terminated, truncated, info = env.step(token)
    assert terminated and not truncated

    prompt_ids = tok(info["prompt"])["input_ids"]
    ids = torch.tensor([prompt_ids + response])  # no padding at all: an independent path
    with torch.no_grad():
        lp = torch.log_softmax(policy(ids).logits[0, :-1], -1)
        ref = torch.log_softmax(core.reference(ids).logits[0, :-1], -1)
    targets = ids[0, 1:]
    n = len(response)
    log_pi = lp[torch.arange(len(targets)), targets][-n:]
    log_ref = ref[torch.arange(len(targets)), targets][-n:]
    kl_by_hand = float((log_pi - log_ref).sum())

    assert info["response"] == "the acting was great ."
    assert info["response_length"] == n
    np.testing.assert_allclose(info["logprobs"], log_pi.numpy(), atol=1e-5)
    np.testing.assert_allclose(info["ref_logprobs"], log_ref.numpy(), atol=1e-5)
    assert abs(kl_by_hand) > 1e-3
    assert info["kl"] == pytest.approx(kl_by_hand, abs=1e-4)
    gold = float(core.task.gold_reward([info["prompt"]], [info["response"]])[0])
    assert info["rm_score"] == pytest.approx(gold) and info["gold_score"] == pytest.approx(gold)
    assert reward == pytest.approx(info["rm_score"] - beta * info["kl"], abs=1e-6)


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_the_env_pays_and_logs_k1_and_names_where_the_estimator_moved(estimator):
    """Issue 12: the env's `kl` is always k1 (tested by hand above), so an env estimator is an error that
    names the agents' KL settings, from Python and from a config file alike."""
    where = r"choose the KL term an agent optimises in the agent's config: kl_estimator \(k1 \| k2 \| k3\)"
    with pytest.raises(
        ValueError, match=rf"kl_estimator='{estimator}' is no env setting any more: .*{where}"
    ):
        EnvCore(kl_estimator=estimator)
    with pytest.raises(
        ConfigError, match=rf"key 'kl_estimator' in override .* not a EnvConfig setting: .*{where}"
    ):
        load_config(EnvConfig, overrides=[f"kl_estimator={estimator}"])


def test_terminates_on_eos(env):
    env.reset(seed=0)
    _, reward, terminated, truncated, info = env.step(env.tokenizer.eos_token_id)
    assert terminated and not truncated
    assert info["response"] == "" and info["response_length"] == 1 and len(info["logprobs"]) == 1
    assert np.isfinite(reward)


def test_terminates_at_max_new_tokens(core):
    env = text_env.TextGenEnv(
        core=EnvCore(reference=core.reference, tokenizer=core.tokenizer, max_new_tokens=5)
    )
    env.reset(seed=0)
    word = env.tokenizer.convert_tokens_to_ids("good")
    flags = [env.step(word)[2] for _ in range(5)]
    assert flags == [False, False, False, False, True]


def test_intermediate_rewards_are_zero(env):
    env.reset(seed=0)
    word = env.tokenizer.convert_tokens_to_ids("movie")
    _, reward, terminated, _, info = env.step(word)
    assert reward == 0.0 and not terminated and info == {}


def test_action_outside_vocabulary_is_rejected(env):
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"outside the vocabulary: valid token ids are 0\.\.\d+"):
        env.step(env.action_space.n)
    with pytest.raises(TypeError, match="int token id"):
        env.step(1.5)


def test_step_after_end_without_reset_is_an_error(env):
    env.reset(seed=0)
    env.step(env.tokenizer.eos_token_id)
    with pytest.raises(RuntimeError, match="after the episode ended.*reset"):
        env.step(env.tokenizer.eos_token_id)


def test_empty_prompt_set_is_an_error(core):
    with pytest.raises(ValueError, match="prompt set is empty"):
        EnvCore(reference=core.reference, tokenizer=core.tokenizer, prompts=[])


def test_prompt_longer_than_the_context_is_an_error(core):
    long_prompt = " ".join(["the movie was good ."] * 30)  # 150 tokens > the 128-token context
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        EnvCore(reference=core.reference, tokenizer=core.tokenizer, prompts=[long_prompt])
    with pytest.raises(ValueError, match="has 5 tokens, more than max_prompt_tokens=4"):
        EnvCore(
            reference=core.reference,
            tokenizer=core.tokenizer,
            prompts=["the movie was really good"],
            max_prompt_tokens=4,
        )


def test_unknown_model_path_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no such model directory.*built-in models"):
        gym.make("text_env/TextGen-v0", model=str(tmp_path / "nowhere"))


def test_tokenizer_without_eos_is_an_error(core):
    import copy

    tok = copy.deepcopy(core.tokenizer)
    tok.eos_token = None
    with pytest.raises(ValueError, match="no EOS token"):
        EnvCore(reference=core.reference, tokenizer=tok)


def test_reset_option_prompt_index_and_bad_options(env):
    _, info = env.reset(options={"prompt_index": 5})
    assert info["prompt"] == env.core.task.prompts[5]
    with pytest.raises(ValueError, match="valid indices are 0"):
        env.reset(options={"prompt_index": 10**6})
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"prompt": "x"})


def test_render_ansi(core):
    env = text_env.TextGenEnv(core=core, render_mode="ansi")
    _, info = env.reset(seed=0)
    assert env.render() == info["prompt"]
