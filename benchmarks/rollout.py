"""Env throughput: the batched, KV-cached rollout against the naive env and the SB3 adapter, in one run.

* **Naive env**: what a generic RL loop does with one `TextGenEnv`: each step it runs the policy over the
  whole prefix (no cache), samples one token and steps the env; one episode at a time, so its rate does not
  depend on the batch. Like the batched rows it generates exactly `new_tokens` tokens (EOS masked).
* **SB3 adapter**: SB3's own `collect_rollouts` (A2C, `agents/sb3.py`) over a `DummyVecEnv` of B single envs:
  one batched forward of the B full observations per token (no KV cache), each env stepped and scored by
  itself. SB3 samples EOS when it likes, so this table uses natural lengths for both sides.
* **Bookkeeping**: the share of the batched rollout's wall time spent outside the forwards of the policy,
  the reference and the reward model (sampling, the env's buffers, host copies, tokenising, and the gold
  reward the env logs with every batch, whose share is also shown alone).

All sides use pi_ref and the learned reward model of the default pipeline.

    python -m benchmarks.rollout [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Any
from unittest import mock

import torch

import text_env
from benchmarks.common import OUT, ForwardTimer, describe, machine_info, markdown_table, sync, timed_calls
from rlhf_base.lm import position_ids_from_mask
from text_env.core import EnvCore

BATCHES = (1, 16, 64, 256)


@torch.no_grad()
def naive_episode(env: text_env.TextGenEnv, generator: torch.Generator, new_tokens: int) -> int:
    obs, _ = env.reset()
    eos = env.tokenizer.eos_token_id
    device = next(env.policy.parameters()).device
    for t in range(new_tokens):
        ids = torch.as_tensor(obs["input_ids"], device=device)[None]
        mask = torch.as_tensor(obs["attention_mask"], device=device)[None]
        logits = env.policy(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).logits
        last = logits[0, env.response_start + t - 1].float()
        if t < new_tokens - 1:
            last[eos] = float("-inf")
        token = int(torch.multinomial(last.softmax(-1), 1, generator=generator))
        obs, _, terminated, _, _ = env.step(token)
        if terminated:
            return t + 1
    return new_tokens


def batched_rate(core: EnvCore, batch: int, min_seconds: float) -> dict[str, Any]:
    """Tokens/s of `text_env.rollout` at `batch` rows (repeated for at least `min_seconds`), and where
    the time went: the forwards of each model, and the rest (bookkeeping)."""
    envs = text_env.TextGenVectorEnv(num_envs=batch, core=core)
    device = next(envs.policy.parameters()).device
    gen = torch.Generator(device=device).manual_seed(0)
    text_env.rollout(envs, generator=gen)  # warm-up
    models = {"policy": envs.policy, "reference": envs.reference}
    if isinstance(envs.reward_model, torch.nn.Module):
        models["reward_model"] = envs.reward_model
    # Profiling reaches into the judge on purpose: its gold call is timed alone (no public hook for that).
    gold_fn, parts = core.judge.gold_fn, {"gold": 0.0}
    time_gold = (  # not when the gold reward is the reward model: the judge then scores once
        mock.patch.object(core.judge, "gold_fn", timed_calls(gold_fn, parts, "gold"))
        if gold_fn is not None and gold_fn is not core.judge.reward_fn
        else contextlib.nullcontext()
    )
    tokens, rollouts = 0, 0
    with time_gold, ForwardTimer(models) as timer:
        sync(device)
        start = time.perf_counter()
        while rollouts < 2 or time.perf_counter() - start < min_seconds:
            tokens += text_env.rollout(envs, generator=gen).num_tokens
            rollouts += 1
        sync(device)
        seconds = time.perf_counter() - start
    return {
        "batch": batch,
        "tokens": tokens,
        "rollouts": rollouts,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "forward_seconds": dict(timer.seconds),
        "bookkeeping_share": 1.0 - timer.total / seconds,
        "gold_share": parts["gold"] / seconds,  # the task's gold reward (VADER), logged every batch
    }


def naive_rate(core: EnvCore, episodes: int, new_tokens: int) -> dict[str, Any]:
    env = text_env.TextGenEnv(core=core)
    gen = torch.Generator(device=next(env.policy.parameters()).device).manual_seed(0)
    naive_episode(env, gen, new_tokens)  # warm-up
    tokens, start = 0, time.perf_counter()
    for _ in range(episodes):
        tokens += naive_episode(env, gen, new_tokens)
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def sb3_rate(core: EnvCore, batch: int, n_steps: int) -> dict[str, Any]:
    """Tokens/s of SB3's own `collect_rollouts` (A2C) through the adapter: B single envs, n_steps each."""
    from agents.sb3 import EpisodeStatsCallback, SB3A2CAgent

    envs = text_env.TextGenVectorEnv(num_envs=batch, core=core)
    agent = SB3A2CAgent(envs, SB3A2CAgent.Config(n_envs=batch, n_steps=n_steps))
    model, stats = agent.model, EpisodeStatsCallback()
    _, callback = model._setup_learn(n_steps * batch, callback=stats)  # SB3's own learn() preamble
    callback.on_training_start(locals(), globals())
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=n_steps)  # warm-up
    stats.collect_seconds, stats.collect_steps = 0.0, 0
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=n_steps)
    return {
        "batch": batch,
        "tokens": stats.collect_steps,
        "seconds": stats.collect_seconds,
        "tokens_per_s": stats.collect_steps / stats.collect_seconds,
    }


