"""`rlhf-gym`: the one command line of the project, a subcommand per stage.

Every subcommand is defined here, so its options, help and errors read in one place; the stages themselves
are plain functions (`run_sft`, `label_pairs`, `train_reward_model`, `train`, `run_sweep`, `run_pipeline`,
`make_report`) that Python users call directly. This module imports nothing heavy at the top: each handler
imports its stage when it runs, so `rlhf-gym --help` does not load torch or transformers.

    rlhf-gym demo                                     # the whole pipeline on the embedded default
    rlhf-gym pipeline --config default 'agents.seeds=[0,1,2]'
    rlhf-gym sft      --run-dir runs/sft learning_rate=3e-4
    rlhf-gym label    --run-dir runs/label num_pairs=2000 tau=0.1
    rlhf-gym train-rm --run-dir runs/rm pairs=runs/label/pairs.jsonl
    rlhf-gym train    --agent ppo iterations=10 env.beta=0.1
    rlhf-gym sweep    --config sweep --report
    rlhf-gym report   runs/sweep

An error is one line, `rlhf-gym COMMAND: error: MESSAGE`, with exit status 2 (Ctrl-C: 130); `--debug`,
before or after the subcommand, prints its traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlhf_base.config import ConfigError
from rlhf_base.io import DataError
from rlhf_gym.configs import builtin_configs, config_file

__all__ = [
    "COMMANDS",
    "EXAMPLES",
    "add_label_command",
    "add_pipeline_command",
    "add_report_command",
    "add_sft_command",
    "add_sweep_command",
    "add_train_command",
    "add_train_rm_command",
    "build_parser",
    "error_message",
    "fail",
    "main",
    "print_summary",
    "run_label",
    "run_train_rm",
]

Subparsers = argparse._SubParsersAction
#: The example command lines of the module docstring: the top-level help's epilog, and each command's.
EXAMPLES = tuple(line.strip() for line in (__doc__ or "").splitlines() if line.startswith("    rlhf-gym "))
#: The help's list of agents; the registry decides.
BUILTIN_AGENTS = (
    "ppo, reinforce, grpo, dr_grpo, remax, reinforce_pp, dpo, online_dpo, best_of_n, raft, sb3_ppo, sb3_a2c"
)


# --------------------------------------------------------------------------------------------------------
# Arguments every stage shares
# --------------------------------------------------------------------------------------------------------
def _config_argument(value: str) -> str:
    """argparse `type` for `--config`: the resolved path, or a usage error with `config_file`'s message."""
    try:
        return str(config_file(value))
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_config_argument(parser: argparse.ArgumentParser, default: str | None, fields: str) -> None:
    """`--config NAME_OR_PATH`, resolved by `config_file` when the arguments are parsed (the default too)."""
    parser.add_argument(
        "--config",
        default=default,
        type=_config_argument,
        metavar="NAME_OR_PATH",
        help=f"a built-in config's name ({', '.join(builtin_configs()) or 'none found'}) or a YAML file of "
        f"{fields} fields overriding their defaults (default: {default or 'none, the defaults'})",
    )


def add_overrides(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help=f"dotted config overrides, e.g. {example}"
    )


def add_common_arguments(parser: argparse.ArgumentParser, fields: str, run_dir: str, example: str) -> None:
    add_config_argument(parser, None, fields)
    parser.add_argument("--run-dir", default=run_dir, help=f"output folder (default: {run_dir})")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_overrides(parser, example)


#: Errors raised for bad input, whose message is written for the user: shown as they are. Any other error
#: is shown with its type's name and a pointer to `--debug`.
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, OSError, ImportError)


def error_message(error: BaseException) -> str:
    """One line for the user: the message of a bad-input error (ConfigError, DataError, ValueError,
    FileNotFoundError ...), else the error's type and message and how to see where it came from."""
    if isinstance(error, USER_ERRORS) and str(error):
        return str(error)
    return f"{type(error).__name__}: {error} (rerun with --debug for the traceback)"


