"""What each speed fix buys: a REINFORCE/RLOO iteration with all of them, and with each one turned off.

The workload is the TRL comparison's: pi_ref and the learned reward model of the default pipeline, 16
prompts x 4 samples, up to 32 new tokens, rows ending at their own EOS. Each variant trains its own agent
from the same seed; the variants take turns, one iteration each per round (after a warm-up round), and
the median per variant is reported. The fixes, and the switch that turns each off here:

* **drop ended rows**: the sampler removes finished rows from the KV cache once a quarter of the batch
  has ended (`text_env.sampler.COMPACT_BELOW`; off: 0, every row decodes to the end);
* **length groups**: teacher-forced forwards (reference, reward model, update) run rows of similar length
  together, each group cut to its own width (`rlhf_base.lm.CALL_OVERHEAD_TOKENS`; off: one group);
* **fused GELU**: GPT-2's eight-op `gelu_new` replaced by torch's one-kernel tanh GELU (off: swapped back);
* **inverse-CDF sampling**: one uniform per row instead of `torch.multinomial`'s V (off: multinomial);
* **preallocated KV cache**: written in place (`text_env.kv_cache`; off: transformers' `DynamicCache`,
  which copies the whole cache with `torch.cat` every step);
* **shared reference forward**: the reward model's head reads pi_ref's log-prob statistics, which the
  env's reference forward (for the KL) already computes (`Judge.shared_reward_model`; off: the reward
  model re-tokenises the text and runs its own copy of pi_ref).

Not switchable here, so not in the table: deferred scoring (one reference and reward-model forward per
batch instead of one per finishing step) and the shared prefill of a prompt's k samples.

    python -m benchmarks.ablation [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from statistics import median
from typing import Any
from unittest import mock

import torch
from torch import nn

import rlhf_base.lm
import text_env.judge
import text_env.sampler
from benchmarks.common import OUT, describe, machine_info, markdown_table, pipeline_outputs


@contextlib.contextmanager
def unfused_gelu(models: list[nn.Module]) -> Iterator[None]:
    """Put GPT-2's unfused `gelu_new` back where `rlhf_base.models.fuse_gelu` took it out."""
    from transformers.activations import NewGELUActivation

    swapped = []
    for model in models:
        for module in model.modules():
            for name, child in module.named_children():
                if isinstance(child, nn.GELU) and child.approximate == "tanh":
                    setattr(module, name, NewGELUActivation())
                    swapped.append((module, name, child))
    try:
        yield
    finally:
        for module, name, child in swapped:
            setattr(module, name, child)


def _multinomial(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def variants(models: list[nn.Module]) -> dict[str, Any]:
    """Name -> a context manager factory that turns one fix off."""
    return {
        "all fixes": contextlib.nullcontext,
        "rows kept to the end": lambda: mock.patch.object(text_env.sampler, "COMPACT_BELOW", 0.0),
        "one padded forward": lambda: mock.patch.dict(
            rlhf_base.lm.CALL_OVERHEAD_TOKENS, {"cpu": 10**12, "cuda": 10**12, "mps": 10**12}
        ),
        "unfused gelu_new": lambda: unfused_gelu(models),
        "torch.multinomial": lambda: mock.patch.object(text_env.sampler, "sample_categorical", _multinomial),
        "KV cache grown by torch.cat": lambda: mock.patch.object(text_env.sampler, "PREALLOCATE", False),
        "reward model runs its own pi_ref": lambda: mock.patch.object(
            text_env.judge.Judge, "shared_reward_model", lambda self: None
        ),
    }


def make_agent(policy: str, reward_model: str, device: str) -> Any:
    from agents.reinforce import ReinforceAgent, ReinforceConfig
    from text_env.config import EnvConfig

    envs = EnvConfig(model=policy, reward_model=reward_model, num_envs=64, device=device).make()
    return ReinforceAgent(
        envs, ReinforceConfig()
    )  # the defaults: what `rlhf-gym train --agent reinforce` runs


def run(quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Each variant trains its own agent (same seed); the variants take turns, one iteration each per round,
    so that a change in the machine's load falls on all of them alike."""
    policy, reward_model = pipeline_outputs()
    rounds = 2 if quick else 8
    names = list(variants([]))
    agents = {name: make_agent(policy, reward_model, device) for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds + 1):  # round 0 warms every agent up and is not counted
        for name, agent in agents.items():
            envs = agent.envs
            models = [
                envs.policy,
                envs.core.reference,
                getattr(envs.core.judge.reward_fn, "__self__", envs.policy),
            ]
            with variants(models)[name]():
                start = time.perf_counter()
                agent.learn(iterations=1)
                if round_:
                    seconds[name].append(time.perf_counter() - start)
    rows = [{"variant": n, "seconds_per_iteration": median(seconds[n]), "iterations": rounds} for n in names]
    base = rows[0]["seconds_per_iteration"]
    for row in rows:
        row["slowdown"] = row["seconds_per_iteration"] / base
    return {"machine": machine_info(), "device": device, "variants": rows}


def markdown(result: dict[str, Any]) -> str:
    rows = [
        [r["variant"], f"{r['seconds_per_iteration']:.3f}", f"{r['slowdown']:.2f}x"]
        for r in result["variants"]
    ]
    return "REINFORCE/RLOO iteration (64 = 16 x 4, natural lengths), each fix turned off alone:\n\n" + (
        markdown_table(["variant", "s / iteration", "vs all fixes"], rows)
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    result = run(args.quick, args.device)
    OUT.mkdir(exist_ok=True)
    (OUT / "ablation.json").write_text(json.dumps(result, indent=2))
    print(f"machine: {describe(result['machine'])}\n\n{markdown(result)}")
    return result


if __name__ == "__main__":
    main()
