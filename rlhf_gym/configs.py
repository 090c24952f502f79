"""The built-in configs, found by name from any directory: what `--config NAME` means.

`--config` takes a built-in config's name or a YAML file's path. The built-in configs are the YAML files
in the repository's `configs/` (the demo pipeline, the README's sweeps); they are found from this package's
location, so `rlhf-gym pipeline --config default` works from any directory, while a path is relative to the
current directory as usual. Without `--config` a command runs on its config dataclass's defaults, which
are tuned for the default task: a YAML file only holds what differs from them.
"""

from __future__ import annotations

import os
from pathlib import Path

from rlhf_base.config import ConfigError

__all__ = ["CONFIGS_DIR", "builtin_configs", "config_file"]

#: The repository's `configs/`, located from this file (rlhf_gym/configs.py -> ../configs), not the cwd.
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
