"""The learn() loop every built-in agent shares: the bookkeeping around an algorithm's iterations.

An algorithm file holds its algorithm: one iteration (collect, update) that returns the episodes to
measure and its own metrics. `run_iterations` owns the rest, identically for every agent, so a sweep
compares like with like (issue 11: each agent used to repeat this tail):

* the iteration budget (the config's `iterations` unless given) and its validation;
* iteration numbers, 1-based and continuing across learn() calls (`len(agent.history) + 1`);
* the clock (`wall_time`, seconds since this learn() call started) and the running token count;
* the shared metrics (`rollout_metrics`, see `METRIC_KEYS`), then the algorithm's own on top;
* the metrics stream (`agent.history`), the callback and its early stop.

It is a function, not a base class (no control flow shared through deep base classes, as SB3's is): an
agent's `learn` is one call, and its `_iteration(iteration)` reads top to bottom next to it, cleanrl-style.

    def learn(self, iterations=None, callback=None):
        return run_iterations(self, self._iteration, iterations, callback)

The NaN guard stays where the loss is, before `optimizer.step()` (`check_finite(loss, what, iteration)`
with the iteration number the loop hands over); when it raises, the loop has recorded nothing of that
iteration: no history row, no token count, and no callback, so a callback that saves checkpoints never
saves the weights of a failed iteration.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agents.base import Callback, rollout_metrics
from rlhf_base.distributed import sum_over_ranks
from text_env.sampler import Rollout

__all__ = ["Iteration", "check_iterations", "run_iterations"]


@dataclass
class Iteration:
    """What one iteration of an algorithm hands back to `run_iterations`."""

    batch: Rollout  # the episodes the shared metrics (METRIC_KEYS) describe, e.g. the rollout trained on
    tokens: int  # response tokens this iteration generated: its cost (best-of-n counts all n samples)
    metrics: dict[str, float] = field(default_factory=dict)  # the algorithm's own; same names replace shared


def check_iterations(iterations: Any) -> int:
    """`iterations` as an int >= 0, or an error that says what was given (0 runs nothing).

    Raises:
        TypeError: not an integer (a float such as 2.5, a bool, a string).
        ValueError: a negative count.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral):
        raise TypeError(
            f"iterations must be an integer >= 0, got {iterations!r} ({type(iterations).__name__})"
        )
    if iterations < 0:
        raise ValueError(f"iterations must be an integer >= 0, got {iterations}")
    return int(iterations)


def run_iterations(
    agent: Any,
    one_iteration: Callable[[int], Iteration],
    iterations: int | None = None,
    callback: Callback | None = None,
) -> list[dict[str, float]]:
    """Run `one_iteration` `iterations` times with the shared bookkeeping; return this call's metrics.

    Args:
        agent: the agent learning: its `history` (the metrics stream, appended to in place) numbers the
            iterations and carries the token count across calls; `agent.config.iterations` is the budget
            when `iterations` is None; the callback receives it.
        one_iteration: the algorithm, given the 1-based iteration number (for its NaN guard's message):
            collect, update, and return an `Iteration`.
        iterations: how many to run (default: `agent.config.iterations`).
        callback: called with `(agent, metrics)` after each iteration is recorded; returning False stops.

    Returns:
        One metrics dict per iteration run by this call: the shared `METRIC_KEYS` of `Iteration.batch`
        (with `tokens` the running total and `wall_time` the seconds since this call started), then the
        algorithm's own metrics, which replace shared ones of the same name (best-of-n's `kl`, the KL of its selection).

    Raises:
        TypeError, ValueError: `iterations` is not an integer >= 0.
        NonFiniteLossError: from `one_iteration`'s guard; nothing of that iteration is recorded.
    """
    count = check_iterations(agent.config.iterations if iterations is None else iterations)
    history: list[dict[str, float]] = agent.history
    tokens = int(history[-1]["tokens"]) if history else 0  # running total, exact as a float below 2**53
    start, rows = time.perf_counter(), []
    first = len(history) + 1
    for iteration in range(first, first + count):
        result = one_iteration(iteration)
        tokens += int(sum_over_ranks({"tokens": result.tokens})["tokens"])  # all ranks' (torchrun)
        metrics = rollout_metrics(result.batch, iteration, time.perf_counter() - start, tokens)
        metrics.update(result.metrics)
        history.append(metrics)
        rows.append(metrics)
        if callback is not None and callback(agent, metrics) is False:
            break
    return rows
