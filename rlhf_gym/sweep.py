"""Agent comparison sweeps: a grid of agents x beta x seeds (x any config field), run in worker processes.

Each finished cell is one record, `runs/<name>/cells/<cell id>.json`, written atomically by the parent
process alone; `results.csv` (one row per cell) and `curves.csv` (one row per iteration) are rebuilt from the
records after every cell (`rlhf_gym.sweep_store`), so a sweep killed at any moment loses only the cells in
flight, and rerunning it runs exactly the cells without a record. The rows are built by the report's schema
(`rlhf_gym.report.schema`), the one definition of both files' columns, in the agents' metric names.

A cell's id, `AGENT-bBETA-sSEED-HASH`, hashes its *identity*: everything its result depends on, the fully
resolved agent and env configs, `eval_episodes`, `threads_per_worker`, the env pi_ref is measured on, and the
content of every file the cell reads (`cell_identity`). A changed setting is a new cell; a run folder holding
results of the same grid point under other settings is refused, naming what changed, unless `force` (which
sets the old records aside in `stale/`). Where and how fast cells run (`workers`, `backend`, `ray_address`,
`cell_resources`) and where results go (`name`, `runs_root`) are not part of it.

Where a cell runs is the backend's only business (`SweepConfig.backend`): "local" runs cells in a process
pool on this machine (or in this process with `workers: 1`), "ray" runs each as a Ray task
(`rlhf_gym.sweep_ray`, issue 15). Either way a cell returns its rows to this process, which records them
(`_run_cells`), so the files and the resume guarantee do not depend on the backend. A pool worker exits when
the sweep's main process dies, however it dies; one sweep at a time holds a run folder (its `.lock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import json
import os
import random
import re
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import yaml

from agents.base import ENV_SETTINGS, check_num_envs
from rlhf_base.config import ConfigError, config_from_dict, config_to_dict, save_config
from rlhf_base.deprecation import moved_names
from rlhf_base.fingerprint import Fingerprints
from rlhf_base.processes import exit_with_parent
from rlhf_base.ranges import SEED, Range, check_ranges
from rlhf_gym.report.schema import CURVE_METRICS, RESULT_METRICS, curve_rows, reference_row, result_row
from rlhf_gym.sweep_store import FolderLocked, RunFolder, StaleResults, changes, digest
from text_env.config import EnvConfig

__all__ = [
    "BACKENDS",
    "FAILURES",
    "RESULT_METRICS",
    "Cell",
    "CellResources",
    "CellsFailed",
    "FolderLocked",
    "StaleResults",
    "SweepConfig",
    "cell_configs",
    "cell_identity",
    "check_cells",
    "expand_cells",
    "finished_cells",
    "plan_cells",
    "run_cell",
    "run_sweep",
    "sweep_notes",
]

#: One JSON line per cell that raised in the latest run: its id, columns, error and traceback.
FAILURES = "failures.jsonl"

#: Where cells run: "local" (a process pool on this machine) or "ray" (Ray tasks, `rlhf_gym.sweep_ray`).
BACKENDS = ("local", "ray")
#: `ray_address` values: "auto", a head node's GCS address HOST:PORT, or a Ray Client address ray://HOST:PORT.
_RAY_ADDRESS = re.compile(r"auto|(ray://)?[^\s/]+:\d+")


@dataclass
class CellResources:
    """What each cell reserves on a Ray cluster (`backend: ray`): Ray starts a cell only on a node where this
    much is free, and sets CUDA_VISIBLE_DEVICES to the GPUs it gave the cell."""

    RANGES: ClassVar[dict[str, Range]] = {"num_cpus": Range(ge=0), "num_gpus": Range(ge=0)}

    num_cpus: float = 1.0  # CPU cores a cell holds; torch runs `threads_per_worker` threads: keep them equal
    num_gpus: float = 0.0  # GPUs a cell holds: a share of one (0.5: two cells per GPU) or whole GPUs

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise ValueError(
                f"cell_resources.num_gpus={self.num_gpus:g}: Ray gives a task a share of one GPU (below 1) or "
                "whole GPUs; use e.g. 0.5, 1 or 2"
            )


@dataclass
class SweepConfig:
    """A grid of cells; each cell trains one agent from pi_ref and evaluates it."""

    RANGES: ClassVar[dict[str, Range]] = {
        "betas": Range(ge=0),  # each the env's KL coefficient (EnvConfig.beta)
        "seeds": SEED,
        "eval_episodes": Range(ge=1),
        "workers": Range(ge=1),
        "threads_per_worker": Range(ge=1),
    }

    name: str = "sweep"  # runs/<name>/ holds the results
    runs_root: str = "runs"  # parent folder of run folders
    agents: list[str] = field(
        default_factory=lambda: ["ppo", "reinforce", "raft", "best_of_n"]
    )  # agent names
    betas: list[float] = field(default_factory=lambda: [0.05])  # env KL coefficients
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # seeds per configuration
    # Extra axes by dotted key: "env.X" (the env), "AGENT.X" (that agent only, e.g.
    # "best_of_n.samples_per_prompt"), "agent.X" (every agent in the sweep).
    grid: dict[str, list[Any]] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # fixed dotted overrides, same keys as grid
    env: EnvConfig = field(default_factory=EnvConfig)  # the env every cell starts from
    agent_configs: dict[str, str] = field(
        default_factory=dict
    )  # agent -> a YAML file overriding its Config's defaults (an agent not named: the defaults)
    eval_episodes: int = 128  # fresh episodes for each final evaluation
    workers: int = 2  # cells run at once: worker processes (1 = in this process), or Ray tasks in flight
    threads_per_worker: int = 1  # torch threads in each worker
    backend: Literal["local", "ray"] = "local"  # where cells run: a local process pool, or Ray tasks
    # backend ray: null starts a local Ray instance; "auto" joins the cluster `ray start` made on this machine;
    # "HOST:6379" joins the cluster whose head is there; "ray://HOST:10001" joins through Ray Client.
    ray_address: str | None = None
    cell_resources: CellResources = field(default_factory=CellResources)  # backend ray: what each cell holds

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.ray_address is not None and not (
            isinstance(self.ray_address, str) and _RAY_ADDRESS.fullmatch(self.ray_address)
        ):
            raise ValueError(
                f"ray_address={self.ray_address!r} is not a Ray address; valid: null (start a local Ray "
                "instance), 'auto' (the cluster `ray start` made on this machine), 'HOST:PORT' (the head "
                "node's address, port 6379 by default) or 'ray://HOST:PORT' (Ray Client, port 10001)"
            )


@dataclass(frozen=True)
class Cell:
    """One run of the grid: an agent, a beta, a seed and the dotted overrides that define it.

    `expand_cells` gives the grid's cells; `plan_cells` gives them their `identity`, and only then an `id`.
    """

    agent: str
    beta: float
    seed: int
    swept: tuple[tuple[str, Any], ...]  # (column, value) of the grid axes that apply to this agent
    env_overrides: tuple[str, ...]
    agent_overrides: tuple[str, ...]
    identity: str = ""  # SHA-256 of everything the cell's result depends on (`cell_identity`); "" unplanned

    @property
    def name(self) -> str:
        """The grid point, for messages: `best_of_n-b0.05-s0 (samples_per_prompt=4)`."""
        swept = ", ".join(f"{k}={v}" for k, v in self.swept)
        return f"{self.agent}-b{self.beta:g}-s{self.seed}" + (f" ({swept})" if swept else "")

    @property
    def id(self) -> str:
        """`AGENT-bBETA-sSEED-HASH`, HASH the start of `identity`: a changed setting is another cell."""
        if not self.identity:
            raise ValueError(
                f"cell {self.name} has no id yet: an id covers the cell's every setting and input file; "
                "get planned cells from plan_cells(config)"
            )
        return f"{self.agent}-b{self.beta:g}-s{self.seed}-{self.identity[:8]}"

    def columns(self) -> dict[str, Any]:
        return {
            "cell": self.id,
            "agent": self.agent,
            "seed": self.seed,
            "beta": self.beta,
            **dict(self.swept),
        }


def _owner(key: str, agents: Iterable[str]) -> str | None:
    """The sweep agent whose name starts dotted `key` (the longest, for names with dots: 'pkg.mod:Cls.x')."""
    owners = [agent for agent in agents if key.startswith(f"{agent}.")]
    return max(owners, key=len) if owners else None


def _route(key: str, agent: str, agents: Iterable[str] = ()) -> tuple[str | None, str]:
    """Where dotted `key` applies for `agent` of a sweep of `agents`: ("env" | "agent" | None, the key inside
    that config); None: another agent's key."""
    head, _, rest = key.partition(".")
    if not rest:
        raise ConfigError(f"sweep key {key!r} needs a prefix: 'env.X', 'agent.X' or 'AGENT_NAME.X'")
    owner = _owner(key, [*agents, agent]) if head not in ("env", "agent") else None
    if owner is not None:
        head, rest = owner, key[len(owner) + 1 :]
    if rest == "beta" and head in ("env", "agent", agent):  # one owner: the sweep's `betas` axis
        raise ConfigError(
            f"sweep key {key!r}: a sweep sets the env's beta per cell from `betas`; list them there"
        )
    if head == "env":
        return "env", rest
    if head in ("agent", agent):
        if rest in ENV_SETTINGS:
            raise ConfigError(f"sweep key {key!r}: {ENV_SETTINGS[rest]}; in a sweep, use 'env.{rest}'")
        return "agent", rest
    return None, rest  # another agent's key


