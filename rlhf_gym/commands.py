"""What the stage commands share: their common arguments, their error exit, and `--config`.

`--config` takes a built-in config's name or a YAML file's path. The built-in configs are the YAML files
in the repository's `configs/` (the demo pipeline, the README's sweeps); they are found from this package's
location, so `rlhf-gym pipeline --config default` works from any directory, while a path is relative to the
current directory as usual. Without `--config` a command runs on its config dataclass's defaults, which
are tuned for the default task: a YAML file only holds what differs from them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rlhf_base.config import ConfigError

__all__ = [
    "CONFIGS_DIR",
    "add_common_arguments",
    "add_config_argument",
    "builtin_configs",
    "config_file",
    "fail",
]

#: The repository's `configs/`, located from this file (rlhf_gym/commands.py -> ../configs), not the cwd.
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def builtin_configs() -> list[str]:
    """The names `--config` accepts besides paths: the stems of the YAML files in `CONFIGS_DIR`."""
    return sorted(path.stem for path in CONFIGS_DIR.glob("*.yaml"))


def _known() -> str:
    names = builtin_configs()
    if names:
        return f"built-in configs (by name, from any directory): {', '.join(names)}"
    return (
        f"no built-in configs: {CONFIGS_DIR} is missing (they come with the repository, `pip install -e .`)"
    )


def config_file(value: str | Path) -> Path:
    """The YAML file that a `--config` value names.

    A bare name, without a folder or a suffix (`default`, `sweep`, `smollm2`), is a built-in config in
    `CONFIGS_DIR`; anything else is a path, relative to the current directory.

    Raises:
        ConfigError: No built-in config has that name, or no file is at that path; the message lists the
            built-in configs.
    """
    path = Path(value)
    if isinstance(value, str) and "/" not in value and os.sep not in value and not path.suffix:
        builtin = CONFIGS_DIR / f"{value}.yaml"
        if builtin.is_file():
            return builtin
        raise ConfigError(f"no built-in config named {value!r}; {_known()}; or give a YAML file's path")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (relative to {Path.cwd()}); {_known()}")
    return path


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


def add_common_arguments(parser: argparse.ArgumentParser, fields: str, run_dir: str, example: str) -> None:
    add_config_argument(parser, None, fields)
    parser.add_argument("--run-dir", default=run_dir, help=f"output folder (default: {run_dir})")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help=f"dotted config overrides, e.g. {example}",
    )


def fail(command: str, error: Exception) -> int:
    print(f"rlhf-gym {command}: error: {error}", file=sys.stderr)
    return 2
