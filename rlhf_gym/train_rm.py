"""The `train-rm` subcommand of `rlhf-gym`: step 2 of RLHF from the command line (`label` is in label.py).

    rlhf-gym train-rm --run-dir runs/rm    [--config my_rm.yaml] pairs=runs/label/pairs.jsonl

`train-rm` reads the pairs named by its `pairs` field, trains, and writes `reward_model/` (load it with
`load_reward_model`, or hand its path to the env as `reward_model=...`), `metrics.csv`, `metrics.json`,
`tensorboard/` and `train_rm_config.yaml`. Overrides are dotted `key=value` pairs, parsed as YAML, applied
after the config file. Heavy imports happen in the handlers, so `rlhf-gym --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlhf_gym.commands import add_common_arguments, fail

__all__ = ["add_train_rm_command", "run_train_rm"]


def run_train_rm(args: argparse.Namespace) -> int:
    """Train a Bradley-Terry reward model on the pairs named by the config, save it and its metrics."""
    from reward_models.data import load_pairs
    from reward_models.train import RewardTrainConfig, train_reward_model
    from rlhf_base.config import ConfigError, load_config, save_config
    from rlhf_base.io import DataError

    try:
        config = load_config(RewardTrainConfig, args.config, args.overrides)
        pairs = load_pairs(config.pairs)
    except (ConfigError, DataError) as e:
        return fail("train-rm", e)
    run_dir = Path(args.run_dir)
    model, metrics = train_reward_model(
        pairs, config, run_dir=run_dir, device=args.device, progress=not args.no_progress
    )
    model.save(run_dir / "reward_model")
    save_config(config, run_dir / "train_rm_config.yaml")
    held_out = (
        f"held-out accuracy {metrics['eval_accuracy']:.3f} on {metrics['num_eval']} pairs, mean margin "
        f"{metrics['eval_margin']:.3f}"
        if metrics["num_eval"]
        else "no held-out pairs"
    )
    print(
        f"trained on {metrics['num_train']} pairs in {metrics['seconds']:.1f}s: train loss "
        f"{metrics['train_loss']:.3f}, {held_out}\n  -> {run_dir / 'reward_model'}"
    )
    return 0


def add_train_rm_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Install `train-rm` on a subparsers object (`rlhf_gym.cli` calls this)."""
    parser = sub.add_parser(
        "train-rm",
        help="train a Bradley-Terry reward model on preference pairs",
        description=run_train_rm.__doc__,
    )
    add_common_arguments(parser, "RewardTrainConfig", "runs/reward_model", "learning_rate=3e-4 epochs=3")
    parser.set_defaults(handler=run_train_rm)
    return parser
