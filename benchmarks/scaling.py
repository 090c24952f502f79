"""How an iteration's cost grows with the response length (32 to 256) and the batch (16 to 256).

An iteration of our PPO or REINFORCE agent is one rollout (generation through the env, then scoring) and
the update. With the KV cache, generating token t costs a forward of one token (attention over t cached
positions), so the cost per generated token should stay nearly flat in the length; recomputing the prefix
each step would make it grow linearly (quadratic per response).

The tiny model's context (128 positions) is too short for 256 new tokens, so this benchmark builds a GPT-2
of the same size with 512 positions (random weights: the cost of a forward does not depend on them), and
fixes every response at exactly N tokens (`min_new_tokens`) so that each point measures N tokens per row.
The reward is the task's gold reward (no learned reward model of that context length exists); the
reference forward and the KL are computed as always.

    python -m benchmarks.scaling [--quick] [--agents reinforce ppo]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import median
from typing import Any
from unittest import mock

import torch

import text_env
from agents.registry import make_agent
from benchmarks.common import OUT, describe, machine_info, markdown_table, timed_calls
from text_env.core import EnvCore
from text_env.tasks.reviews.model import TinyConfig, tiny_gpt2

LENGTHS = (32, 64, 128, 256)
BATCHES = (16, 32, 64, 128, 256)
BASE_BATCH, BASE_LENGTH = 64, 32


def long_context_core(new_tokens: int, device: str, context: int = 512) -> EnvCore:
    """The tiny model's architecture with `context` positions and a fixed response length."""
    from text_env.tasks.reviews.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = tiny_gpt2(tokenizer, TinyConfig(n_positions=context)).to(device).eval()
    return EnvCore(
        reference=model,
        tokenizer=tokenizer,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        device=device,
    )


def time_iterations(agent_name: str, batch: int, new_tokens: int, iterations: int, device: str) -> dict:
    """Median seconds per iteration (after one warm-up) and its rollout share, for one (B, N) point."""
    envs = text_env.TextGenVectorEnv(num_envs=batch, core=long_context_core(new_tokens, device))
    agent = make_agent(agent_name, envs)  # the agent's default config, as `rlhf-gym train --agent NAME`
    agent.learn(iterations=1)  # warm-up
    totals, rollouts, parts = [], [], {}
    with mock.patch.object(text_env, "rollout", timed_calls(text_env.rollout, parts, "rollout")):
        for _ in range(iterations):
            parts.clear()
            start = time.perf_counter()
            agent.learn(iterations=1)  # one rollout, then the update
            totals.append(time.perf_counter() - start)
            rollouts.append(parts["rollout"])
    seconds = median(totals)
    rollout = median(rollouts)
    return {
        "agent": agent_name,
        "batch": batch,
        "new_tokens": new_tokens,
        "seconds_per_iteration": seconds,
        "rollout_seconds": rollout,
        "update_seconds": seconds - rollout,
        "ms_per_token": 1000 * seconds / (batch * new_tokens),
    }


def run(
    quick: bool = False, agents: tuple[str, ...] = ("reinforce", "ppo"), device: str = "cpu"
) -> dict[str, Any]:
    lengths = LENGTHS[:2] if quick else LENGTHS
    batches = BATCHES[:2] if quick else BATCHES
    iterations = 1 if quick else 3
    points = []
    for agent in agents:
        for n in lengths:
            points.append({"axis": "length", **time_iterations(agent, BASE_BATCH, n, iterations, device)})
        for b in batches:
            if b == BASE_BATCH and BASE_LENGTH in lengths:  # already measured on the length axis
                same = next(p for p in points if p["agent"] == agent and p["new_tokens"] == BASE_LENGTH)
                points.append({**same, "axis": "batch"})
                continue
            points.append({"axis": "batch", **time_iterations(agent, b, BASE_LENGTH, iterations, device)})
    result = {"machine": machine_info(), "device": device, "points": points}
    for agent in agents:
        by_length = {p["new_tokens"]: p for p in points if p["agent"] == agent and p["axis"] == "length"}
        shortest, longest = min(by_length), max(by_length)
        result[f"{agent}_cost_per_token_ratio"] = (
            by_length[longest]["ms_per_token"] / by_length[shortest]["ms_per_token"]
        )
    return result


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    agents = sorted({p["agent"] for p in result["points"]})
    for agent in agents:
        length = [p for p in result["points"] if p["agent"] == agent and p["axis"] == "length"]
        batch = [p for p in result["points"] if p["agent"] == agent and p["axis"] == "batch"]
        axes[0].plot([p["new_tokens"] for p in length], [p["seconds_per_iteration"] for p in length], "o-",
                     label=agent)  # fmt: skip
        axes[1].plot(
            [p["new_tokens"] for p in length], [p["ms_per_token"] for p in length], "o-", label=agent
        )
        axes[2].plot(
            [p["batch"] for p in batch], [p["seconds_per_iteration"] for p in batch], "o-", label=agent
        )
    axes[0].set(xlabel="response length N (tokens)", ylabel="seconds per iteration",
                title=f"time per iteration, batch {BASE_BATCH}")  # fmt: skip
    axes[1].set(xlabel="response length N (tokens)", ylabel="ms per generated token",
                title="cost per generated token", ylim=(0, None))  # fmt: skip
    axes[2].set(xlabel="batch B (responses)", ylabel="seconds per iteration",
                title=f"time per iteration, N = {BASE_LENGTH}")  # fmt: skip
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(describe(result["machine"]), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(result: dict[str, Any]) -> str:
    rows = [
        [
            p["agent"],
            p["batch"],
            p["new_tokens"],
            f"{p['seconds_per_iteration']:.2f}",
            f"{p['rollout_seconds']:.2f}",
            f"{p['update_seconds']:.2f}",
            f"{p['ms_per_token']:.3f}",
        ]
        for p in result["points"]
        if not (p["axis"] == "batch" and p["batch"] == BASE_BATCH and p["new_tokens"] == BASE_LENGTH)
    ]
    ratios = ", ".join(
        f"{k.removesuffix('_cost_per_token_ratio')} {v:.2f}x"
        for k, v in result.items()
        if k.endswith("_cost_per_token_ratio")
    )
    table = markdown_table(
        ["agent", "batch", "new tokens", "s/iteration", "rollout s", "update s", "ms/token"], rows
    )
    return f"{table}\n\nCost per generated token, longest vs shortest response: {ratios}."


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--agents", nargs="+", default=["reinforce", "ppo"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    result = run(args.quick, tuple(args.agents), args.device)
    OUT.mkdir(exist_ok=True)
    (OUT / "scaling.json").write_text(json.dumps(result, indent=2))
    result["plot"] = str(plot(result, OUT / "scaling.png"))
    print(f"machine: {describe(result['machine'])}\n\n{markdown(result)}\nplot: {result['plot']}")
    return result


if __name__ == "__main__":
    main()
