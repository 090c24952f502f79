"""Agent comparison sweeps: a grid of agents x beta x seeds (x any config field), run in worker processes.

Every finished cell is appended to `runs/<name>/results.csv` (one row) and `curves.csv` (one row per
iteration) by the parent process alone, a whole line at a time, so a killed sweep loses only the cells in
flight; rerunning it skips every cell already in results.csv. The rows are built by the report's schema
(`rlhf_gym.report.schema`), the one definition of both files' columns, in the agents' metric names.

Where a cell runs is the backend's only business (`SweepConfig.backend`): "local" runs cells in a process
pool on this machine (or in this process with `workers: 1`), "ray" runs each as a Ray task
(`rlhf_gym.sweep_ray`, issue 15). Either way a cell returns its rows to this process, which records them
(`_run_cells`), so the files and the resume guarantee do not depend on the backend.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
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
from rlhf_base.ranges import SEED, Range, check_ranges
from rlhf_base.runlog import RunLog
from rlhf_gym.report.schema import (
    CURVE_METRICS,
    RESULT_METRICS,
    curve_rows,
    reference_row,
    result_row,
    upgrade_name,
)
from text_env.config import EnvConfig

__all__ = [
    "BACKENDS",
    "FAILURES",
    "RESULT_METRICS",
    "Cell",
    "CellResources",
    "CellsFailed",
    "SweepConfig",
    "cell_configs",
    "check_cells",
    "expand_cells",
    "finished_cells",
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
    """One run of the grid: an agent, a beta, a seed and the dotted overrides that define it."""

    agent: str
    beta: float
    seed: int
    swept: tuple[tuple[str, Any], ...]  # (column, value) of the grid axes that apply to this agent
    env_overrides: tuple[str, ...]
    agent_overrides: tuple[str, ...]

    @property
    def id(self) -> str:
        key = json.dumps([self.agent, self.beta, self.seed, self.swept], sort_keys=True, default=str)
        return f"{self.agent}-b{self.beta:g}-s{self.seed}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"

    def columns(self) -> dict[str, Any]:
        return {
            "cell": self.id,
            "agent": self.agent,
            "seed": self.seed,
            "beta": self.beta,
            **dict(self.swept),
        }


def _route(key: str, agent: str) -> tuple[str | None, str]:
    """Where dotted `key` applies for `agent`: ("env" | "agent" | None, the key inside that config)."""
    head, _, rest = key.partition(".")
    if not rest:
        raise ConfigError(f"sweep key {key!r} needs a prefix: 'env.X', 'agent.X' or 'AGENT_NAME.X'")
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


def _override(key: str, value: Any) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def expand_cells(config: SweepConfig) -> list[Cell]:
    """Every cell of the grid, in a stable order; an axis of another agent does not multiply this one's cells."""
    if config.env.beta != EnvConfig.beta and config.env.beta not in config.betas:
        raise ConfigError(
            f"the sweep's env.beta={config.env.beta} would be ignored: each cell's beta comes from "
            f"`betas` ({config.betas}); list the value there"
        )
    fixed = [text.partition("=")[::2] for text in config.overrides]
    bad = [text for text in config.overrides if "=" not in text]
    if bad:
        raise ConfigError(f"sweep overrides must be KEY=VALUE with a dotted KEY; got {bad}")
    cells = []
    for agent in config.agents:
        axes = [(k, v) for k, v in sorted(config.grid.items()) if _route(k, agent)[0] is not None]
        for beta, seed, *values in itertools.product(config.betas, config.seeds, *[v for _, v in axes]):
            env_over, agent_over = [], []
            for key, value in [*fixed, *zip((k for k, _ in axes), values, strict=True)]:
                target, inner = _route(key, agent)
                if target == "env":
                    env_over.append(_override(inner, value))
                elif target == "agent":
                    agent_over.append(_override(inner, value))
            swept = tuple(
                (k if not k.startswith(f"{agent}.") else k.split(".", 1)[1], v)
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
        try:
            env_cfg, agent_cls, agent_cfg = cell_configs(cell, config)
            check_num_envs(agent_cls, agent_cfg, env_cfg.num_envs)
        except (ConfigError, ValueError, TypeError) as e:
            raise ConfigError(f"sweep cell {cell.id}: {e}") from e


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


def _append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows to a CSV, widening the header if a new column appears (rare: a new swept key).

    A file written before issue 11 has its old column names upgraded first (`schema.OLD_NAMES`), so a
    resumed sweep never mixes the two vocabularies in one file.
    """
    existing: list[dict[str, Any]] = []
    fields: list[str] = []
    upgraded: list[str] = []
    if path.is_file() and path.stat().st_size:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            upgraded = [upgrade_name(k) for k in fields]
            if upgraded != fields or any(k not in upgraded for row in rows for k in row):
                existing = [{upgrade_name(k): v for k, v in row.items()} for row in reader]
    new_fields = list(dict.fromkeys([*upgraded, *(k for row in rows for k in row)]))
    if new_fields != fields:  # rewrite with the wider header (atomically), then append
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=new_fields)
            writer.writeheader()
            writer.writerows(existing)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=new_fields).writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def _reference_metrics(config: SweepConfig, run_dir: Path) -> dict[str, float]:
    """pi_ref's proxy and gold reward on the sweep's env, measured once and cached in reference.json."""
    path = run_dir / "reference.json"
    key = json.dumps(config_to_dict(config.env), sort_keys=True)
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("env") == key:  # a cache written before issue 11 has the old names
            return {upgrade_name(k): v for k, v in cached["metrics"].items()}
    from agents.base import evaluate_policy

    metrics = reference_row(
        evaluate_policy(config.env.make(), num_episodes=config.eval_episodes, seed=10_000)
    )
    path.write_text(json.dumps({"env": key, "metrics": metrics}, indent=2))
    return metrics


def _write_tensorboard(path: Path, curves: list[dict[str, Any]]) -> None:
    """One TensorBoard run per cell: its learning curve, by iteration."""
    with RunLog(path, csv=None, tensorboard=".") as log:
        for row in curves:
            log.log(row, int(row["iteration"]), scalars=CURVE_METRICS)


def finished_cells(run_dir: Path) -> set[str]:
    path = run_dir / "results.csv"
    if not path.is_file():
        return set()
    with open(path, newline="") as f:
        return {row["cell"] for row in csv.DictReader(f) if row.get("cell")}


def run_sweep(config: SweepConfig, progress: bool = True) -> Path:
    """Run every unfinished cell; return the run folder (results.csv, curves.csv, sweep.yaml).

    Raises:
        CellsFailed: after every cell has run, if some raised: the others' results are written, and each
            failure's error and traceback is a line of failures.jsonl; a rerun retries only those cells.
    """
    cells = expand_cells(config)
    check_cells(cells, config)
    run_dir = Path(config.runs_root) / config.name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "sweep.yaml")
    for name in ("results.csv", "curves.csv"):  # a folder written before issue 11 gets today's column names
        if (run_dir / name).is_file():
            _append_rows(run_dir / name, [])
    done = finished_cells(run_dir)
    todo = [c for c in cells if c.id not in done]
    if progress:
        print(
            f"[sweep {config.name}] {len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run",
            flush=True,
        )
        for note in sweep_notes(config):
            print(f"[sweep {config.name}] note: {note}", flush=True)
    failures_path = run_dir / FAILURES
    failures_path.unlink(missing_ok=True)  # every unfinished cell runs again; the file lists this run's
    if not todo:
        return run_dir
    start = time.perf_counter()
    failures: list[str] = []
    with _backend(config) as submit:  # first: a backend that cannot start fails before pi_ref is measured
        reference = _reference_metrics(config, run_dir)

        def record(cell: Cell, row: dict[str, Any], curves: list[dict[str, Any]]) -> None:
            row = {**row, **reference}
            _write_tensorboard(run_dir / "tensorboard" / cell.id, curves)
            _append_rows(run_dir / "curves.csv", curves)  # curves first: a row in results.csv means complete
            _append_rows(run_dir / "results.csv", [row])
            if progress:
                print(
                    f"[sweep {config.name}] {cell.id}: gold {_signed(row['gold_score'], 'none')} "
                    f"proxy {row['rm_score']:+.3f} "
                    f"kl {row['kl']:.3f} ({time.perf_counter() - start:.0f}s)",
                    flush=True,
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
            if progress:
                print(f"[sweep {config.name}] {cell.id} FAILED: {entry['error']}", flush=True)

        _run_cells(todo, submit, max(config.workers, 1), record, failed)
    if failures:
        raise CellsFailed(run_dir, failures)
    return run_dir


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

        with ProcessPoolExecutor(config.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
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
