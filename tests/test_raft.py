"""RAFT: selection by hand, the kept samples are the reward model's best, the SFT batch, errors, and learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import agents.sft as sft
from agents.base import METRIC_KEYS, NonFiniteLossError
from agents.raft import RAFTAgent, RAFTConfig, rollout_batch, select_best
from agents.registry import make_agent
from agents.sft import IGNORE_INDEX
from rlhf_base.config import ConfigError, load_config
from tests.helpers import fresh_envs
from text_env.core import EnvCore


@pytest.fixture(scope="module")
def core32() -> EnvCore:
    """Our own core, so training here never touches the session core's policy."""
    return EnvCore()


def word_count_rm(prompts, responses):
    """A reward model unlike the gold one (which scores sentiment): longer responses score higher."""
    return [float(len(r.split())) for r in responses]


def test_select_best_by_hand():
    # Two prompts, k = 4; ties go to the first sampled.
    scores = torch.tensor([0.1, 0.9, 0.3, 0.9, -1.0, -2.0, 5.0, 0.0])
    assert select_best(scores, k=4).tolist() == [1, 6]
    assert select_best(scores, k=4, keep=2).tolist() == [1, 3, 6, 7]


def test_config_errors():
    with pytest.raises(
        ValueError, match=r"RAFTConfig\.samples_per_prompt = 1: must be >= 2 \(valid range \[2, inf\)\)"
    ):
        RAFTConfig(samples_per_prompt=1)
    with pytest.raises(ValueError, match=r"keep must be in \[1, samples_per_prompt\)"):
        RAFTConfig(samples_per_prompt=4, keep=4)
    with pytest.raises(ValueError, match=r"RAFTConfig\.prompts_per_iteration = 0: must be >= 1"):
        RAFTConfig(prompts_per_iteration=0)
    with pytest.raises(ValueError, match=r"RAFTConfig\.learning_rate = nan: must be a finite number > 0"):
        RAFTConfig(learning_rate=float("nan"))
    with pytest.raises(ConfigError, match="unknown key 'top_k'"):
        load_config(RAFTConfig, None, ["top_k=2"])
    with pytest.raises(ConfigError, match="rank_by"):
        load_config(RAFTConfig, None, ["rank_by=gold_score"])


def test_kept_samples_are_the_reward_models_best_per_prompt(core32):
    core = EnvCore(reference=core32.reference, tokenizer=core32.tokenizer, reward_model=word_count_rm)
    envs = fresh_envs(core, num_envs=16)
    config = RAFTConfig(
        samples_per_prompt=3, prompts_per_iteration=5, epochs=1, batch_size=4, seed=1
    )  # 15 rows: a padded chunk
    agent = RAFTAgent(envs, config)
    seen = {}
    fine_tune = agent.fine_tune

    def spy(batch, rows, iteration):
        seen["batch"], seen["rows"] = batch, rows
        return fine_tune(batch, rows, iteration)

    agent.fine_tune = spy
    (metrics,) = agent.learn(iterations=1)
    batch, rows = seen["batch"], seen["rows"].tolist()
    assert len(batch.responses) == 15 and len(rows) == 5
    groups = batch.prompt_indices.reshape(5, 3)
    assert (groups == groups[:, :1]).all(), "k consecutive samples per prompt"
    # The scores are the reward model's (not the gold's), and the kept row is their argmax in each group.
    assert batch.rm_scores.tolist() == word_count_rm(batch.prompts, batch.responses)
    assert not torch.allclose(batch.rm_scores, batch.gold_scores)
    for g in range(5):
        scores = [batch.rm_scores[3 * g + j].item() for j in range(3)]
        assert rows[g] == 3 * g + scores.index(max(scores))
    assert metrics["kept_rm_score"] == pytest.approx(np.mean([batch.rm_scores[r].item() for r in rows]))
    assert metrics["kept_rm_score"] >= metrics["rm_score"]
    # The SFT batch is the sampled tokens, labelled on the response only.
    minibatch = rollout_batch(batch, seen["rows"])
    p = batch.response_start
    assert (minibatch["labels"][:, :p] == IGNORE_INDEX).all()
    for i, row in enumerate(rows):
        n = int(batch.response_mask[row].sum())
        assert minibatch["labels"][i, p : p + n].tolist() == batch.input_ids[row, p : p + n].tolist()
        assert (minibatch["labels"][i, p + n :] == IGNORE_INDEX).all()


def test_raft_learns_on_the_default_task(core32):
    envs = fresh_envs(core32, num_envs=64)
    # Faster than the defaults, which trade speed for reward per nat of KL: 8 samples x 32 prompts, 2 epochs.
    config = {"iterations": 6, "samples_per_prompt": 8, "prompts_per_iteration": 32, "epochs": 2, "seed": 0}
    agent = make_agent("raft", envs, config)
    assert isinstance(agent, RAFTAgent)
    before = agent.evaluate(num_episodes=256, seed=123)
    assert before["kl"] == pytest.approx(0.0, abs=1e-3)
    history = agent.learn()
    after = agent.evaluate(num_episodes=256, seed=123)
    assert len(history) == 6 and agent.history == history
    for m in history:
        assert set(METRIC_KEYS) <= set(m) and all(type(v) is float for v in m.values())
        assert {"kept_rm_score", "kept_gold_score", "kept_kl", "kept_length", "sft_loss"} <= set(m)
        assert m["kept_rm_score"] > m["rm_score"] and math.isfinite(m["sft_loss"])
    assert [m["iteration"] for m in history] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    tokens, wall = [m["tokens"] for m in history], [m["wall_time"] for m in history]
    assert tokens == sorted(tokens) and wall == sorted(wall), "cumulative tokens and time since learn()"
    assert history[-1]["kl"] > 0.1 and after["kl"] > 0.1, "the policy moved away from pi_ref"
    assert after["rm_score"] > before["rm_score"] + 0.1, (before, after)


def test_act_save_load_and_nan(core32, tmp_path, monkeypatch):
    envs = fresh_envs(core32, num_envs=4)
    agent = RAFTAgent(envs, RAFTConfig(samples_per_prompt=2, prompts_per_iteration=2, batch_size=2))
    obs, _ = envs.reset(seed=0)
    actions = agent.act(obs)
    assert actions.shape == (4,) and np.issubdtype(actions.dtype, np.integer)
    assert ((actions >= 0) & (actions < core32.vocab_size)).all()
    with torch.no_grad():
        for p in envs.policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    agent.save(tmp_path / "policy")
    other = RAFTAgent(fresh_envs(core32, num_envs=4), RAFTConfig(samples_per_prompt=2))
    other.load(tmp_path / "policy")
    ids = torch.as_tensor(obs["input_ids"][:, : envs.response_start])
    with torch.no_grad():
        torch.testing.assert_close(other.envs.policy(input_ids=ids).logits, envs.policy(input_ids=ids).logits)
    real_loss = sft.sft_loss
    monkeypatch.setattr(sft, "sft_loss", lambda m, b: real_loss(m, b) * float("inf"))
    before = [p.detach().clone() for p in envs.policy.parameters()]
    with pytest.raises(NonFiniteLossError, match="SFT loss is inf in RAFT iteration 1"):
        agent.learn(iterations=1)
    assert all(torch.equal(a, b) for a, b in zip(before, envs.policy.parameters(), strict=True))
