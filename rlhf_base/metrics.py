"""The metric vocabulary: one set of names from the env's `info` through the agents to the sweep's CSVs.

The env's terminal `info` carries `rm_score`, `gold_score` and `kl`; every agent reports the same names per
iteration (`agents.base.rollout_metrics`); the sweep writes them as the columns of results.csv and
curves.csv, and the report reads them back (`rlhf_gym.report.schema`). Nothing renames them on the way,
so a number can be followed by its name from the env to the table (issue 11). The words people read
("proxy reward", "gold reward") stay in plot labels and prose.

This module sits on floor 1 so that the agents (which compute the metrics) and the report (which must
read a run folder without loading torch models) share one definition.
"""

from __future__ import annotations

__all__ = ["METRIC_KEYS", "OPTIONAL_METRIC_KEYS"]

#: The metrics every agent reports per iteration, so sweeps compare like with like.
METRIC_KEYS = (
    "iteration",  # 1-based learning iteration (0 for an evaluation of the starting policy)
    "rm_score",  # mean proxy reward: the reward model's score, what the agent optimises
    "gold_score",  # mean gold reward (NaN when the task has none): evaluation only
    "kl",  # mean per-response KL(pi || pi_ref) estimate: always k1, the sum of log pi - log pi_ref over the
    # sampled tokens (the env's), whatever KL term an agent optimises (which PPO and REINFORCE report as
    # `kl_objective`); best-of-n reports the KL of its selection instead
    "reward",  # mean env reward: rm_score - beta * kl
    "length",  # mean response length in tokens (EOS included)
    "entropy",  # mean per-token entropy of the policy while sampling
    "wall_time",  # seconds since learn() started
    "tokens",  # response tokens generated so far by this agent
)

#: Metrics only some agents report, which the sweep's CSVs carry too (NaN in the rows of the others).
OPTIONAL_METRIC_KEYS = (
    "kl_bound",  # an analytic upper bound on `kl`, where the method has one (best-of-n: log n - (n-1)/n)
)
