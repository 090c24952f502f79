"""The sweep's two CSV files, defined once: the sweep writes its rows with this module, the report reads them.

The metric columns are the agents' own metric names (`rlhf_base.metrics.METRIC_KEYS`, the names of the
env's `info`), so nothing is renamed between the env and the table (issue 11).

## results.csv: one row per finished cell
| column | what it holds |
|---|---|
| `cell`, `agent`, `seed`, `beta` | the cell's id, the agent's registry name, its seed and the env's beta |
| swept fields | one column per grid key (`n`, `agent.lr`, `max_new_tokens`, ...) |
| `learns` | the agent's declaration (`agents.base.agent_learns`): False for agents that only select among samples |
| `rm_score`, `gold_score`, `kl`, `reward`, `length`, `entropy` | the final evaluation on fresh episodes |
| `kl_bound` | an analytic upper bound on `kl` (best-of-n's `log n - (n-1)/n`); NaN for agents without one |
| `wall_time`, `tokens`, `iterations` | what learning cost: seconds, response tokens, iterations |
| `ref_rm_score`, `ref_gold_score` | pi_ref's `rm_score` and `gold_score` (the same in every row) |

## curves.csv: one row per cell per iteration
`cell`, `agent`, `seed`, `beta`, `iteration`, the agent's metrics of that iteration (`CURVE_METRICS`), and
the swept fields.

A *configuration* is the value of every column that is not a metric, `cell`, `seed`, `iteration`,
`learns` or `ref_*` (see :func:`config_columns`): the agent, beta and the swept fields.

Run folders written before issue 11 name the reward columns differently (`OLD_NAMES`: `proxy_reward`,
`gold_reward`, `ref_proxy_reward`, ...) and have no `learns` column. The reader renames the columns with
an `OldColumnsWarning` (a DeprecationWarning; the report adds a note), and :func:`sampling_agents` takes a
missing declaration from the agent's class. Such a folder predates the sweep's per-cell records, so a sweep
refuses to resume it (its rows do not say what settings they ran with) unless forced to run it again.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlhf_base.deprecation import REMOVED_IN
from rlhf_base.io import DataError
from rlhf_base.metrics import METRIC_KEYS, OPTIONAL_METRIC_KEYS

__all__ = [
    "CURVES_REQUIRED",
    "CURVE_METRICS",
    "OLD_NAMES",
    "OldColumnsWarning",
    "REF_METRICS",
    "RESULTS_REQUIRED",
    "RESULT_METRICS",
    "check_columns",
    "config_columns",
    "curve_rows",
    "gold_coverage",
    "old_names_message",
    "read_curves",
    "read_results",
    "read_table",
    "reference_row",
    "result_row",
    "sampling_agents",
    "upgrade_name",
]

#: Per-iteration metrics of curves.csv: every agent metric but `iteration`, which is a column of its own,
#: then those only some agents report (`kl_bound`), NaN in the others' rows.
CURVE_METRICS = (*(key for key in METRIC_KEYS if key != "iteration"), *OPTIONAL_METRIC_KEYS)
#: Per-cell metrics of results.csv: the same names, then the number of learning iterations run.
RESULT_METRICS = (*CURVE_METRICS, "iterations")
#: Of these, the ones a results row takes from the learning history (its cost), not from the evaluation.
_COST_METRICS = ("wall_time", "tokens")
#: pi_ref's metrics, `ref_` + the metric (the same for every cell); pi_ref's KL is 0 by definition.
REF_METRICS = ("ref_rm_score", "ref_gold_score")
#: Metrics every agent must report: the report's axes. Others are NaN when an agent does not report them.
_REQUIRED_METRICS = ("kl", "rm_score", "gold_score")

RESULTS_REQUIRED = ("cell", "agent", "seed", "beta", *_REQUIRED_METRICS)
CURVES_REQUIRED = ("cell", "agent", "seed", "beta", "iteration", *_REQUIRED_METRICS)
#: Columns that are neither configuration nor metric.
_NOT_CONFIG = frozenset({"cell", "seed", "iteration", "learns", *RESULT_METRICS, *REF_METRICS})

#: Column names of run folders written before issue 11 -> the names they have now.
OLD_NAMES = {
    "proxy_reward": "rm_score",
    "gold_reward": "gold_score",
    "ref_proxy_reward": "ref_rm_score",
    "ref_gold_reward": "ref_gold_score",
}


def upgrade_name(column: str) -> str:
    """A column's current name (an old one renamed by `OLD_NAMES`, any other unchanged)."""
    return OLD_NAMES.get(column, column)