def fail(command: str, error: BaseException) -> int:
    """Print `rlhf-gym COMMAND: error: MESSAGE` to stderr; return the exit status of a usage error, 2."""
    print(f"rlhf-gym {command}: error: {error_message(error)}", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------------------------------------
# Stage 1: sft
# --------------------------------------------------------------------------------------------------------
def _sft(args: argparse.Namespace) -> int:
    """Fine-tune a causal LM on (prompt, response) demonstrations; saves RUN_DIR/sft/ (pi_ref)."""
    from rlhf_base.config import load_config
    from rlhf_gym.sft import SFTConfig, run_sft

    overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])
    config = load_config(SFTConfig, args.config, overrides)
    run_dir = Path(args.run_dir or f"runs/sft-{time.strftime('%Y%m%d-%H%M%S')}")
    metrics = run_sft(config, run_dir, progress=not args.quiet)
    print(
        f"SFT: {int(metrics['steps'])} steps on {int(metrics['num_demonstrations'])} demonstrations "
        f"in {metrics['wall_time']:.1f}s; final loss {metrics['final_loss']:.3f}"
    )
    if not math.isnan(metrics["eval_nll_after"]):
        print(
            f"  held-out response NLL {metrics['eval_nll_before']:.4f} -> {metrics['eval_nll_after']:.4f} "
            "nats/token"
        )
    if "grammatical_after" in metrics:
        print(
            f"  grammatical reviews {metrics['grammatical_before']:.1%} -> {metrics['grammatical_after']:.1%}"
        )
    print(f"  pi_ref saved to {run_dir / 'sft'} (load it with text_env.load_causal_lm or model=...)")
    return 0


def add_sft_command(sub: Subparsers) -> None:
    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning on demonstrations: the reference policy pi_ref",
        description=_sft.__doc__,
    )
    add_config_argument(p, None, "SFTConfig")
    p.add_argument("--run-dir", default=None, help="output folder (default: runs/sft-TIMESTAMP)")
    p.add_argument("--device", default=None, help="cpu, cuda, auto (overrides the config's device)")
    p.add_argument(
        "--no-progress", "--quiet", dest="quiet", action="store_true", help="hide the progress bar"
    )
    add_overrides(p, "learning_rate=3e-4")
    p.set_defaults(handler=_sft)


# --------------------------------------------------------------------------------------------------------
# Stage 2: label, train-rm
# --------------------------------------------------------------------------------------------------------
def run_label(args: argparse.Namespace) -> int:
    """Sample pairs from the policy, label them with the gold reward under Bradley-Terry noise, save them
    (pairs.jsonl, label_report.json and the resolved label_config.yaml in the run folder)."""
    from reward_models.data import write_pairs
    from rlhf_base.config import load_config, save_config
    from rlhf_base.io import atomic_write
    from rlhf_gym.label import LabelConfig, label_pairs

    config = load_config(LabelConfig, args.config, args.overrides)
    run_dir = Path(args.run_dir)
    pairs, report = label_pairs(config, device=args.device, progress=not args.no_progress)
    write_pairs(pairs, run_dir / "pairs.jsonl")
    atomic_write(run_dir / "label_report.json", json.dumps(report, indent=2) + "\n")
    save_config(config, run_dir / "label_config.yaml")
    print(
        f"labelled {report['num_pairs']} pairs in {report['seconds']:.1f}s (tau={config.tau}): label ceiling "
        f"{report['ceiling']:.3f} (expected {report['expected_ceiling']:.3f}), {report['num_ties']} gold ties, "
        f"{report['num_identical_resampled']} identical pairs resampled\n  -> {run_dir / 'pairs.jsonl'}"
    )
    return 0


def add_label_command(sub: Subparsers) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "label",
        help="sample response pairs from pi_ref and label them with the gold reward under Bradley-Terry noise",
        description=run_label.__doc__,
    )
    add_common_arguments(parser, "LabelConfig", "runs/label", "tau=0.1 num_pairs=2000")
    parser.set_defaults(handler=run_label)
    return parser


