"""Agents that act on the text env: PPO, REINFORCE (RLOO), GRPO, Dr. GRPO, ReMax, REINFORCE++, best-of-n,
RAFT, DPO (offline and online), stable-baselines3, and yours.

from agents import make_agent, available
agent = make_agent("ppo", envs, {"iterations": 20})
history = agent.learn()
"""

from agents.base import METRIC_KEYS, Agent, NonFiniteLossError, evaluate_policy, rollout_metrics
from agents.loop import Iteration, run_iterations
from agents.registry import ENTRY_POINT_GROUP, available, get_agent_class, make_agent, register_agent

__all__ = [
    "ENTRY_POINT_GROUP",
    "METRIC_KEYS",
    "Agent",
    "Iteration",
    "NonFiniteLossError",
    "available",
    "evaluate_policy",
    "get_agent_class",
    "make_agent",
    "register_agent",
    "rollout_metrics",
    "run_iterations",
]
