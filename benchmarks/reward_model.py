"""Step 2 of RLHF on the default task: label pairs from pi_ref, train the reward model, compare with the ceiling.

The simulated labeller's ceiling (the share of its labels that agree with the gold order) is the best
held-out accuracy any reward model can expect, so the figure that matters is the gap between the two.
Wall time covers labelling (sampling through the batched env + gold scoring) and training.

    python -m benchmarks.reward_model [--num-pairs 4000] [--tau 0.2] [--epochs 2] [--lr 1e-3]

Writes benchmarks/out/reward_model.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from reward_models.train import RewardTrainConfig, train_reward_model
from rlhf_gym.label import LabelConfig, label_pairs

OUT = Path(__file__).parent / "out"


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> dict:
    label_defaults, train_defaults = LabelConfig(), RewardTrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-pairs", type=int, default=label_defaults.num_pairs)
    parser.add_argument("--tau", type=float, default=label_defaults.tau)
    parser.add_argument("--epochs", type=int, default=train_defaults.epochs)
    parser.add_argument("--lr", type=float, default=train_defaults.learning_rate)
    parser.add_argument("--batch-size", type=int, default=train_defaults.batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    cpu_start, start = time.process_time(), time.perf_counter()
    pairs, report = label_pairs(
        LabelConfig(num_pairs=args.num_pairs, tau=args.tau, seed=args.seed), device=args.device
    )
    label_seconds = time.perf_counter() - start
    config = RewardTrainConfig(
        epochs=args.epochs, learning_rate=args.lr, batch_size=args.batch_size, seed=args.seed
    )
    start = time.perf_counter()
    _, metrics = train_reward_model(pairs, config, device=args.device)
    train_seconds = time.perf_counter() - start
    result = {
        "machine": machine(),
        "load_average_before": load_before,  # the machine may be shared: read wall times with this in mind
        "load_average_after": os.getloadavg(),
        "num_pairs": args.num_pairs,
        "tau": args.tau,
        "gold_std": report["gold_std"],
        "label_ceiling": report["ceiling"],  # over all pairs
        "label_ceiling_expected": report["expected_ceiling"],
        "held_out_pairs": metrics["num_eval"],
        "held_out_label_ceiling": metrics["eval_label_ceiling"],  # over the held-out pairs only
        "held_out_accuracy": metrics["eval_accuracy"],
        "held_out_gold_agreement": metrics["eval_gold_agreement"],
        "gap_to_ceiling": metrics["eval_label_ceiling"] - metrics["eval_accuracy"],
        "train_config": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size},
        "label_seconds": label_seconds,
        "train_seconds": train_seconds,
        "total_seconds": label_seconds + train_seconds,
        "process_cpu_seconds": time.process_time() - cpu_start,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "reward_model.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"machine: {result['machine']} (load average {load_before[0]:.1f} before)")
    print(f"| reward model, {args.num_pairs} pairs, tau={args.tau} | value |")
    print("|---|---:|")
    print(
        f"| labeller ceiling (all pairs / held-out pairs) | {report['ceiling']:.3f} / {metrics['eval_label_ceiling']:.3f} |"
    )
    print(f"| RM held-out accuracy ({metrics['num_eval']} pairs) | {metrics['eval_accuracy']:.3f} |")
    print(f"| gap to ceiling (held-out) | {100 * result['gap_to_ceiling']:.1f} points |")
    print(f"| RM agreement with the gold order (held-out) | {metrics['eval_gold_agreement']:.3f} |")
    print(f"| wall time: labelling + training | {label_seconds:.0f} s + {train_seconds:.0f} s |")
    return result


if __name__ == "__main__":
    main()
