"""What the stage commands share: their common arguments, their error exit, the repository's configs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_common_arguments", "default_config", "fail"]

_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def default_config(name: str) -> str | None:
    """The repository's `configs/<name>` when it exists (an editable install), else None: the defaults."""
    path = _CONFIGS / name
    return str(path) if path.is_file() else None


def add_common_arguments(
    parser: argparse.ArgumentParser, config_name: str, run_dir: str, example: str
) -> None:
    default = default_config(config_name)
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


def fail(command: str, error: Exception) -> int:
    print(f"rlhf-gym {command}: error: {error}", file=sys.stderr)
    return 2
