"""The `rlhf-gym` command: one subcommand per stage of the pipeline.

Each subcommand lives in the module that owns the stage and registers itself here through `COMMANDS`, so
this file stays a table of contents. Heavy imports happen inside the handlers: `rlhf-gym --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable, Sequence

from rlhf_gym.commands import add_config_argument

__all__ = ["COMMANDS", "main"]


def _rollout(args: argparse.Namespace) -> int:
    """Build the embedded default, roll the policy out in the batched env, print a summary."""
    import numpy as np
    import torch

    import text_env

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    envs = text_env.TextGenVectorEnv(
        num_envs=args.num_envs, max_new_tokens=args.max_new_tokens, device=args.device
    )
    print(
        f"env: {args.num_envs} x text_env/TextGen-v0 (task {envs.task.name!r}, {len(envs.prompts)} prompts)"
    )
    print(
        f"  policy/reference: tiny-reviews GPT-2, {sum(p.numel() for p in envs.reference.parameters()):,} parameters"
    )
    print(f"  spaces: obs {envs.single_observation_space}, action {envs.single_action_space}")
    built = time.perf_counter() - start
    start = time.perf_counter()
    batch = text_env.rollout(envs, seed=args.seed, generator=torch.Generator().manual_seed(args.seed))
    seconds = time.perf_counter() - start
    print(
        f"\nrollout: {batch.num_tokens} tokens in {seconds:.2f}s ({batch.num_tokens / seconds:,.0f} tokens/s)"
    )
    for i in range(min(args.show, envs.num_envs)):
        print(f"  [{batch.rewards[i]:+.2f}] {batch.prompts[i]} | {batch.responses[i]}")
    gold = batch.gold_scores.numpy()
    print(
        f"\nsummary over {envs.num_envs} episodes: reward {batch.rewards.mean():+.3f}  "
        f"rm_score {batch.rm_scores.mean():+.3f}  gold {np.nanmean(gold):+.3f}  kl {batch.kl.mean():.4f}  "
        f"length {batch.lengths.mean():.1f}  (setup {built:.1f}s)"
    )
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the embedded default; prints the comparison table")
    add_config_argument(p, "default", "PipelineConfig")
    p.add_argument("--device", default="cpu")
    p.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides of the pipeline config")

    def run(args: argparse.Namespace) -> int:
        from rlhf_base.config import load_config
        from rlhf_gym.pipeline import PipelineConfig, print_summary, run_pipeline

        config = load_config(PipelineConfig, args.config, [*args.overrides, f"device={args.device}"])
        return print_summary(run_pipeline(config))

    p.set_defaults(handler=run)


def _add_rollout(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rollout", help="roll the policy out in the batched env and print a summary")
    p.add_argument("--num-envs", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=8, help="episodes to print")
    p.set_defaults(handler=_rollout)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="the performance benchmarks (rollout, scaling, TRL, SB3) in one run: markdown + JSON"
    )
    from benchmarks.run import add_arguments

    add_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from benchmarks.run import run_all

        run_all(args)
        return 0

    p.set_defaults(handler=run)


#: Subcommand installers ("module:function"), in the order `--help` lists them; each stage owns its command.
COMMANDS: list[str | Callable[[argparse._SubParsersAction], None]] = [
    _add_demo,
    "rlhf_gym.pipeline:add_pipeline_command",
    "rlhf_gym.sft:add_sft_command",
    "rlhf_gym.label:add_label_command",
    "rlhf_gym.train_rm:add_train_rm_command",
    "rlhf_gym.train:add_train_command",
    "rlhf_gym.sweep:add_sweep_command",
    "rlhf_gym.report:add_report_command",
    _add_rollout,
    _add_bench,
]


def _installer(entry: str | Callable) -> Callable:
    if callable(entry):
        return entry
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-gym", description="RLHF as reinforcement learning proper.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in COMMANDS:
        _installer(entry)(sub)
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