def run_train_rm(args: argparse.Namespace) -> int:
    """Train a Bradley-Terry reward model on the pairs named by the config's `pairs` (the first `num_pairs`
    of them; `body` sets its size); writes reward_model/ (load it with `load_reward_model`, or hand its path
    to the env as `reward_model=...`), metrics.csv, metrics.json, tensorboard/ and the resolved
    train_rm_config.yaml. With `ensemble_size: k`, reward_model/ is an ensemble of k members (ensemble.json,
    member_0/, ...; combined by `ensemble_combine`: mean, worst or uwo) and each member logs in member_i/."""
    from reward_models.data import load_pairs
    from reward_models.train import RewardTrainConfig, train_reward_model
    from rlhf_base.config import load_config, save_config

    config = load_config(RewardTrainConfig, args.config, args.overrides)
    pairs = load_pairs(config.pairs)
    if config.num_pairs is not None and config.num_pairs > len(pairs):
        raise ValueError(f"num_pairs={config.num_pairs}, but {config.pairs} holds {len(pairs)}")
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
    what = (
        ""
        if config.ensemble_size == 1
        else f"an ensemble of {config.ensemble_size} ({config.ensemble_combine}) "
    )
    print(
        f"trained {what}on {metrics['num_train']} pairs in {metrics['seconds']:.1f}s: train loss "
        f"{metrics['train_loss']:.3f}, {held_out}\n  -> {run_dir / 'reward_model'}"
    )
    return 0


def add_train_rm_command(sub: Subparsers) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "train-rm",
        help="train a Bradley-Terry reward model on preference pairs",
        description=run_train_rm.__doc__,
    )
    add_common_arguments(
        parser, "RewardTrainConfig", "runs/reward_model", "pairs=runs/label/pairs.jsonl learning_rate=3e-4"
    )
    parser.set_defaults(handler=run_train_rm)
    return parser


# --------------------------------------------------------------------------------------------------------
# Stage 3: train one agent; sweeps of many; their report
# --------------------------------------------------------------------------------------------------------
def _train(args: argparse.Namespace) -> int:
    """Train one agent on the env: builds the env and agent from their configs, learns, evaluates and saves
    (policy/, metrics.csv/jsonl, tensorboard/, summary.json, env.yaml, agent.yaml, and checkpoints/ every
    --checkpoint-every iterations). --resume continues a killed run from its latest checkpoint, exactly as
    if it had not stopped. Launched by torchrun (torchrun --nproc-per-node W -m rlhf_gym.cli train ...), the W
    processes train one agent (ppo, reinforce) on env.num_envs / W rows each, gloo on the CPU and NCCL on
    CUDA; rank 0 writes the run folder."""
    from rlhf_gym.train import train

    overrides = list(args.overrides) + ([f"env.device={args.device}"] if args.device else [])
    train(  # an unknown agent (did you mean...), a bad config or checkpoint: one line from main()
        args.agent,
        args.run_dir or f"runs/train-{args.agent.replace(':', '-')}",
        args.config,
        args.env_config,
        overrides,
        progress=not args.no_progress,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
    )
    return 0


def _checkpoint_every(value: str) -> int:
    """argparse `type` for `--checkpoint-every`: an integer >= 0."""
    try:
        every = int(value)
    except ValueError:
        every = -1
    if every < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 (0: no checkpoints), got {value!r}")
    return every


def add_train_command(sub: Subparsers) -> None:
    p = sub.add_parser(
        "train",
        help="train one agent on the env (PPO, REINFORCE, best-of-n, RAFT, SB3, yours)",
        description=_train.__doc__,
    )
    p.add_argument(
        "--agent",
        required=True,
        help=f"a registered agent ({BUILTIN_AGENTS}), one added by entry point, or a class as 'package.module:Class'",
    )
    add_config_argument(p, None, "the agent's Config")
    p.add_argument("--env-config", default=None, type=_config_argument, help="env YAML (EnvConfig fields)")
    p.add_argument("--run-dir", default=None, help="output folder (default: runs/train-NAME)")
    p.add_argument("--device", default=None, help="overrides env.device")
    p.add_argument("--no-progress", action="store_true", help="no line per iteration")
    p.add_argument(
        "--checkpoint-every",
        type=_checkpoint_every,
        default=None,
        metavar="K",
        help="write RUN_DIR/checkpoints/ every K iterations and at the last, for --resume; 0: none "
        "(default: 5, or none for an agent without state_dict/load_state_dict)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its latest checkpoint, with its saved env.yaml and "
        "agent.yaml (settings given must match them); metrics past the checkpoint are rewritten",
    )
    add_overrides(p, "iterations=10 env.beta=0.1 (env.* keys go to the env config)")
    p.set_defaults(handler=_train)