def _other_agents_keys(config: SweepConfig) -> list[str]:
    """Grid and override keys of registered agents that are not in the sweep (kept so that `agents=[ppo]`
    can narrow a shipped config); a prefix that is neither env, agent, a sweep agent nor a registered agent
    is a typo (`best_of_m.n`) and fails, with the closest name."""
    from agents.registry import available

    keys = [*config.grid, *(text.partition("=")[0] for text in config.overrides)]
    unused = []
    for key in keys:
        head, _, rest = key.partition(".")
        if not rest:
            raise ConfigError(f"sweep key {key!r} needs a prefix: 'env.X', 'agent.X' or 'AGENT_NAME.X'")
        if head in ("env", "agent") or _owner(key, config.agents) is not None:
            continue
        if head in available():
            unused.append(key)
            continue
        names = ["env", "agent", *config.agents]
        close = difflib.get_close_matches(head, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"sweep key {key!r}: {head!r} is neither 'env', 'agent' nor an agent of this sweep; {hint}"
            f"prefixes: 'env', 'agent', {', '.join(map(repr, config.agents))}"
        )
    return unused


def _check_axes(config: SweepConfig) -> None:
    """An axis with no value (no cell of its agents) or a value listed twice (one cell run twice) is a typo."""
    axes = {
        "betas": config.betas,
        "seeds": config.seeds,
        **{f"grid {k!r}": v for k, v in config.grid.items()},
    }
    for name, values in axes.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"sweep {name} lists no value: each axis needs at least one")
        texts = [json.dumps(v, sort_keys=True, default=str) for v in values]
        twice = sorted({t for t in texts if texts.count(t) > 1})
        if twice:
            raise ConfigError(f"sweep {name} lists {', '.join(twice)} twice: each cell would run twice")


