"""Token throughput of SB3's collection (agents/sb3.py) against `text_env.rollout`, same model and batch.

SB3 steps one token per env step through a full forward of the whole padded observation (no KV cache), and
its `DummyVecEnv` steps and scores the B single envs one at a time; `text_env.rollout` prefills once, feeds one
token per row through the KV cache and scores finished rows in one batch. Both sample from the same policy
(tokens counted as generated, EOS included; SB3's updates move the policy a little between rounds), so the
ratio is the price of running SB3's algorithms as they are.

    python -m benchmarks.sb3_speed [--batch 16] [--new-tokens 32] [--n-steps 32] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import text_env
from agents.sb3 import EpisodeStatsCallback, SB3PPOAgent
from benchmarks.common import OUT, describe, machine_info, markdown_table
from text_env.core import EnvCore


def bench(envs: text_env.TextGenVectorEnv, n_steps: int, rounds: int) -> tuple[dict, dict]:
    """Alternate rounds of rollouts and SB3 PPO `learn` of about the same tokens, so both see the same load.

    SB3's collection alone is timed by a callback; `learn` adds PPO's update to it.
    """
    per_round = envs.num_envs * n_steps
    config = SB3PPOAgent.Config(n_envs=envs.num_envs, n_steps=n_steps, batch_size=min(256, per_round))
    agent = SB3PPOAgent(envs, config)
    generator = torch.Generator().manual_seed(0)
    text_env.rollout(envs, generator=generator)  # warm-ups
    agent.model.learn(total_timesteps=per_round)
    kv_tokens, kv_seconds, learn_seconds, stats = 0, 0.0, 0.0, EpisodeStatsCallback()
    for _ in range(rounds):
        start, tokens = time.perf_counter(), 0
        while tokens < per_round:
            tokens += text_env.rollout(envs, generator=generator).num_tokens
        kv_tokens, kv_seconds = kv_tokens + tokens, kv_seconds + time.perf_counter() - start
        start = time.perf_counter()
        agent.model.learn(total_timesteps=per_round, callback=stats, reset_num_timesteps=False)
        learn_seconds += time.perf_counter() - start
    kv = {"tokens": kv_tokens, "seconds": kv_seconds, "tokens_per_s": kv_tokens / kv_seconds}
    sb3 = {
        "tokens": stats.collect_steps,
        "collect_seconds": stats.collect_seconds,
        "collect_tokens_per_s": stats.collect_steps / stats.collect_seconds,
        "learn_seconds": learn_seconds,
        "learn_tokens_per_s": stats.collect_steps / learn_seconds,
    }
    return kv, sb3


def run(
    quick: bool = False, batch: int = 16, new_tokens: int = 32, n_steps: int = 32, rounds: int = 3
) -> dict:
    """Rollout vs SB3 PPO at `batch` rows on the built-in tiny model and the gold reward."""
    if quick:
        n_steps, rounds = 8, 1
    envs = text_env.TextGenVectorEnv(num_envs=batch, core=EnvCore(max_new_tokens=new_tokens))
    kv, sb3 = bench(envs, n_steps, rounds)
    return {
        "machine": machine_info(),
        "batch": batch,
        "new_tokens": new_tokens,
        "rollout_kv_cache": kv,
        "sb3_ppo": sb3,
        "slowdown_collect": kv["tokens_per_s"] / sb3["collect_tokens_per_s"],
        "slowdown_learn": kv["tokens_per_s"] / sb3["learn_tokens_per_s"],
    }


def markdown(result: dict) -> str:
    kv, sb3 = result["rollout_kv_cache"], result["sb3_ppo"]
    return markdown_table(
        [
            f"generation (batch {result['batch']}, up to {result['new_tokens']} new tokens)",
            "tokens/s",
            "slowdown",
        ],
        [
            ["text_env.rollout (batched env + KV cache)", f"{kv['tokens_per_s']:,.0f}", "1.0x"],
            [
                "SB3 PPO collect_rollouts (DummyVecEnv, full forward per token)",
                f"{sb3['collect_tokens_per_s']:,.0f}",
                f"{result['slowdown_collect']:.1f}x",
            ],
            [
                f"SB3 PPO learn (collection + {SB3PPOAgent.Config.n_epochs} epochs of updates)",
                f"{sb3['learn_tokens_per_s']:,.0f}",
                f"{result['slowdown_learn']:.1f}x",
            ],
        ],
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="B: rows of the vector env = SB3's n_envs")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--n-steps", type=int, default=32, help="SB3 steps per env per rollout")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more thrash on a shared CPU)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.quick, args.batch, args.new_tokens, args.n_steps, args.rounds)
    OUT.mkdir(exist_ok=True)
    (OUT / "sb3_speed.json").write_text(json.dumps(result, indent=2))
    print(f"machine: {describe(result['machine'])}\n\n{markdown(result)}")
    return result


if __name__ == "__main__":
    main()