def _sweep(args: argparse.Namespace) -> int:
    """Run a grid of agents x betas x seeds (x any config field) in worker processes, or as Ray tasks with
    backend=ray (pip install -e '.[ray]'); finished cells are kept, so a rerun resumes (results.csv,
    curves.csv, tensorboard/ under runs/NAME)."""
    import dataclasses

    from rlhf_base.config import load_config
    from rlhf_gym.pipeline import check_env_paths
    from rlhf_gym.sweep import CellsFailed, SweepConfig, cell_configs, check_cells, expand_cells, run_sweep

    config = load_config(SweepConfig, args.config, args.overrides)
    if args.workers is not None:
        config = dataclasses.replace(config, workers=args.workers)
    cells = expand_cells(config)
    check_cells(cells, config)  # a bad grid or override key fails here, before any cell
    envs = [config.env, *(cell_configs(cell, config)[0] for cell in cells)]
    for env in {(env.model, env.reward_model, env.prompts): env for env in envs}.values():
        check_env_paths(env, args.config)  # so does a missing model (the pipeline's, when it has not run)
    try:
        run_dir, failed = run_sweep(config, force=args.force), None
    except CellsFailed as e:  # the other cells finished: report them, then say which failed (exit 1)
        run_dir, failed = e.run_dir, e
    print(f"results: {run_dir / 'results.csv'}")
    code = 0
    if args.report and (run_dir / "results.csv").is_file():
        code = _report(argparse.Namespace(run_dir=run_dir))
    if failed is not None:
        print(f"rlhf-gym sweep: error: {failed}", file=sys.stderr)
        return 1
    return code


def add_sweep_command(sub: Subparsers) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a grid of agents x beta x seeds (x any field) in worker processes",
        description=_sweep.__doc__,
    )
    add_config_argument(p, "sweep", "SweepConfig")
    p.add_argument("--workers", type=int, default=None, help="overrides the config's workers")
    p.add_argument("--report", action="store_true", help="write the report when the sweep is done")
    p.add_argument(
        "--force",
        action="store_true",
        help="run again the cells whose results in the folder were made with other settings (or by an "
        "rlhf-gym from before per-cell records), setting the old ones aside in RUN/stale/; without it such a "
        "folder is refused, naming what changed",
    )
    add_overrides(p, "'seeds=[0,1]' 'betas=[0.05]' 'overrides=[ppo.iterations=20]'")
    p.set_defaults(handler=_sweep)


def _report(args: argparse.Namespace) -> int:
    """Write the report of a finished sweep (report.md, frontier, learning curves, over-optimisation plots)
    from its results.csv and curves.csv, and print the table."""
    from rlhf_gym.report import (
        OldColumnsWarning,
        make_report,
        markdown_table,
        non_finite_message,
        old_names_message,
        read_table,
        summarise,
    )

    results = Path(args.run_dir) / "results.csv"
    try:
        paths = make_report(args.run_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OldColumnsWarning)  # said once, as a note, below
            rows, renamed = read_table(results, "results")
    except (FileNotFoundError, DataError) as e:
        fail("report", e)
        return 1  # no finished sweep to report on
    if renamed:
        print(f"rlhf-gym report: note: {old_names_message(results, renamed)}", file=sys.stderr)
    if non_finite := non_finite_message(rows, str(results)):
        print(f"rlhf-gym report: warning: {non_finite}", file=sys.stderr)
    print(markdown_table(summarise(rows)))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def add_report_command(sub: Subparsers) -> None:
    p = sub.add_parser(
        "report",
        help="tables and plots of a finished sweep (reads runs/NAME/results.csv)",
        description=_report.__doc__,
    )
    p.add_argument("run_dir", help="the sweep's folder, e.g. runs/NAME")
    p.set_defaults(handler=_report)