def _override(key: str, value: Any) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def expand_cells(config: SweepConfig) -> list[Cell]:
    """Every cell of the grid, in a stable order; an axis of another agent does not multiply this one's cells.

    Raises:
        ConfigError: a key with a prefix that names nothing (a misspelt agent: "did you mean"), a key the
            sweep owns elsewhere (`beta`, `num_envs`), an empty axis or a value listed twice.
    """
    if config.env.beta != EnvConfig.beta and config.env.beta not in config.betas:
        raise ConfigError(
            f"the sweep's env.beta={config.env.beta} would be ignored: each cell's beta comes from "
            f"`betas` ({config.betas}); list the value there"
        )
    fixed = [text.partition("=")[::2] for text in config.overrides]
    bad = [text for text in config.overrides if "=" not in text]
    if bad:
        raise ConfigError(f"sweep overrides must be KEY=VALUE with a dotted KEY; got {bad}")
    _other_agents_keys(config)
    _check_axes(config)
    cells = []
    for agent in config.agents:
        route = {key: _route(key, agent, config.agents) for key in [*config.grid, *(k for k, _ in fixed)]}
        axes = [(k, v) for k, v in sorted(config.grid.items()) if route[k][0] is not None]
        for beta, seed, *values in itertools.product(config.betas, config.seeds, *[v for _, v in axes]):
            env_over, agent_over = [], []
            for key, value in [*fixed, *zip((k for k, _ in axes), values, strict=True)]:
                target, inner = route[key]
                if target == "env":
                    env_over.append(_override(inner, value))
                elif target == "agent":
                    agent_over.append(_override(inner, value))
            swept = tuple(
                (k if not k.startswith(f"{agent}.") else k[len(agent) + 1 :], v)
                for (k, _), v in zip(axes, values, strict=True)
            )
            cells.append(Cell(agent, float(beta), int(seed), swept, tuple(env_over), tuple(agent_over)))
    return cells