# --------------------------------------------------------------------------------------------------------
# Writing: the rows the sweep appends
# --------------------------------------------------------------------------------------------------------
def _metric(metrics: Mapping[str, Any], key: str, where: str) -> float:
    if key in metrics:
        return float(metrics[key])
    if key in _REQUIRED_METRICS:
        raise KeyError(
            f"{where} lacks the metric {key!r} (has {', '.join(map(repr, metrics)) or 'none'}); every agent "
            f"reports {', '.join(_REQUIRED_METRICS)} (see rlhf_base.metrics.METRIC_KEYS)"
        )
    return math.nan


def result_row(
    cell: Mapping[str, Any],
    learns: bool,
    final: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """One row of results.csv.

    Args:
        cell: The cell's columns: `cell`, `agent`, `seed`, `beta` and the swept fields.
        learns: The agent's declaration (`agents.base.agent_learns`).
        final: The agent's `evaluate()` metrics on fresh episodes.
        history: The metrics of every learning iteration; the last one gives the cost (`wall_time`,
            `tokens`), since the evaluation's own time says nothing about the agent.

    Raises:
        KeyError: An agent's metrics lack `kl`, `rm_score` or `gold_score` (the message names them).
    """
    row = {**cell, "learns": bool(learns)}
    for key in CURVE_METRICS:
        if key in _COST_METRICS:
            row[key] = _metric(history[-1], key, f"{cell['agent']}'s last iteration") if history else 0.0
        else:
            row[key] = _metric(final, key, f"{cell['agent']}'s evaluate()")
    row["iterations"] = len(history)
    return row


def curve_rows(cell: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows of curves.csv for one cell: its columns, `iteration` and `CURVE_METRICS`, per iteration."""
    return [
        {
            **cell,
            "iteration": m["iteration"],
            **{
                key: _metric(m, key, f"{cell['agent']}'s iteration {m['iteration']}") for key in CURVE_METRICS
            },
        }
        for m in history
    ]


def reference_row(metrics: Mapping[str, Any]) -> dict[str, float]:
    """pi_ref's `REF_METRICS` from its evaluation metrics (`agents.base.evaluate_policy`)."""
    return {ref: _metric(metrics, ref.removeprefix("ref_"), "pi_ref's evaluation") for ref in REF_METRICS}


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------
def check_columns(df: pd.DataFrame, required: Sequence[str], numeric: Sequence[str], where: str) -> None:
    """Raise DataError naming every required column `df` lacks, or a numeric column holding text."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        old = [f"{o!r} -> {new!r}" for o, new in OLD_NAMES.items() if new in missing and o in df.columns]
        hint = f" (old names: {', '.join(old)}; read_results/read_curves rename them)" if old else ""
        raise DataError(
            f"{where} lacks required column(s) {', '.join(map(repr, missing))}; "
            f"columns present: {', '.join(map(repr, df.columns)) or '(none)'}{hint}"
        )
    for column in numeric:
        if column in df.columns and not pd.api.types.is_numeric_dtype(df[column]):
            bad = df[column][pd.to_numeric(df[column], errors="coerce").isna() & df[column].notna()]
            if bad.empty:  # numbers held as text (a frame built by hand), or no rows at all: nothing to name
                continue
            raise DataError(
                f"{where}: column {column!r} must be numeric; data row {bad.index[0] + 1} holds {bad.iloc[0]!r}"
            )


class OldColumnsWarning(DeprecationWarning):
    """A run folder written before issue 11 names metrics by their old names (`OLD_NAMES`)."""


def old_names_message(path: str | Path, renamed: Mapping[str, str]) -> str:
    """The one line telling a user that `path`'s old column names were read under the new ones."""
    return (
        f"{path} uses old column names ({', '.join(f'{o} -> {n}' for o, n in renamed.items())}); they are "
        f"read under the new names, and will not be read after rlhf-gym {REMOVED_IN}: rename the columns "
        "(or rerun the sweep with --force, which runs its cells again and keeps these files in stale/)."
    )


def _upgrade(df: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """Rename old columns to the current names, with an `OldColumnsWarning`."""
    renamed = {old: new for old, new in OLD_NAMES.items() if old in df.columns}
    both = [old for old, new in renamed.items() if new in df.columns]
    if both:
        raise DataError(
            f"{path} has both {both[0]!r} (the old name) and {OLD_NAMES[both[0]]!r}: keep one of the two columns"
        )
    if renamed:
        warnings.warn(old_names_message(path, renamed), OldColumnsWarning, stacklevel=4)
    return df.rename(columns=renamed), renamed


def read_table(path: str | Path, which: str) -> tuple[pd.DataFrame, dict[str, str]]:
    """Read results.csv (`which="results"`) or curves.csv (`"curves"`), check it, and upgrade old names.

    Returns:
        The rows, and the old -> new column names renamed (empty for a current file).

    Raises:
        FileNotFoundError: No such file (the message says to run `rlhf-gym sweep`).
        DataError: The file is empty, lacks a required column (named, with the columns present), or holds
            text in a numeric column (the row is named).
    """
    if which == "results":
        required, numeric = RESULTS_REQUIRED, (*RESULT_METRICS, *REF_METRICS, "seed")
    elif which == "curves":
        required, numeric = CURVES_REQUIRED, (*CURVE_METRICS, "iteration", "seed")
    else:
        raise ValueError(f"which must be 'results' or 'curves', got {which!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `rlhf-gym sweep` first (it writes {path.name})")
    try:
        df = pd.read_csv(path, dtype={"cell": str, "agent": str})
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty: not even a header line") from None
    df, renamed = _upgrade(df, path)
    check_columns(df, required, (), str(path))
    if df.empty:  # before the numeric check: a header alone reads as text columns with no row to name
        raise DataError(f"{path} holds a header but no rows: no cell has finished yet")
    check_columns(df, (), numeric, str(path))
    return df, renamed


def read_results(path: str | Path) -> pd.DataFrame:
    """Read a sweep's results.csv and check its columns (raises FileNotFoundError / DataError, naming path)."""
    return read_table(path, "results")[0]


def read_curves(path: str | Path) -> pd.DataFrame:
    """Read a sweep's curves.csv and check its columns (raises FileNotFoundError / DataError, naming path)."""
    return read_table(path, "curves")[0]


def config_columns(df: pd.DataFrame) -> list[str]:
    """The columns naming a configuration: agent, beta, then the swept fields, in file order."""
    rest = [c for c in df.columns if c not in _NOT_CONFIG and c not in ("agent", "beta")]
    return [c for c in ("agent", "beta") if c in df.columns] + rest


def gold_coverage(df: pd.DataFrame) -> tuple[int, int]:
    """(rows with a finite `gold_score`, rows) of results or curves.

    (0, N) is a task without gold reward: the env writes `gold_score` = NaN for every episode, and the
    report then draws no gold panel and fits nothing on gold; 0 < have < N is gold in some cells only.
    """
    gold = pd.to_numeric(df["gold_score"], errors="coerce").to_numpy(dtype=float)
    return int(np.isfinite(gold).sum()), len(df)


# --------------------------------------------------------------------------------------------------------
# The agents' declaration
# --------------------------------------------------------------------------------------------------------
def _as_bool(value: Any) -> bool:
    """A `learns` cell as written to CSV ("True"/"False") or held in a frame (bool, 0/1)."""
    return str(value).strip().lower() not in ("false", "0", "0.0", "no")


@functools.cache
def _declared_learns(agent: str) -> bool:
    """The `learns` declaration of the class registered as `agent`; True when no class is found."""
    from agents.base import agent_learns
    from agents.registry import get_agent_class

    try:
        return agent_learns(get_agent_class(agent))
    except (ValueError, ImportError, AttributeError):  # not registered here: the protocol's default
        return True


def sampling_agents(results: pd.DataFrame) -> frozenset[str]:
    """The agents that declared `learns = False`: the report draws them as one point per configuration.

    The `learns` column of results.csv says it; rows without it (a run folder written before the column
    existed) take the declaration of the agent's class in the registry, or the default (it learns) when
    no class of that name is registered.
    """
    declared = results["learns"] if "learns" in results.columns else pd.Series(None, index=results.index)
    sampling = set()
    for agent, values in declared.groupby(results["agent"], sort=True):
        known = values.dropna()
        learns = all(map(_as_bool, known)) if len(known) else _declared_learns(str(agent))
        if not learns:
            sampling.add(str(agent))
    return frozenset(sampling)