# --------------------------------------------------------------------------------------------------------
# The whole pipeline
# --------------------------------------------------------------------------------------------------------
def print_summary(paths: dict[str, Any]) -> int:
    """Print a pipeline's comparison table and where its plots are."""
    print("\n" + Path(paths["report"]).read_text().split("\n## ", 1)[0].strip())
    print("\nplots:")
    for key in ("frontier", "learning_curves", "overoptimisation"):
        if key in paths:
            print(f"  {key}: {paths[key]}")
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    """pretrain -> SFT -> label -> reward model -> agents -> report, each stage cached by a fingerprint of
    its inputs, so a rerun redoes only what changed."""
    from rlhf_base.config import load_config
    from rlhf_gym.pipeline import PipelineConfig, run_pipeline
    from rlhf_gym.sweep import check_cells, expand_cells

    overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])
    config = load_config(PipelineConfig, args.config, overrides)
    check_cells(expand_cells(config.agents), config.agents)  # the agents stage's grid, checked up front
    return print_summary(run_pipeline(config))


def add_pipeline_command(sub: Subparsers) -> None:
    p = sub.add_parser(
        "pipeline",
        help="pretrain -> SFT -> label -> reward model -> agents -> report",
        description=_pipeline.__doc__,
    )
    add_config_argument(p, "default", "PipelineConfig")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (overrides the config)")
    add_overrides(p, "'agents.seeds=[0]' sft.epochs=2")
    p.set_defaults(handler=_pipeline)


def _add_demo(sub: Subparsers) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the embedded default; prints the comparison table",
        description="`rlhf-gym pipeline --config default --device cpu`: what `make demo` runs. "
        + (_pipeline.__doc__ or ""),
    )
    add_config_argument(p, "default", "PipelineConfig")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    add_overrides(p, "'agents.seeds=[0,1,2]'")
    p.set_defaults(handler=_pipeline)