def _with_overrides(cfg: Any, overrides: tuple[str, ...] | list[str]) -> Any:
    values = config_to_dict(cfg)
    for text in overrides:
        key, _, value = text.partition("=")
        values[key] = yaml.safe_load(value)
    return config_from_dict(type(cfg), values, where="in the sweep's env overrides")


def cell_configs(cell: Cell, config: SweepConfig) -> tuple[EnvConfig, type, Any]:
    """The env config, agent class and agent config of one cell: the sweep's env with the cell's beta and env
    overrides; the agent's defaults (or its file in `agent_configs`), the cell's overrides and seed."""
    from agents.registry import config_fields, get_agent_class, resolve_config

    env_cfg = _with_overrides(dataclasses.replace(config.env, beta=cell.beta), cell.env_overrides)
    agent_cls = get_agent_class(cell.agent)
    # The sweep sets only fields the agent declares: a `seed` field gets the cell's seed; an agent without
    # one is seeded through the global RNGs alone (`run_cell`), which `sweep_notes` says.
    seed = [f"seed={cell.seed}"] if "seed" in config_fields(agent_cls) else []
    agent_cfg = resolve_config(
        agent_cls, config.agent_configs.get(cell.agent), [*cell.agent_overrides, *seed]
    )
    return env_cfg, agent_cls, agent_cfg


def sweep_notes(config: SweepConfig) -> list[str]:
    """What a reader of the sweep should know about its agents before it runs (printed once)."""
    from agents.registry import config_fields, get_agent_class

    notes = []
    for agent in config.agents:
        if "seed" not in config_fields(get_agent_class(agent)) and len(config.seeds) > 1:
            notes.append(
                f"agent {agent!r} declares no `seed` config field: its cells differ only through the global "
                "python/numpy/torch seeds the sweep sets (random.seed, np.random.seed, torch.manual_seed)"
            )
    unused = _other_agents_keys(config)
    if unused:
        notes.append(f"not in this sweep's agents, so not used: {', '.join(unused)}")
    return notes + _backend_notes(config)


def _backend_notes(config: SweepConfig) -> list[str]:
    """Settings of the backend that do not do what they seem to: Ray's, on the local backend; a CPU or GPU
    reserved for a cell that will not use it, or used without being reserved."""
    if config.backend == "local":
        defaults = {"ray_address": None, "cell_resources": CellResources()}
        unused = [key for key, default in defaults.items() if getattr(config, key) != default]
        return (
            [f"{', '.join(unused)} apply to backend: ray only; this sweep's backend is local"]
            if unused
            else []
        )
    notes = []
    resources = config.cell_resources
    if config.threads_per_worker > resources.num_cpus:
        notes.append(
            f"each cell runs {config.threads_per_worker} torch threads on {resources.num_cpus:g} reserved CPU(s) "
            "(threads_per_worker > cell_resources.num_cpus): cells sharing a node will slow each other down"
        )
    devices = {
        _with_overrides(dataclasses.replace(config.env, beta=cell.beta), cell.env_overrides).device
        for cell in expand_cells(config)
    }
    if resources.num_gpus > 0 and devices == {"cpu"}:
        notes.append(
            f"each cell reserves {resources.num_gpus:g} GPU(s) but runs on env.device 'cpu'; set env.device: cuda"
        )
    if resources.num_gpus == 0 and any(device.startswith("cuda") for device in devices):
        notes.append(
            "env.device is 'cuda' but cell_resources.num_gpus is 0: Ray places cells by what they reserve, so "
            "cells may crowd one GPU or find none visible; set cell_resources.num_gpus"
        )
    return notes