def run(
    model: str | None = None,
    reward_model: str | None = None,
    quick: bool = False,
    new_tokens: int = 32,
    device: str = "cpu",
) -> dict[str, Any]:
    """Throughput at batch 1, 16, 64 and 256; `quick` runs batch 1 and 16 only, briefly."""
    batches = BATCHES[:2] if quick else BATCHES
    min_seconds = 0.5 if quick else 3.0
    kwargs = dict(model=model, reward_model=reward_model, max_new_tokens=new_tokens, device=device)
    fixed = EnvCore(min_new_tokens=new_tokens, **kwargs)  # every row generates `new_tokens`
    natural = EnvCore(**kwargs)  # rows end at their own EOS
    naive = naive_rate(fixed, 2 if quick else 12, new_tokens)
    rows = []
    for batch in batches:
        ours_fixed = batched_rate(fixed, batch, min_seconds)
        ours_natural = batched_rate(natural, batch, min_seconds)
        sb3 = sb3_rate(natural, batch, 8 if quick else new_tokens)
        rows.append(
            {
                "batch": batch,
                "fixed_length": ours_fixed,
                "natural_length": ours_natural,
                "sb3": sb3,
                "vs_naive": ours_fixed["tokens_per_s"] / naive["tokens_per_s"],
                "vs_sb3": ours_natural["tokens_per_s"] / sb3["tokens_per_s"],
            }
        )
    return {
        "machine": machine_info(),
        "new_tokens": new_tokens,
        "device": device,
        "naive": naive,
        "batches": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    n = result["new_tokens"]
    naive = result["naive"]["tokens_per_s"]
    fixed = [
        [
            r["batch"],
            f"{r['fixed_length']['tokens_per_s']:,.0f}",
            f"{naive:,.0f}",
            f"{r['vs_naive']:.1f}x",
            f"{r['fixed_length']['bookkeeping_share']:.1%}",
            f"{r['fixed_length']['gold_share']:.1%}",
        ]
        for r in result["batches"]
    ]
    natural = [
        [
            r["batch"],
            f"{r['natural_length']['tokens_per_s']:,.0f}",
            f"{r['sb3']['tokens_per_s']:,.0f}",
            f"{r['vs_sb3']:.1f}x",
            f"{r['natural_length']['bookkeeping_share']:.1%}",
            f"{r['natural_length']['gold_share']:.1%}",
        ]
        for r in result["batches"]
    ]
    return "\n\n".join(
        [
            f"Generated tokens/s, {n} new tokens per response (EOS masked until then):\n\n"
            + markdown_table(
                ["batch", "batched env + KV cache", "naive env", "speed-up", "bookkeeping", "of which gold"],
                fixed,
            ),
            "Natural lengths (rows end at their own EOS), against SB3's collect_rollouts via the adapter:\n\n"
            + markdown_table(
                [
                    "batch",
                    "batched env + KV cache",
                    "SB3 adapter",
                    "speed-up",
                    "bookkeeping",
                    "of which gold",
                ],
                natural,
            ),
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 16 only, briefly")
    parser.add_argument("--model", default=None, help="pi_ref dir (default: the built-in tiny model)")
    parser.add_argument("--reward-model", default=None, help="saved reward model (default: gold reward)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    result = run(args.model, args.reward_model, quick=args.quick, device=args.device)
    OUT.mkdir(exist_ok=True)
    (OUT / "rollout.json").write_text(json.dumps(result, indent=2))
    print(f"machine: {describe(result['machine'])}\n\n{markdown(result)}")
    return result


if __name__ == "__main__":
    main()