# --------------------------------------------------------------------------------------------------------
# Looking around: rollout, bench
# --------------------------------------------------------------------------------------------------------
def _rollout(args: argparse.Namespace) -> int:
    """Build the env (the embedded default, or any EnvConfig: your model, reward, task or prompts), roll
    the policy out in the batched env once, and print a summary."""
    import numpy as np
    import torch

    import text_env
    from rlhf_base.config import load_config
    from text_env.config import EnvConfig

    shortcuts = {"num_envs": args.num_envs, "max_new_tokens": args.max_new_tokens, "device": args.device}
    overrides = [f"{key}={value}" for key, value in shortcuts.items() if value is not None]
    try:
        config = load_config(EnvConfig, args.config, [*overrides, *args.overrides])
    except ConfigError as e:
        return fail("rollout", e)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    envs = config.make()
    print(
        f"env: {envs.num_envs} x text_env/TextGen-v0 (task {envs.task.name!r}, {len(envs.prompts)} prompts, "
        f"reward {config.reward_model or 'the task gold reward'})"
    )
    print(
        f"  policy/reference: {config.model or 'tiny-reviews GPT-2'}, "
        f"{sum(p.numel() for p in envs.reference.parameters()):,} parameters"
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
    gold_text = f"{np.mean(gold):+.3f}" if np.isfinite(gold).all() else "(no gold)"
    print(
        f"\nsummary over {envs.num_envs} episodes: reward {batch.rewards.mean():+.3f}  "
        f"rm_score {batch.rm_scores.mean():+.3f}  gold {gold_text}  kl {batch.kl.mean():.4f}  "
        f"length {batch.lengths.mean():.1f}  (setup {built:.1f}s)"
    )
    return 0


def _add_rollout(sub: Subparsers) -> None:
    p = sub.add_parser(
        "rollout",
        help="roll the policy out in the batched env and print a summary",
        description=_rollout.__doc__,
    )
    add_config_argument(p, None, "EnvConfig")
    p.add_argument("--num-envs", type=int, default=None, help="rows of the batched env (default: 64)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="response length limit (default: 32)")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="prompt draws and sampling (default: 0)")
    p.add_argument("--show", type=int, default=8, help="episodes to print (default: 8)")
    add_overrides(p, "reward_model=my_pkg.rewards:brevity prompts=prompts.jsonl")
    p.set_defaults(handler=_rollout)


def _bench(args: argparse.Namespace) -> int:
    from benchmarks.run import run_all

    run_all(args)
    return 0


def _add_bench(sub: Subparsers) -> None:
    from benchmarks.run import add_arguments  # argparse only: the sections import their work when they run

    p = sub.add_parser(
        "bench",
        help="the performance benchmarks (rollout, scaling, TRL, SB3, CLI help) in one run: markdown + JSON",
        description="Every performance figure of the README, measured side by side in one run.",
    )
    add_arguments(p)
    p.set_defaults(handler=_bench)


# --------------------------------------------------------------------------------------------------------
# Studies: rm-scaling
# --------------------------------------------------------------------------------------------------------
def _rm_scaling(args: argparse.Namespace) -> int:
    """Label pairs from pi_ref once, train a reward model per (number of pairs, body size), and report each
    one's held-out accuracy against the labeller's ceiling and its agreement with the gold order
    (rm_scaling.csv, rm_scaling.md, rm_scaling.png in the run folder; a rerun resumes)."""
    from rlhf_base.config import load_config
    from rlhf_gym.rm_scaling import QUICK_OVERRIDES, RMScalingConfig, run_rm_scaling

    overrides = [*(QUICK_OVERRIDES if args.quick else ()), *args.overrides]
    overrides += [f"device={args.device}"] if args.device else []
    try:
        config = load_config(RMScalingConfig, args.config, overrides)
    except ConfigError as e:
        return fail("rm-scaling", e)
    if args.quick:
        print(f"--quick: {' '.join(QUICK_OVERRIDES)}")
    try:
        summary = run_rm_scaling(config, args.run_dir, progress=not args.no_progress)
    except (DataError, ValueError) as e:
        return fail("rm-scaling", e)
    print("\n" + Path(summary["table"]).read_text())
    print(f"csv: {summary['csv']}\ntable: {summary['table']}\nplot: {summary['plot']}")
    return 0


def _add_rm_scaling(sub: Subparsers) -> None:
    p = sub.add_parser(
        "rm-scaling",
        help="reward model accuracy vs number of pairs x body size, against the labeller's ceiling",
        description=_rm_scaling.__doc__,
    )
    add_config_argument(p, None, "RMScalingConfig")
    p.add_argument("--run-dir", default="runs/rm-scaling", help="output folder (default: runs/rm-scaling)")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (overrides the config's device)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small grid a CPU runs in minutes (rlhf_gym.rm_scaling.QUICK_OVERRIDES: 3 pair counts x 2 "
        "sizes), applied before the KEY=VALUE overrides",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_overrides(p, "'pair_counts=[500,1000]' 'bodies=[tiny,pretrained]' label.tau=0.1")
    p.set_defaults(handler=_rm_scaling)


#: The subcommands, in the order `--help` lists them.
COMMANDS: tuple[Callable[[Subparsers], Any], ...] = (
    _add_demo,
    add_pipeline_command,
    add_sft_command,
    add_label_command,
    add_train_rm_command,
    add_train_command,
    add_sweep_command,
    add_report_command,
    _add_rollout,
    _add_bench,
    _add_rm_scaling,
)


DEBUG_HELP = "on an error, print the full traceback rather than one line"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-gym",
        description="RLHF as reinforcement learning proper: a subcommand per stage, from SFT to the report.",
        epilog="examples:\n"
        + "\n".join(f"  {line}" for line in EXAMPLES)
        + "\n\n`rlhf-gym COMMAND --help` lists a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for install in COMMANDS:
        install(sub)
    for name, command in sub.choices.items():
        # `--debug` after the subcommand too; SUPPRESS keeps the value of one given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        examples = [" ".join(e.split("#")[0].split()) for e in EXAMPLES if e.split()[1] == name]
        if examples and command.epilog is None:
            command.epilog = f"example{'s' * (len(examples) > 1)}: {'; '.join(examples)}"
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; return its exit status.

    An error prints `rlhf-gym COMMAND: error: MESSAGE` (one line, as argparse's usage errors) and returns 2;
    `--debug` prints the traceback instead. Ctrl-C returns 130 (128 + SIGINT, the shell's convention).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        return 130
    except Exception as error:
        if args.debug:
            traceback.print_exc()
            return 2
        return fail(args.command, error)


if __name__ == "__main__":
    sys.exit(main())