def check_cells(cells: list[Cell], config: SweepConfig) -> None:
    """Resolve every cell's configs before any runs, so that a bad grid or override key (a typo, a renamed
    field, a value out of its range) or an agent setting the env's batch does not suit (`samples_per_prompt`
    not dividing `num_envs`) fails at once, naming the cell, rather than in a worker after the cells before
    it have run."""
    for cell in cells:
        _checked_configs(cell, config)


def _checked_configs(cell: Cell, config: SweepConfig) -> tuple[EnvConfig, Any]:
    """The cell's env and agent configs, or the ConfigError of `check_cells` naming the cell."""
    try:
        env_cfg, agent_cls, agent_cfg = cell_configs(cell, config)
        check_num_envs(agent_cls, agent_cfg, env_cfg.num_envs)
    except (ConfigError, ValueError, TypeError) as e:
        raise ConfigError(f"sweep cell {cell.name}: {e}") from e
    return env_cfg, agent_cfg


#: Bumped when what a cell's result depends on is counted differently: every older record is then stale.
IDENTITY_VERSION = 1


def _reference_env(config: SweepConfig) -> dict[str, Any]:
    """The env pi_ref's scores (`ref_*`, in every row) are measured on: the sweep's env; its beta does not
    enter pi_ref's reward or gold scores."""
    return {k: v for k, v in config_to_dict(config.env).items() if k != "beta"}


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _inputs(
    settings: dict[str, Any], fingerprint: Callable[[str], str], run_dir: Path | None
) -> dict[str, str]:
    """The files a cell reads, by the name its configs give them -> a content hash.

    Every string setting that names an existing file or folder counts (env.model, env.reward_model,
    env.prompts, dpo.pairs, a user's agent's own paths), but not "." nor a folder holding the sweep's own run
    folder; the built-in model, built from a recipe, counts by its recipe's key. Hub ids and `module:attr`
    objects count by name only (their content is not a local file).
    """
    found: dict[str, str] = {}
    here = run_dir.resolve() if run_dir is not None else None
    for text in _strings(settings):
        if text in found or text in ("", ".", "..") or not os.path.exists(text):
            continue
        path = Path(text).resolve()
        if here is not None and (path == here or path in here.parents):
            continue
        found[text] = fingerprint(text)
    models = {settings["env"].get("model"), settings.get("reference_env", {}).get("model")}
    from rlhf_base.models import DEFAULT_MODEL

    if models & {None, DEFAULT_MODEL}:
        from text_env.tasks.reviews.pretrain import cache_key

        found[f"{DEFAULT_MODEL} (built-in model, by its recipe)"] = cache_key()
    return found


def cell_identity(
    cell: Cell,
    config: SweepConfig,
    fingerprint: Callable[[str], str] | None = None,
    run_dir: Path | None = None,
) -> dict[str, Any]:
    """Everything `cell`'s row and curve depend on, as JSON values; its SHA-256 is the cell's `identity`.

    Covered: the grid point (agent, beta, seed, swept columns); the fully resolved agent config (defaults,
    `agent_configs` file, overrides, seed) and env config (`env.speed` and `device` included); the env
    pi_ref is measured on; `eval_episodes`; `threads_per_worker` (torch's CPU kernels split sums by thread
    count, which moves the last bits of float results); and the content of every input file (`_inputs`).
    Not covered, since they decide only where and how fast cells run or where results go: `workers`,
    `backend`, `ray_address`, `cell_resources`, `name`, `runs_root`; nor the code (rlhf-gym's, a plugin's,
    a `module:attr` reward's) or library versions: after changing those, pass `force` or a new name.

    Args:
        fingerprint: a file or folder -> its content hash (default: `Fingerprints()`, without a cache).
        run_dir: the sweep's run folder, never counted as an input.
    """
    env_cfg, agent_cfg = _checked_configs(cell, config)
    identity: dict[str, Any] = {
        "version": IDENTITY_VERSION,
        "cell": [cell.agent, cell.beta, cell.seed, [list(item) for item in cell.swept]],
        "agent": config_to_dict(agent_cfg),
        "env": config_to_dict(env_cfg),
        "reference_env": _reference_env(config),
        "eval_episodes": config.eval_episodes,
        "threads_per_worker": config.threads_per_worker,
    }
    identity = json.loads(json.dumps(identity, default=str))  # as a record reads back: lists, not tuples
    identity["inputs"] = _inputs(identity, fingerprint or Fingerprints(), run_dir)
    return identity


