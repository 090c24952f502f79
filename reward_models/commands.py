"""The `label` and `train-rm` subcommands of `rlhf-gym`: step 2 of RLHF from the command line.

    rlhf-gym label    --run-dir runs/label [--config configs/label.yaml] [--device cpu] num_pairs=2000 tau=0.1
    rlhf-gym train-rm --run-dir runs/rm    [--config configs/train_rm.yaml] pairs=runs/label/pairs.jsonl

`label` writes `pairs.jsonl`, `label_report.json` and the resolved `label_config.yaml` into the run folder;
`train-rm` reads the pairs named by its `pairs` field, trains, and writes `reward_model/` (load it with
`load_reward_model`, or hand its path to the env as `reward_model=...`), `metrics.csv`, `metrics.json`,
`tensorboard/` and `train_rm_config.yaml`. Overrides are dotted `key=value` pairs, parsed as YAML, applied
after the config file. Heavy imports happen in the handlers, so `rlhf-gym --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_label_command", "add_train_rm_command", "run_label", "run_train_rm"]

_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _default_config(name: str) -> str | None:
    """The repository's `configs/<name>` when it exists (an editable install), else None: the defaults."""
    path = _CONFIGS / name
    return str(path) if path.is_file() else None


def _add_common(parser: argparse.ArgumentParser, config_name: str, run_dir: str, example: str) -> None:
    default = _default_config(config_name)
    parser.add_argument(
        "--config",
        default=default,
        help=f"YAML file overriding the config's defaults (default: {default or 'none, the built-in defaults'})",
    )
    parser.add_argument("--run-dir", default=run_dir, help=f"output folder (default: {run_dir})")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted config overrides, e.g. tau=0.1 num_pairs=2000",
    )


def _fail(command: str, error: Exception) -> int:
    print(f"rlhf-gym {command}: error: {error}", file=sys.stderr)
    return 2


def run_label(args: argparse.Namespace) -> int:
    """Sample pairs from the policy, label them with the gold reward under Bradley-Terry noise, save them."""
    from reward_models.data import write_pairs
    from reward_models.labeller import LabelConfig, label_pairs
    from rlhf_gym.config import ConfigError, load_config, save_config
    from rlhf_gym.io import DataError, atomic_write

    try:
        config = load_config(LabelConfig, args.config, args.overrides)
    except ConfigError as e:
        return _fail("label", e)
    run_dir = Path(args.run_dir)
    try:
        pairs, report = label_pairs(config, device=args.device, progress=not args.no_progress)
    except (DataError, ValueError) as e:
        return _fail("label", e)
    write_pairs(pairs, run_dir / "pairs.jsonl")
    atomic_write(run_dir / "label_report.json", json.dumps(report, indent=2) + "\n")
    save_config(config, run_dir / "label_config.yaml")
    print(
        f"labelled {report['num_pairs']} pairs in {report['seconds']:.1f}s (tau={config.tau}): label ceiling "
        f"{report['ceiling']:.3f} (expected {report['expected_ceiling']:.3f}), {report['num_ties']} gold ties, "
        f"{report['num_identical_resampled']} identical pairs resampled\n  -> {run_dir / 'pairs.jsonl'}"
    )
    return 0


def run_train_rm(args: argparse.Namespace) -> int:
    """Train a Bradley-Terry reward model on the pairs named by the config, save it and its metrics."""
    from reward_models.data import load_pairs
    from reward_models.train import RewardTrainConfig, train_reward_model
    from rlhf_gym.config import ConfigError, load_config, save_config
    from rlhf_gym.io import DataError

    try:
        config = load_config(RewardTrainConfig, args.config, args.overrides)
        pairs = load_pairs(config.pairs)
    except (ConfigError, DataError) as e:
        return _fail("train-rm", e)
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


def add_label_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Install `label` on a subparsers object (`rlhf_gym.cli` calls this)."""
    parser = sub.add_parser(
        "label",
        help="sample response pairs from pi_ref and label them with the gold reward under Bradley-Terry noise",
        description=run_label.__doc__,
    )
    _add_common(parser, "label.yaml", "runs/label", "tau=0.1 num_pairs=2000")
    parser.set_defaults(handler=run_label)
    return parser


def add_train_rm_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Install `train-rm` on a subparsers object (`rlhf_gym.cli` calls this)."""
    parser = sub.add_parser(
        "train-rm",
        help="train a Bradley-Terry reward model on preference pairs",
        description=run_train_rm.__doc__,
    )
    _add_common(parser, "train_rm.yaml", "runs/reward_model", "lr=3e-4 epochs=3")
    parser.set_defaults(handler=run_train_rm)
    return parser
