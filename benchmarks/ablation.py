"""What each speed fix buys: a REINFORCE/RLOO iteration with all of them, and with each one turned off.

The workload is the TRL comparison's: pi_ref and the learned reward model of the default pipeline, 16
prompts x 4 samples, up to 32 new tokens, rows ending at their own EOS. Each variant trains its own agent
from the same seed; the variants take turns, one iteration each per round (after a warm-up round), and
the median per variant is reported. The fixes, and the `text_env.SpeedOptions` of the variant's env that
turns each off (`VARIANTS`):

* **drop ended rows**: the sampler removes finished rows from the KV cache once a quarter of the batch
  has ended (off: `compact_below=0`, every row decodes to the end);
* **length groups**: teacher-forced forwards (reference, reward model, update) run rows of similar length
  together, each group cut to its own width (off: `group_by_length=False`, one group);
* **fused GELU**: GPT-2's eight-op `gelu_new` replaced by torch's one-kernel tanh GELU (off: swapped back
  in that variant's models, `unfused_gelu`; not a speed option: it is the models' own code);
* **inverse-CDF sampling**: one uniform per row instead of `torch.multinomial`'s V (off:
  `sampler="multinomial"`);
* **preallocated KV cache**: written in place (`text_env.kv_cache`; off: `preallocate_cache=False`,
  transformers' `DynamicCache`, which copies the whole cache with `torch.cat` every step);
* **shared reference forward**: the reward model's head reads pi_ref's log-prob statistics, which the
  env's reference forward (for the KL) already computes (off: `share_reference_forward=False`, the reward
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

from torch import nn

from benchmarks.common import OUT, describe, machine_info, markdown_table, pipeline_outputs
from text_env.speed import SpeedOptions

UNFUSED = "unfused gelu_new"

#: Variant -> the speed options of its env: each turns one fix off (the unfused variant swaps its models').
VARIANTS: dict[str, SpeedOptions] = {
    "all fixes": SpeedOptions(),
    "rows kept to the end": SpeedOptions(compact_below=0.0),
    "one padded forward": SpeedOptions(group_by_length=False),
    UNFUSED: SpeedOptions(),
    "torch.multinomial": SpeedOptions(sampler="multinomial"),
    "KV cache grown by torch.cat": SpeedOptions(preallocate_cache=False),
    "reward model runs its own pi_ref": SpeedOptions(share_reference_forward=False),
}


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


def make_agent(policy: str, reward_model: str, device: str, speed: SpeedOptions) -> Any:
    from agents.reinforce import ReinforceAgent, ReinforceConfig
    from text_env.config import EnvConfig

    envs = EnvConfig(model=policy, reward_model=reward_model, num_envs=64, device=device, speed=speed).make()
    return ReinforceAgent(
        envs, ReinforceConfig()
    )  # the defaults: what `rlhf-gym train --agent reinforce` runs


def models_of(envs: Any) -> list[nn.Module]:
    """The models a variant's iteration runs: policy, reference, and the reward model when it is one."""
    reward_model = envs.reward_model
    return [envs.policy, envs.reference, *([reward_model] if isinstance(reward_model, nn.Module) else [])]


def run(quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Each variant trains its own agent (same seed); the variants take turns, one iteration each per round,
    so that a change in the machine's load falls on all of them alike."""
    policy, reward_model = pipeline_outputs()
    rounds = 2 if quick else 8
    names = list(VARIANTS)
    agents = {name: make_agent(policy, reward_model, device, VARIANTS[name]) for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds + 1):  # round 0 warms every agent up and is not counted
        for name, agent in agents.items():
            unfused = unfused_gelu(models_of(agent.envs)) if name == UNFUSED else contextlib.nullcontext()
            with unfused:
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