def plan_cells(
    config: SweepConfig,
    fingerprint: Callable[[str], str] | None = None,
    run_dir: Path | None = None,
) -> list[tuple[Cell, dict[str, Any]]]:
    """Every cell of the grid, checked as `check_cells` does, with its identity set (so it has an `id`),
    and the identity itself (`cell_identity`)."""
    fingerprint = fingerprint or Fingerprints()
    planned = []
    for cell in expand_cells(config):
        identity = cell_identity(cell, config, fingerprint, run_dir)
        planned.append((dataclasses.replace(cell, identity=digest(identity)), identity))
    return planned


def run_cell(cell: Cell, config: SweepConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train and evaluate one cell (in a worker process); return its results row and curve rows."""
    import torch

    from agents.base import agent_learns

    torch.set_num_threads(config.threads_per_worker)
    random.seed(cell.seed)  # the global RNGs, for agents (a user's) that take no `seed` field
    np.random.seed(cell.seed)  # noqa: NPY002 (the legacy global RNG is what such agents may draw from)
    torch.manual_seed(cell.seed)
    env_cfg, agent_cls, agent_cfg = cell_configs(cell, config)
    envs = env_cfg.make()
    agent = agent_cls(envs, agent_cfg)
    history = agent.learn()
    final = agent.evaluate(num_episodes=config.eval_episodes, seed=10_000 + cell.seed)
    row = result_row(cell.columns(), agent_learns(agent_cls), final, history)
    return row, curve_rows(cell.columns(), history)


def _reference_key(config: SweepConfig, fingerprint: Callable[[str], str], run_dir: Path) -> dict[str, Any]:
    """What pi_ref's scores depend on: reference.json holds them with it, and is reused while it holds."""
    env = json.loads(json.dumps(_reference_env(config), default=str))
    key: dict[str, Any] = {
        "version": IDENTITY_VERSION,
        "env": env,
        "eval_episodes": config.eval_episodes,
        "threads_per_worker": config.threads_per_worker,
    }
    key["inputs"] = _inputs({"env": env}, fingerprint, run_dir)
    return key


def _reference_metrics(config: SweepConfig, folder: RunFolder, key: dict[str, Any]) -> dict[str, float]:
    """pi_ref's proxy and gold reward on the sweep's env, measured once and cached in reference.json
    (written atomically; a damaged one is measured again, with a warning), on `threads_per_worker` threads
    as the cells run, so that the number does not depend on the main process's core count."""
    cached = folder.reference(key)
    if cached is not None:
        return cached
    import torch

    from agents.base import evaluate_policy

    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads_per_worker)
    try:
        metrics = reference_row(
            evaluate_policy(config.env.make(), num_episodes=config.eval_episodes, seed=10_000)
        )
    finally:
        torch.set_num_threads(threads)
    folder.save_reference(key, metrics)
    return metrics


def finished_cells(run_dir: Path) -> set[str]:
    """The ids of the cells with a valid record in `run_dir/cells/`, whatever settings they ran with."""
    return set(RunFolder(run_dir).load(repair=False))


