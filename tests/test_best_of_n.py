"""Best-of-n: it keeps the reward model's argmax per prompt, reports its KL (estimate and bound), beats pi_ref."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import agents
import text_env
from agents.base import METRIC_KEYS, evaluate_policy
from agents.best_of_n import BestOfN, BestOfNAgent, _take, selection_kl
from rlhf_base.best_of_n import best_of_n_kl_estimate
from text_env.core import EnvCore
from text_env.sampler import Rollout


@pytest.fixture(scope="module")
def length_core() -> EnvCore:
    """A stub reward model that prefers longer responses (in characters): the longest sample must win."""
    return EnvCore(reward_model=lambda prompts, responses: [len(r) for r in responses], max_new_tokens=16)


@pytest.mark.parametrize("n, num_prompts", [(4, 5), (12, 2)], ids=["n<num_envs", "n>num_envs"])
def test_best_of_n_picks_the_reward_models_argmax_per_prompt(length_core, n, num_prompts):
    # num_envs 8: 5 prompts x 4 = 20 samples need 3 rollouts (the last one part filler); 2 x 12 = 24 need 3,
    # and each prompt's 12 samples span two rollouts.
    envs = text_env.TextGenVectorEnv(num_envs=8, core=length_core)
    agent = agents.make_agent("best_of_n", envs, {"samples_per_prompt": n})
    prompt_ids = np.arange(num_prompts) * 7
    result = agent.best_of(prompt_ids)
    assert len(result.samples.responses) == num_prompts * n and len(result.best.responses) == num_prompts
    np.testing.assert_array_equal(result.samples.prompt_indices, np.repeat(prompt_ids, n))
    np.testing.assert_array_equal(result.best.prompt_indices, prompt_ids)
    for i in range(num_prompts):
        candidates = result.samples.responses[i * n : (i + 1) * n]
        assert i * n <= result.chosen[i] < (i + 1) * n
        assert result.best.responses[i] == result.samples.responses[result.chosen[i]]
        assert len(result.best.responses[i]) == max(len(r) for r in candidates)
        assert result.best.rm_scores[i].item() == len(result.best.responses[i])
    assert len({len(r) for r in result.samples.responses}) > 1  # the choice was not trivial


def test_select_takes_prompt_strings_or_indices(length_core):
    agent = agents.make_agent(
        "best_of_n", text_env.TextGenVectorEnv(num_envs=8, core=length_core), {"samples_per_prompt": 4}
    )
    prompts = list(length_core.task.prompts[:3])
    chosen = agent.select(prompts)
    assert len(chosen) == 3 and all(isinstance(r, str) for r in chosen)
    assert len(agent.select([0, 1])) == 2
    with pytest.raises(ValueError, match="not one of the env's task prompts"):
        agent.select(["a prompt the env has never seen"])


def test_learn_reports_the_chosen_responses_the_kl_estimate_and_its_bound(length_core):
    envs = text_env.TextGenVectorEnv(num_envs=8, core=length_core)
    envs.beta = 0.3  # the env's beta, which best-of-n's reward metric must use (module core: restored below)
    agent = agents.make_agent(
        "best_of_n", envs, {"samples_per_prompt": 4, "prompts_per_iteration": 4, "iterations": 2}
    )
    assert isinstance(agent, agents.Agent) and isinstance(agent, BestOfNAgent)
    before = [p.detach().clone() for p in envs.policy.parameters()]
    history = agent.learn()
    assert len(history) == 2 and agent.history == history
    for m in history:
        assert set(METRIC_KEYS) | {"n", "kl_bound", "kl_measured_env", "rm_score_all"} <= set(m)
        assert m["kl_bound"] == pytest.approx(math.log(4) - 0.75)
        assert 0.0 < m["kl"] <= m["kl_bound"]  # the estimate, never above the analytic upper bound
        assert m["reward"] == pytest.approx(m["rm_score"] - 0.3 * m["kl"])
        assert abs(m["kl_measured_env"]) < 1e-3  # pi = pi_ref token-wise
        assert m["rm_score"] >= m["rm_score_all"] and m["n"] == 4.0
    assert history[1]["tokens"] > history[0]["tokens"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, envs.policy.parameters(), strict=True))
    envs.beta = 0.05


def test_best_of_8_beats_pi_refs_mean_reward_model_score():
    envs = text_env.TextGenVectorEnv(num_envs=64, core=EnvCore(max_new_tokens=16))
    reference = evaluate_policy(envs, num_episodes=128, seed=1)
    agent = agents.make_agent(
        "best_of_n", envs, {"samples_per_prompt": 8, "prompts_per_iteration": 32, "iterations": 1}
    )
    (m,) = agent.learn()
    assert m["rm_score"] > reference["rm_score"] + 0.2, (m["rm_score"], reference["rm_score"])
    assert m["rm_score"] > m["rm_score_all"] + 0.2
    assert m["kl_bound"] == pytest.approx(math.log(8) - 7 / 8) and 0.0 < m["kl"] <= m["kl_bound"]


def _rollout(
    prompt_indices: list[int], tokens: list[list[int]], logprobs: list[list[float]], scores: list[float]
):
    """A hand-made Rollout: responses of the given tokens and token log-probs, padding holding NaN."""
    width = max(map(len, tokens))
    ids = torch.tensor([t + [0] * (width - len(t)) for t in tokens])  # (B, N)
    mask = torch.tensor([[1.0] * len(t) + [0.0] * (width - len(t)) for t in tokens])  # (B, N)
    lp = torch.tensor([x + [math.nan] * (width - len(x)) for x in logprobs])  # (B, N): NaN must not leak
    rows, scores_t = len(tokens), torch.tensor(scores)
    return Rollout(
        prompts=["p"] * rows, responses=[str(t) for t in tokens], prompt_indices=np.array(prompt_indices),
        input_ids=torch.cat([torch.ones(rows, 1, dtype=torch.long), ids], 1),
        attention_mask=torch.cat([torch.ones(rows, 1), mask], 1), response_start=1, response_mask=mask,
        logprobs=lp, ref_logprobs=lp, entropy=torch.zeros(rows, width), rewards=scores_t, rm_scores=scores_t,
        kl=torch.zeros(rows), gold_scores=torch.full((rows,), math.nan),
    )  # fmt: skip


def test_the_kl_estimate_pools_each_prompts_distinct_completions():
    """Prompt 7: [5, 6] twice (one outcome), [9], [5]; prompt 3: [4] four times. Sequence log-probs are the
    masked sums; the metric is the mean over the prompts of each one's estimate over its distinct outcomes."""
    samples = _rollout(
        [7, 7, 7, 7, 3, 3, 3, 3],
        [[5, 6], [5, 6], [9], [5], [4], [4], [4], [4]],
        [[-0.5, -0.7], [-0.5, -0.7], [-2.0], [-1.5], [-0.1], [-0.1], [-0.1], [-0.1]],
        [1.0, 1.0, 2.0, 0.5, 3.0, 3.0, 3.0, 3.0],
    )
    chosen = np.array([2, 4])
    result = BestOfN(samples=samples, chosen=chosen, best=_take(samples, chosen))
    expected = [
        best_of_n_kl_estimate([-1.2, -1.2, -2.0, -1.5], [1.0, 1.0, 2.0, 0.5], 4, ["56", "56", "9", "5"]),
        best_of_n_kl_estimate([-0.1], [3.0], 4),  # one outcome: counted four times, its mass 0.9 would be 3.6
    ]
    assert selection_kl(result, 4) == pytest.approx(np.mean(expected), abs=1e-6)
    assert 0.0 < expected[1] < expected[0] < math.log(4) - 0.75
