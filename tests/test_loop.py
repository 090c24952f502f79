"""The shared learn() loop: metrics by hand, iteration numbers and tokens across calls, callback, NaN, budget."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from agents.base import METRIC_KEYS, NonFiniteLossError, check_finite
from agents.loop import Iteration, check_iterations, run_iterations
from text_env.sampler import Rollout


def hand_batch(scale: float = 1.0) -> Rollout:
    """Two episodes of lengths 2 and 1 (N = 3 columns), with round numbers to check the metrics by hand."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    return Rollout(
        prompts=["a", "b"],
        responses=["x y", "z"],
        prompt_indices=np.array([0, 1]),
        input_ids=torch.zeros(2, 4, dtype=torch.long),
        attention_mask=torch.ones(2, 4, dtype=torch.long),
        response_start=1,
        response_mask=mask,
        logprobs=torch.zeros(2, 3),
        ref_logprobs=torch.zeros(2, 3),
        entropy=torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]]),  # 9 at padding: must not count
        rewards=torch.tensor([0.5, 1.5]) * scale,
        rm_scores=torch.tensor([1.0, 2.0]) * scale,
        kl=torch.tensor([0.25, 0.75]),
        gold_scores=torch.tensor([-1.0, 0.0]),
    )


@dataclass
class Config:
    iterations: int = 3


@dataclass
class FakeAgent:
    """What `run_iterations` needs of an agent: a history and a config with an iteration budget."""

    config: Config = field(default_factory=Config)
    history: list[dict[str, float]] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)  # iteration numbers handed to the algorithm

    def one_iteration(self, iteration: int) -> Iteration:
        self.seen.append(iteration)
        return Iteration(hand_batch(scale=iteration), tokens=10, metrics={"loss": -float(iteration)})


def test_metrics_are_the_shared_ones_of_the_batch_then_the_algorithms_own():
    agent = FakeAgent()
    rows = run_iterations(agent, agent.one_iteration, 2)
    assert agent.seen == [1, 2] and agent.history == rows
    first = rows[0]
    assert list(first)[: len(METRIC_KEYS)] == list(METRIC_KEYS) and list(first)[-1] == "loss"
    assert first["iteration"] == 1.0 and first["loss"] == -1.0
    assert first["rm_score"] == pytest.approx(1.5) and first["reward"] == pytest.approx(1.0)
    assert first["kl"] == pytest.approx(0.5) and first["gold_score"] == pytest.approx(-0.5)
    assert first["length"] == pytest.approx(1.5)
    assert first["entropy"] == pytest.approx((1.0 + 2.0 + 3.0) / 3)  # padding excluded
    assert rows[1]["rm_score"] == pytest.approx(3.0)  # the second iteration's own batch
    assert [r["tokens"] for r in rows] == [10.0, 20.0]  # Iteration.tokens, not the batch's 3 tokens
    assert 0.0 <= rows[0]["wall_time"] <= rows[1]["wall_time"]
    assert all(isinstance(v, float) for r in rows for v in r.values())


def test_algorithm_metrics_replace_shared_ones_of_the_same_name():
    agent = FakeAgent()
    rows = run_iterations(agent, lambda it: Iteration(hand_batch(), 3, {"kl": 7.0}), 1)
    assert rows[0]["kl"] == 7.0 and list(rows[0]) == list(METRIC_KEYS)  # replaced in place, order kept


def test_iteration_numbers_and_tokens_continue_across_calls():
    agent = FakeAgent()
    run_iterations(agent, agent.one_iteration, 2)
    rows = run_iterations(agent, agent.one_iteration, 2)
    assert agent.seen == [1, 2, 3, 4]
    assert [r["iteration"] for r in rows] == [3.0, 4.0] and [r["tokens"] for r in rows] == [30.0, 40.0]
    assert [r["iteration"] for r in agent.history] == [1.0, 2.0, 3.0, 4.0]


def test_callback_sees_each_iterations_metrics_and_false_stops():
    agent, calls = FakeAgent(), []

    def callback(agent_, metrics):
        calls.append((agent_, metrics))
        return None if metrics["iteration"] < 2 else False  # None goes on; only False stops

    rows = run_iterations(agent, agent.one_iteration, 5, callback)
    assert len(rows) == 2 and agent.seen == [1, 2]
    assert [m for _, m in calls] == rows and all(a is agent for a, _ in calls)
    assert calls[0][1] is agent.history[0]  # the recorded dict itself, already in the history


def test_a_nan_loss_names_the_iteration_and_records_nothing_of_it():
    agent, saved = FakeAgent(), []

    def one_iteration(iteration: int) -> Iteration:
        loss = torch.tensor(math.nan if iteration == 2 else 1.0)
        check_finite(loss, "test loss", iteration)
        return Iteration(hand_batch(), 10)

    def save_checkpoint(agent_, metrics):
        saved.append(metrics["iteration"])

    with pytest.raises(NonFiniteLossError, match="test loss is nan at iteration 2"):
        run_iterations(agent, one_iteration, 3, save_checkpoint)
    assert saved == [1.0] and len(agent.history) == 1  # the callback never saw iteration 2
    rows = run_iterations(agent, agent.one_iteration, 1)  # a later call retries iteration 2
    assert rows[0]["iteration"] == 2.0 and rows[0]["tokens"] == 20.0


def test_the_budget_defaults_to_the_config_and_is_validated():
    agent = FakeAgent(config=Config(iterations=3))
    assert len(run_iterations(agent, agent.one_iteration)) == 3
    assert run_iterations(agent, agent.one_iteration, 0) == [] and agent.seen == [1, 2, 3]
    assert len(run_iterations(agent, agent.one_iteration, np.int64(1))) == 1
    with pytest.raises(ValueError, match="iterations must be an integer >= 0, got -1"):
        run_iterations(agent, agent.one_iteration, -1)
    for bad in (2.5, True, "3"):
        with pytest.raises(TypeError, match="iterations must be an integer >= 0"):
            check_iterations(bad)
    with pytest.raises(TypeError, match=r"got 2\.0 \(float\)"):
        run_iterations(FakeAgent(config=Config(iterations=2.0)), agent.one_iteration)
    assert agent.seen == [1, 2, 3, 4]  # nothing ran on a rejected budget