def _stale(
    planned: list[tuple[Cell, dict[str, Any]]], records: dict[str, dict[str, Any]]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(record, the current identity) for each record of a current grid point run under other settings."""
    by_point: dict[str, list[dict[str, Any]]] = {}
    for record in records.values():
        by_point.setdefault(json.dumps(record["identity"].get("cell")), []).append(record)
    stale = []
    for _, identity in planned:
        for record in by_point.get(json.dumps(identity["cell"]), []):
            if record["identity"] != identity:
                stale.append((record, identity))
    return stale


def _refusal(folder: RunFolder, stale: list, legacy: list[Path]) -> StaleResults:
    """The error that says why the folder's results cannot be mixed with this config's, and what to do."""
    todo = (
        "rerun with --force (Python: run_sweep(config, force=True)) to run those cells again with this config"
    )
    if legacy:
        names = " and ".join(path.name for path in legacy)
        rows = sum(
            max(len(path.read_text().splitlines()) - 1, 0) for path in legacy if path.name == "results.csv"
        )
        return StaleResults(
            f"{folder.path} was written by an rlhf-gym from before per-cell records: its {names} "
            f"({rows} result row(s)) do not record the settings the cells ran with, so they cannot be checked "
            f"against this config; {todo} (the old CSV files move to {folder.stale}), or give the sweep a new "
            f"name (`rlhf-gym report {folder.path}` still reports the old results)"
        )
    differences = list(
        dict.fromkeys(c for record, identity in stale for c in changes(record["identity"], identity))
    )
    cells = sorted({record["cell"] for record, _ in stale})
    named = ", ".join(cells[:2]) + (", ..." if len(cells) > 2 else "")
    return StaleResults(
        f"{folder.path} holds results of {len(cells)} cell(s) ({named}) run with other settings than this "
        f"config: {'; '.join(differences[:8])}"
        f"{'; ...' if len(differences) > 8 else ''}. Refusing to mix them: {todo} (the old records move to "
        f"{folder.stale}), or give the sweep a new name"
    )


def run_sweep(config: SweepConfig, progress: bool = True, force: bool = False) -> Path:
    """Run every cell without a record; return the run folder (results.csv, curves.csv, sweep.yaml, cells/).

    Args:
        force: run again the cells whose records in the folder were made under other settings (changed
            overrides, env, input files ...; see `cell_identity`), setting those records aside in `stale/`,
            and likewise a folder written before per-cell records. Without it such a folder is refused.

    Raises:
        ConfigError: a bad grid or override key, before anything is written.
        FolderLocked: another sweep is running on the folder (its PID is in the message).
        StaleResults: the folder holds results of these cells under other settings (the message names what
            differs) and `force` is False.
        CellsFailed: after every cell has run, if some raised: the others' results are written, and each
            failure's error and traceback is a line of failures.jsonl; a rerun retries only those cells.
    """
    check_cells(expand_cells(config), config)  # before the folder is touched
    folder = RunFolder(Path(config.runs_root) / config.name)
    say = (
        (lambda text: print(f"[sweep {config.name}] {text}", flush=True)) if progress else (lambda text: None)
    )
    with folder.lock():
        fingerprint = Fingerprints(folder.path / "inputs.json")
        planned = plan_cells(config, fingerprint, folder.path)
        reference_key = _reference_key(config, fingerprint, folder.path)
        fingerprint.save()
        records, legacy = folder.load(), folder.legacy_views()
        recorded = set(records)  # rows of these cells in the CSV files are not torn, whatever happens below
        stale = _stale(planned, records)
        if (stale or legacy) and not force:
            raise _refusal(folder, stale, legacy)
        if stale or legacy:
            ids = sorted({record["cell"] for record, _ in stale})
            folder.set_aside(ids, legacy)
            records = {k: v for k, v in records.items() if k not in ids}
            csvs = " and the CSV files of a folder from before records" if legacy else ""
            say(f"force: {len(ids)} record(s) of other settings{csvs} set aside in {folder.stale}")
        folder.cells.mkdir(exist_ok=True)
        save_config(config, folder.path / "sweep.yaml")
        identities = {cell.id: identity for cell, identity in planned}
        done = {
            c.id: records[c.id]
            for c, identity in planned
            if records.get(c.id, {}).get("identity") == identity
        }
        folder.check_views(recorded)
        order = [cell.id for cell, _ in planned]
        folder.rebuild_views([done[i] for i in order if i in done])
        for record in done.values():  # a cell killed between its record and its TensorBoard run
            folder.write_tensorboard(record, CURVE_METRICS)
        todo = [cell for cell, _ in planned if cell.id not in done]
        say(f"{len(planned)} cells, {len(done)} done, {len(todo)} to run")
        for note in sweep_notes(config):
            say(f"note: {note}")
        failures_path = folder.path / FAILURES
        failures_path.unlink(missing_ok=True)  # every unfinished cell runs again; the file lists this run's
        if not todo:
            return folder.path
        start = time.perf_counter()
        failures: list[str] = []
        with _backend(config) as submit:  # first: a backend that cannot start fails before pi_ref is measured
            reference = _reference_metrics(config, folder, reference_key)

            def record(cell: Cell, row: dict[str, Any], curves: list[dict[str, Any]]) -> None:
                done[cell.id] = folder.write_record(
                    cell.id, identities[cell.id], {**row, **reference}, curves
                )
                folder.write_tensorboard(done[cell.id], CURVE_METRICS, force=True)
                folder.rebuild_views([done[i] for i in order if i in done])
                say(
                    f"{cell.id}: gold {_signed(row['gold_score'], 'none')} proxy {row['rm_score']:+.3f} "
                    f"kl {row['kl']:.3f} ({time.perf_counter() - start:.0f}s)"
                )

            def failed(cell: Cell, error: BaseException) -> None:
                """Record a cell that raised (its error and traceback, one JSON line) and go on with the others."""
                failures.append(cell.id)
                entry = {
                    "cell": cell.id,
                    **cell.columns(),
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": "".join(traceback.format_exception(error)),
                }
                with open(failures_path, "a") as f:
                    f.write(json.dumps(entry, default=str) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                say(f"{cell.id} FAILED: {entry['error']}")

            _run_cells(todo, submit, max(config.workers, 1), record, failed)
    if failures:
        raise CellsFailed(folder.path, failures)
    return folder.path


#: Submits one cell to a backend; the future's result is `run_cell`'s (results row, curve rows).
Submit = Callable[[Cell], "Future[tuple[dict[str, Any], list[dict[str, Any]]]]"]


def _run_cells(
    cells: Iterable[Cell],
    submit: Submit,
    limit: int,
    record: Callable[[Cell, dict[str, Any], list[dict[str, Any]]], None],
    failed: Callable[[Cell, BaseException], None],
) -> None:
    """Keep up to `limit` cells in flight through `submit`, and hand each finished cell to `record` (its rows)
    or `failed` (what it raised), in the order they finish, in this process: every backend shares this."""
    waiting = iter(cells)
    in_flight: dict[Future, Cell] = {}
    while True:
        while len(in_flight) < limit and (cell := next(waiting, None)) is not None:
            try:
                in_flight[submit(cell)] = cell
            except Exception as e:  # a backend that broke (a pool whose worker died) fails each cell left
                failed(cell, e)
        if not in_flight:
            return
        finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
        for future in finished:
            cell = in_flight.pop(future)
            try:
                result = future.result()
            except Exception as e:  # one cell's failure is recorded; the others still run
                failed(cell, e)
                continue
            record(cell, *result)


@contextlib.contextmanager
def _backend(config: SweepConfig) -> Iterator[Submit]:
    """The `submit` of `config.backend`, for the length of a sweep: a process pool (`spawn`: no state
    inherited), this process itself (`workers: 1`), or Ray tasks (`rlhf_gym.sweep_ray`, imported only then)."""
    if config.backend == "ray":
        from rlhf_gym.sweep_ray import ray_backend

        with ray_backend(config, run_cell) as submit:
            yield submit
    elif config.workers <= 1:

        def run_here(cell: Cell) -> Future:
            future: Future = Future()
            try:
                future.set_result(run_cell(cell, config))
            except Exception as e:
                future.set_exception(e)
            return future

        yield run_here
    else:
        import multiprocessing

        with ProcessPoolExecutor(
            config.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=exit_with_parent,  # a worker dies with the sweep, even a SIGKILLed one
            initargs=(os.getpid(),),
        ) as pool:
            yield lambda cell: pool.submit(run_cell, cell, config)


def _signed(value: float, missing: str) -> str:
    """`+0.123`, or `missing` for a NaN (a task without gold)."""
    return missing if value != value else f"{value:+.3f}"


class CellsFailed(RuntimeError):
    """Some cells of a sweep raised; the others finished and are in results.csv. A rerun retries only these.

    Attributes:
        run_dir: the sweep's folder (its results are usable: `make_report(run_dir)` reports what finished).
        cells: the ids of the failed cells, whose errors and tracebacks are in `run_dir/failures.jsonl`.
    """

    def __init__(self, run_dir: Path, cells: list[str]) -> None:
        self.run_dir, self.cells = run_dir, cells
        super().__init__(
            f"{len(cells)} sweep cell(s) failed ({', '.join(cells[:3])}{', ...' if len(cells) > 3 else ''}); "
            f"their errors are in {run_dir / FAILURES}; the other cells finished; rerun the sweep to retry "
            "only the failed ones"
        )


# The command line moved to rlhf_gym.cli (one CLI module); the old names work, with a warning.
__getattr__ = moved_names(__name__, {"add_sweep_command": "rlhf_gym.cli"})
