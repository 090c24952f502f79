"""Rollout throughput: the batched, KV-cached env against a naive one-episode-at-a-time env, in one run.

The naive baseline is what a generic RL loop does with a single `TextGenEnv`: each step it runs the policy
over the whole prefix (no cache), samples one token and steps the env. Both generate exactly
`max_new_tokens` tokens per episode (EOS masked until then), so tokens/s compare like for like.

    python -m benchmarks.rollout [--batch 64] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import text_env
from text_env.core import EnvCore
from text_env.scoring import position_ids_from_mask

OUT = Path(__file__).parent / "out"


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {platform.python_version()}"


@torch.no_grad()
def naive_episode(env: text_env.TextGenEnv, generator: torch.Generator, new_tokens: int) -> int:
    obs, _ = env.reset()
    eos = env.tokenizer.eos_token_id
    for t in range(new_tokens):
        ids = torch.as_tensor(obs["input_ids"])[None]
        mask = torch.as_tensor(obs["attention_mask"])[None]
        logits = env.policy(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).logits
        last = logits[0, env.core.prompt_width + t - 1].float()
        if t < new_tokens - 1:
            last[eos] = float("-inf")
        token = int(torch.multinomial(last.softmax(-1), 1, generator=generator))
        obs, _, terminated, _, _ = env.step(token)
        if terminated:
            return t + 1
    return new_tokens


def bench_batched(core: EnvCore, batch: int, new_tokens: int, repeats: int) -> dict:
    envs = text_env.TextGenVectorEnv(num_envs=batch, core=core)
    gen = torch.Generator().manual_seed(0)
    text_env.rollout(envs, min_new_tokens=new_tokens, generator=gen)  # warm-up
    tokens, start = 0, time.perf_counter()
    for _ in range(repeats):
        tokens += text_env.rollout(envs, min_new_tokens=new_tokens, generator=gen).num_tokens
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def bench_naive(core: EnvCore, episodes: int, new_tokens: int) -> dict:
    env = text_env.TextGenEnv(core=core)
    gen = torch.Generator().manual_seed(0)
    naive_episode(env, gen, new_tokens)  # warm-up
    tokens, start = 0, time.perf_counter()
    for _ in range(episodes):
        tokens += naive_episode(env, gen, new_tokens)
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--naive-episodes", type=int, default=16)
    args = parser.parse_args(argv)
    core = EnvCore(max_new_tokens=args.new_tokens)
    batched = bench_batched(core, args.batch, args.new_tokens, args.repeats)
    naive = bench_naive(core, args.naive_episodes, args.new_tokens)
    result = {
        "machine": machine(),
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "batched_kv_cache": batched,
        "naive_env": naive,
        "speedup": batched["tokens_per_s"] / naive["tokens_per_s"],
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "rollout.json").write_text(json.dumps(result, indent=2))
    print(f"machine: {result['machine']}")
    print(f"| rollout (batch {args.batch}, {args.new_tokens} new tokens) | tokens/s | vs naive |")
    print("|---|---:|---:|")
    print(f"| batched env + KV cache | {batched['tokens_per_s']:,.0f} | {result['speedup']:.1f}x |")
    print(f"| naive env, one episode at a time, prefix re-run | {naive['tokens_per_s']:,.0f} | 1.0x |")
    return result


if __name__ == "__main__":
    main()
