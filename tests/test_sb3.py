"""The stable-baselines3 adapter: the LM is SB3's policy, exactly, and SB3's PPO/A2C train the env's model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import text_env
from agents import METRIC_KEYS, NonFiniteLossError, evaluate_policy, make_agent
from agents.sb3 import LMActorCriticPolicy, SB3A2CAgent, SB3PPOAgent, right_align
from rlhf_base.maths import entropy_from_logits
from text_env.core import EnvCore

N = 8  # max_new_tokens: short episodes keep SB3's one-forward-per-token collection fast


def fresh_envs(num_envs: int = 8, **core_kwargs) -> text_env.TextGenVectorEnv:
    """A vector env on its own core: training mutates its policy, which other tests must not see."""
    return text_env.TextGenVectorEnv(num_envs=num_envs, core=EnvCore(max_new_tokens=N, **core_kwargs))


@pytest.fixture(scope="module")
def envs() -> text_env.TextGenVectorEnv:
    return fresh_envs()


@pytest.fixture(scope="module")
def policy(envs) -> LMActorCriticPolicy:
    core = envs.core
    return LMActorCriticPolicy(core.observation_space, core.action_space, lambda _: 1e-4, lm=envs.policy)


def handmade_observations(core: EnvCore, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows with left-padded prompts of 1..4 tokens and responses of 0..N-1 random non-EOS tokens."""
    rng = np.random.default_rng(seed)
    lengths = core.prompt_mask.sum(1)
    prompts = [int(np.flatnonzero(lengths == k)[0]) for k in (1, 2, 3, 4)] * 2  # (8,) all paddings
    generated = [0, 1, 3, N - 1, 2, 0, 5, 4]
    width = core.prompt_width + N
    ids = np.full((len(prompts), width), core.tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, (p, n) in enumerate(zip(prompts, generated, strict=True)):
        ids[row, : core.prompt_width], mask[row, : core.prompt_width] = (
            core.prompt_ids[p],
            core.prompt_mask[p],
        )
        tokens = rng.integers(0, core.vocab_size, size=n)
        tokens[tokens == core.tokenizer.eos_token_id] = 0
        (
            ids[row, core.prompt_width : core.prompt_width + n],
            mask[row, core.prompt_width : core.prompt_width + n],
        ) = tokens, 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def unpadded_last_position(lm, obs: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits (B, V) and last hidden state (B, H), one unpadded sequence at a time."""
    logits, hidden = [], []
    for ids, mask in zip(obs["input_ids"], obs["attention_mask"], strict=True):
        real = torch.as_tensor(ids[mask == 1])[None]  # (1, L): no padding at all
        out = lm(input_ids=real, output_hidden_states=True)
        logits.append(out.logits[0, -1])
        hidden.append(out.hidden_states[-1][0, -1])
    return torch.stack(logits).float(), torch.stack(hidden).float()


def test_right_align_puts_the_last_real_token_last():
    ids = torch.tensor([[0, 5, 6, 7, 0, 0], [8, 9, 1, 2, 3, 4], [0, 0, 5, 0, 0, 0]])
    mask = (ids != 0).long()
    aligned_ids, aligned_mask = right_align(ids, mask)
    assert aligned_ids.tolist() == [[0, 0, 0, 5, 6, 7], [8, 9, 1, 2, 3, 4], [0, 0, 0, 0, 0, 5]]
    assert torch.equal(aligned_mask, (aligned_ids != 0).long())


def test_policy_logits_and_value_are_the_lm_at_the_last_real_position(envs, policy):
    obs = handmade_observations(envs.core)
    expected_logits, expected_hidden = unpadded_last_position(envs.policy, obs)
    as_floats = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in obs.items()}  # as SB3 may hand them
    with torch.no_grad():
        logits, hidden = policy.extract_features(as_floats)
        distribution = policy.get_distribution(as_floats).distribution
        values = policy.predict_values(as_floats)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hidden, expected_hidden, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(distribution.logits, expected_logits.log_softmax(-1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values, policy.value_net(expected_hidden), atol=1e-4, rtol=1e-4)
    assert distribution.logits.shape == (8, envs.core.vocab_size)
    # SB3's own entry point (numpy obs -> obs_to_tensor -> _predict) agrees with the independent argmax.
    greedy, _ = policy.predict(obs, deterministic=True)
    assert greedy.tolist() == expected_logits.argmax(-1).tolist()


def test_evaluate_actions_is_consistent_with_acting(envs, policy):
    obs = {k: torch.as_tensor(v) for k, v in handmade_observations(envs.core, seed=1).items()}
    torch.manual_seed(0)
    with torch.no_grad():
        actions, values, logprobs = policy(obs)
        values_again, logprobs_again, entropy = policy.evaluate_actions(obs, actions)
        logits, _ = policy.extract_features(obs)
    assert actions.shape == (8,) and values.shape == (8, 1) and logprobs.shape == (8,)
    torch.testing.assert_close(logprobs_again, logprobs)
    torch.testing.assert_close(values_again, values)
    torch.testing.assert_close(logprobs, logits.log_softmax(-1).gather(1, actions[:, None]).squeeze(1))
    torch.testing.assert_close(entropy, entropy_from_logits(logits))


def assert_trained_the_env_policy(agent, envs, before: dict[str, torch.Tensor], head_before) -> None:
    lm = envs.policy
    assert agent.policy.lm is lm and agent.model.policy.lm is lm  # SB3 trains THE env's model ...
    assert all(env.core.judge.policy is lm for env in agent.vec_env.envs)  # ... which its envs judge
    optimised = {id(p) for group in agent.policy.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in lm.parameters()} <= optimised
    unchanged = [name for name, p in lm.named_parameters() if torch.equal(p, before[name])]
    assert not unchanged, f"parameters SB3 did not train: {unchanged}"
    assert not torch.equal(agent.value_head.weight, head_before)
    assert not lm.training  # dropout stays off


def test_sb3_ppo_trains_the_env_policy_through_make_agent():
    envs = fresh_envs()
    before = {name: p.detach().clone() for name, p in envs.policy.named_parameters()}
    config = {"n_envs": 4, "n_steps": 64, "batch_size": 64, "timesteps_per_iteration": 512, "iterations": 1}
    agent = make_agent("sb3_ppo", envs, config)
    assert isinstance(agent, SB3PPOAgent)
    head_before = agent.value_head.weight.detach().clone()
    history = agent.learn()
    assert len(history) == 1 and agent.history == history
    metrics = history[0]
    assert set(METRIC_KEYS) <= set(metrics)
    assert all(math.isfinite(metrics[k]) for k in METRIC_KEYS)
    assert metrics["tokens"] == 512 and metrics["train_episodes"] >= 512 / N
    assert math.isfinite(metrics["sb3_policy_gradient_loss"]) and math.isfinite(metrics["sb3_value_loss"])
    assert_trained_the_env_policy(agent, envs, before, head_before)


def test_sb3_a2c_trains_the_env_policy():
    envs = fresh_envs()
    before = {name: p.detach().clone() for name, p in envs.policy.named_parameters()}
    agent = SB3A2CAgent(envs, SB3A2CAgent.Config(n_envs=4, n_steps=8, timesteps_per_iteration=64))
    head_before = agent.value_head.weight.detach().clone()
    stops = agent.learn(iterations=3, callback=lambda agent, metrics: False)  # stops after the first
    assert len(stops) == 1 and stops[0]["tokens"] == 64
    assert_trained_the_env_policy(agent, envs, before, head_before)


def test_a_nan_loss_stops_before_the_weights_change():
    envs = fresh_envs()
    agent = SB3A2CAgent(envs, SB3A2CAgent.Config(n_envs=2, n_steps=N, timesteps_per_iteration=2 * N))
    # NaN values (a diverged value head) make the advantages, hence the loss, NaN; the env refuses a NaN
    # reward itself, so the value head is where a NaN can still reach SB3's update.
    agent.value_head.register_forward_hook(lambda module, inputs, output: output * math.nan)
    before = {name: p.detach().clone() for name, p in agent.policy.named_parameters()}
    with pytest.raises(NonFiniteLossError):
        agent.learn(iterations=1)
    assert all(torch.equal(p, before[name]) for name, p in agent.policy.named_parameters())


def test_save_load_round_trip(tmp_path, envs):
    agent = SB3PPOAgent(envs, SB3PPOAgent.Config(n_envs=2, batch_size=64))
    agent.save(tmp_path / "ckpt")
    saved = {name: p.detach().clone() for name, p in agent.policy.named_parameters()}
    with torch.no_grad():
        for p in agent.policy.parameters():
            p.add_(1.0)
    agent.load(tmp_path / "ckpt")
    assert all(torch.equal(p, saved[name]) for name, p in agent.policy.named_parameters())
    assert agent.act(handmade_observations(envs.core)).shape == (8,)


@pytest.mark.slow
def test_sb3_ppo_raises_the_reward():
    """~2 minutes on a shared CPU: SB3 PPO lifts the reward model's score of the tiny LM (-0.2 -> ~+0.2)."""
    envs = fresh_envs(num_envs=64)
    baseline = evaluate_policy(envs, num_episodes=128, seed=123)
    config = {
        "n_envs": 8,
        "n_steps": 32,
        "batch_size": 64,
        "timesteps_per_iteration": 512,
        "learning_rate": 3e-4,
    }
    agent = make_agent("sb3_ppo", envs, config)
    agent.learn(iterations=8)
    trained = agent.evaluate(num_episodes=128, seed=123)
    assert trained["rm_score"] > baseline["rm_score"] + 0.15, (baseline, trained)
    assert math.isfinite(trained["kl"])
