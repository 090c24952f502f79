"""Means with 95% confidence intervals over seeds, the summary table, and its Markdown form.

Seeds are the replicates of a configuration (see `schema.config_columns`), and every number in the table
is a mean over them with a Student t interval (:func:`mean_ci`), since a sweep has a handful of seeds and
the normal 1.96 would understate the uncertainty (4.30 is the right factor for 3 seeds).

At few seeds a t interval is wide, and for a metric that cannot be negative (KL, length, time: `LOWER_BOUNDS`)
it can run below zero. :func:`interval` clips it at the bound: the table then prints `mean [low, high]` and
the plots draw asymmetric error bars, never a KL below 0 (issue 13). Metrics without a bound (the rewards)
keep the symmetric interval.

A metric's NaN cells (a task without gold reward writes `gold_score` = NaN) are left out of its mean, and the
summary counts the cells that have it (`<metric>_n`), so a mean over some of a configuration's seeds is
shown as such, never silently averaged.

A NaN is "not recorded" where a metric may be missing (`MAY_BE_MISSING`: gold without a gold reward, a bound
only some agents report, pi_ref's metrics where a resumed sweep did not measure them) and where an agent
never reports a metric (NaN in all of a configuration's cells). Any other NaN (in `kl` or `rm_score`, which
every agent reports, or beside finite values of the same configuration), and an infinity anywhere, is a
*non-finite value*: a cell that diverged or was written wrong. It is left out
of the mean too, but counted (`<metric>_bad`), its table entry is marked † with "(k of n seeds)", a footnote
under the table names the configurations and metrics, and :func:`non_finite_cells` lists the cells for the
warning `rlhf-gym report` prints (issue 16).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from rlhf_base.io import DataError
from rlhf_base.metrics import OPTIONAL_METRIC_KEYS
from rlhf_gym.report.schema import (
    REF_METRICS,
    RESULT_METRICS,
    RESULTS_REQUIRED,
    check_columns,
    config_columns,
)

__all__ = [
    "LOWER_BOUNDS",
    "MAY_BE_MISSING",
    "NON_FINITE_MARK",
    "format_value",
    "interval",
    "markdown_table",
    "mean_ci",
    "non_finite_cells",
    "non_finite_message",
    "reference_mean_ci",
    "summarise",
    "t_quantile_975",
]

#: Table columns after the configuration and `seeds`: (metric, header, number format).
_TABLE_METRICS = (
    ("gold_score", "gold", ".3f"),
    ("rm_score", "proxy", ".3f"),
    ("kl", "KL", ".3f"),
    ("kl_bound", "KL upper bound", ".3f"),  # shown when an agent reports one (best-of-n)
    ("length", "length", ".1f"),
    ("wall_time", "time (s)", ".1f"),
)

#: Lower bounds of metrics that have one: KL(pi || pi_ref) >= 0 (a k1 estimate's mean can dip below 0, the
#: KL cannot), an entropy, a length, seconds and tokens. Rewards have none.
LOWER_BOUNDS = {
    "kl": 0.0,
    "kl_bound": 0.0,
    "entropy": 0.0,
    "length": 0.0,
    "wall_time": 0.0,
    "tokens": 0.0,
    "iterations": 0.0,
}

#: t_{0.975, df} for df = 1..30, the two-sided 95% Student t quantile (standard tables, e.g. the NIST/SEMATECH
#: e-Handbook's critical values of Student's t); tests/test_report.py checks each against a numerical integral of the t density.
_T975 = (
    12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851, 2.364624252, 2.306004135,
    2.262157163, 2.228138852, 2.200985160, 2.178812830, 2.160368656, 2.144786688, 2.131449546, 2.119905299,
    2.109815578, 2.100922040, 2.093024054, 2.085963447, 2.079613845, 2.073873068, 2.068657610, 2.063898562,
    2.059538553, 2.055529439, 2.051830516, 2.048407142, 2.045229642, 2.042272456,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """The Student t 0.975 quantile with `df` degrees of freedom: the 95% interval factor (no scipy needed).

    df 1..30 come from the table above; beyond, the Cornish-Fisher expansion of t around the normal
    quantile z (Abramowitz & Stegun 26.7.5, four terms), accurate to about 1e-6 there.

    Raises:
        ValueError: If `df < 1`.
    """
    if df < 1:
        raise ValueError(f"the t quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = statistics.NormalDist().inv_cdf(0.975)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def mean_ci(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, 95% CI half-width `t_{0.975, n-1} * std(ddof=1) / sqrt(n)`, and n, over the finite values.

    The half-width is NaN for n < 2 (one seed says nothing about the spread); the mean is NaN for n = 0.
    """
    x = np.asarray(list(values), dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(x[0]), math.nan, 1
    return float(x.mean()), t_quantile_975(n - 1) * float(x.std(ddof=1)) / math.sqrt(n), n


def interval(mean: float, ci: float, metric: str) -> tuple[float, float]:
    """The 95% interval (low, high) of `metric` around `mean`, clipped at the metric's bound (`LOWER_BOUNDS`).

    A NaN `ci` (one seed) gives (mean, mean) clipped likewise; a metric without a bound keeps mean ± ci.
    A mean below the bound (a k1 KL estimate of -0.01) clips too: both ends are then at least the bound.
    """
    half = 0.0 if not math.isfinite(ci) else ci
    low, high = mean - half, mean + half
    bound = LOWER_BOUNDS.get(metric)
    if bound is not None:
        low, high = max(low, bound), max(high, bound)
    return low, high


#: The summary's columns per metric: mean, CI half-width, the number of finite values averaged, and the
#: number of non-finite values left out (`non_finite_cells`).
_STATS = ("mean", "ci", "n", "bad")

#: Metrics whose NaN means "not recorded" rather than "went wrong": gold without a gold reward, an optional
#: metric of the agents that do not report it, and pi_ref's metrics in the rows of a resumed sweep.
MAY_BE_MISSING = frozenset({"gold_score", *OPTIONAL_METRIC_KEYS, *REF_METRICS})
#: Metrics every agent reports (the schema refuses a row without them): a NaN there is always a fault.
_ALWAYS_REPORTED = tuple(m for m in RESULTS_REQUIRED if m in RESULT_METRICS and m not in MAY_BE_MISSING)
#: The mark of a table entry whose configuration had non-finite values of that metric (see the footnote).
NON_FINITE_MARK = "†"


def _non_finite(results: pd.DataFrame) -> pd.DataFrame:
    """True where a cell's metric is a non-finite value, by metric (the columns) and row (the index).

    An infinity always is. A NaN is where the metric is always reported (`kl`, `rm_score`), and where a
    configuration's other cells have a finite value of it (a seed that lost it); it is not where the metric
    may be missing (`MAY_BE_MISSING`), nor in a metric a configuration's agent never reports (NaN in all of
    its cells, as the sweep writes a metric an agent lacks: the table's "n/a").
    """
    metrics = [m for m in (*RESULT_METRICS, *REF_METRICS) if m in results.columns]
    values = results[metrics].apply(pd.to_numeric, errors="coerce")
    bad = pd.DataFrame(np.isinf(values.to_numpy(dtype=float)), index=results.index, columns=metrics)
    keys = [results[c] for c in config_columns(results)]
    for m in metrics:
        if m in MAY_BE_MISSING:
            continue
        missing = values[m].isna()
        if m not in _ALWAYS_REPORTED:
            missing &= values[m].notna().groupby(keys, dropna=False, sort=False).transform("any")
        bad[m] |= missing
    return bad


def non_finite_cells(results: pd.DataFrame) -> list[tuple[str, str, float]]:
    """`(cell, metric, value)` of every non-finite value in results.csv's metrics, in file order.

    A NaN that only says "not recorded" (gold without a gold reward, a metric an agent does not report;
    see `_non_finite`) is not one.
    """
    results = results.reset_index(drop=True)
    bad = _non_finite(results)
    return [
        (str(results["cell"].iloc[i]), m, float(pd.to_numeric(results[m].iloc[i], errors="coerce")))
        for i in range(len(results))
        for m in bad.columns
        if bad[m].iloc[i]
    ]


def non_finite_message(results: pd.DataFrame, where: str = "results.csv") -> str:
    """One line saying which cells hold non-finite values, left out of the means; "" when none does."""
    found = non_finite_cells(results)
    if not found:
        return ""
    shown = ", ".join(f"{cell} {metric}={value}" for cell, metric, value in found[:6])
    return (
        f"{where} holds {len(found)} non-finite value(s) (NaN or inf), left out of the means, whose entries "
        f"say over how many seeds they are and are marked {NON_FINITE_MARK}: {shown}"
        + (", ..." if len(found) > 6 else "")
    )


def _sorted(df: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    return df.sort_values(list(by), na_position="last", kind="stable").reset_index(drop=True)


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% CI half-width over seeds of every metric, one row per configuration.

    Args:
        results: The rows of results.csv (see `schema` for the contract).

    Returns:
        One row per configuration, sorted by agent then the swept values: the configuration columns,
        `seeds` (the rows averaged), then `<metric>_mean`, `<metric>_ci`, `<metric>_n` (how many of the
        configuration's cells have a finite value) and `<metric>_bad` (how many hold a non-finite value:
        an inf, or a NaN that is not "not recorded", see `_non_finite`) for each metric present
        (and for pi_ref's `ref_*` metrics). Non-finite values (a task without gold's NaN, a diverged cell's
        inf) are left out of the mean; the CI is NaN with fewer than two finite values.

    Raises:
        DataError: A required column is missing, or a configuration has the same seed twice (a cell written
            twice, or a swept field missing from the file: either way its CI would be wrong).
    """
    check_columns(results, RESULTS_REQUIRED, (*RESULT_METRICS, *REF_METRICS), "results")
    results = results.reset_index(drop=True)  # rows by position: `_non_finite`'s mask lines up with groups
    config = config_columns(results)
    metrics = [m for m in (*RESULT_METRICS, *REF_METRICS) if m in results.columns]
    bad = _non_finite(results)
    rows = []
    for key, group in results.groupby(config, dropna=False, sort=False):
        row = dict(zip(config, key, strict=True))
        seeds = group["seed"]
        if seeds.duplicated().any():
            seed = seeds[seeds.duplicated()].iloc[0]
            cells = ", ".join(map(str, group.loc[seeds == seed, "cell"]))
            raise DataError(
                f"configuration {row} has seed {seed} more than once (cells {cells}): a cell was written "
                "twice or a swept field is missing from results.csv"
            )
        row["seeds"] = len(group)
        for m in metrics:
            row[f"{m}_mean"], row[f"{m}_ci"], row[f"{m}_n"] = mean_ci(group[m].to_numpy(dtype=float))
            row[f"{m}_bad"] = int(bad.loc[group.index, m].sum())
        rows.append(row)
    columns = [*config, "seeds", *(f"{m}_{s}" for m in metrics for s in _STATS)]
    return _sorted(pd.DataFrame(rows, columns=columns), config)


def _summary_config(summary: pd.DataFrame) -> list[str]:
    stats = {f"{m}_{s}" for m in (*RESULT_METRICS, *REF_METRICS) for s in _STATS}
    return [c for c in summary.columns if c not in stats and c != "seeds"]


def reference_mean_ci(summary: pd.DataFrame, metric: str) -> tuple[float, float]:
    """pi_ref's (mean, CI) of `metric` ("gold_score"/"rm_score") from a summary; NaNs when absent.

    pi_ref is the same for every cell, so configurations agree; a zero CI (one evaluation copied to every
    row) is reported as NaN: there is no spread over seeds to show.
    """
    mean_col, ci_col = f"ref_{metric}_mean", f"ref_{metric}_ci"
    if mean_col not in summary.columns or not summary[mean_col].notna().any():
        return math.nan, math.nan
    ci = float(np.nanmean(summary[ci_col])) if summary[ci_col].notna().any() else math.nan
    mean = float(np.nanmean(summary[mean_col]))
    spread = ci > 1e-9 * max(1.0, abs(mean))  # float noise of equal values is not spread
    return mean, ci if spread else math.nan


def _cell(
    metric: str,
    mean: float,
    ci: float,
    spec: str,
    n: float = math.nan,
    seeds: float = math.nan,
    bad: float = 0,
) -> str:
    """Format a table entry.

    "0.412 ± 0.031"; "0.050 [0.000, 0.350]" when the interval is clipped at the metric's bound (`interval`);
    the mean alone without a CI; "no gold" (gold) or "n/a" (any other metric) without a mean; and
    " (2 of 3 seeds)" after it when only some of the configuration's `seeds` cells have the metric, then
    " †" when some of the others held a non-finite value (`bad` of them), which the footnote explains.
    """
    mark = f" {NON_FINITE_MARK}" if bad and np.isfinite(bad) and bad > 0 else ""
    if not np.isfinite(mean):
        return ("no gold" if metric == "gold_score" and not mark else "n/a") + mark
    if not np.isfinite(ci):
        text = f"{mean:{spec}}"
    else:
        low, high = interval(mean, ci, metric)
        clipped = (low, high) != (mean - ci, mean + ci)
        text = f"{mean:{spec}} [{low:{spec}}, {high:{spec}}]" if clipped else f"{mean:{spec}} ± {ci:{spec}}"
    if np.isfinite(n) and np.isfinite(seeds) and 0 < n < seeds:
        text += f" ({n:.0f} of {seeds:.0f} seeds)"
    return text + mark


def format_value(value: object) -> str:
    """A configuration value: floats as %g (so an `n` stored as 4.0 reads 4), NaN as blank."""
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else f"{value:g}"
    return str(value)


def _has(summary: pd.DataFrame, column: str, optional: bool) -> bool:
    """Whether the table shows `column`: present, and for a metric only some agents report, ever finite."""
    return column in summary.columns and (not optional or bool(summary[column].notna().any()))


def markdown_table(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table: configuration, seeds, then "mean ± CI" for gold, proxy, KL, ...

    "KL upper bound" (`kl_bound`) is shown when some agent reports one; the other agents' cells read n/a.
    Gold reads "no gold" where a configuration (or pi_ref) has none, and a metric present in only some of a
    configuration's seeds says how many (see `_cell`); an interval clipped at a bound reads `mean [low, high]`.

    Rows keep the summary's order (agent, then swept values); pi_ref comes first when the sweep recorded it.
    An entry whose configuration had non-finite values of its metric (`<metric>_bad`) is marked †, and a
    footnote under the table says which configurations and metrics, and that their means leave them out.
    """
    config = _summary_config(summary)
    shown = [(m, h, s) for m, h, s in _TABLE_METRICS if _has(summary, f"{m}_mean", m in OPTIONAL_METRIC_KEYS)]
    header = [*config, "seeds", *(h for _, h, _ in shown)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] * len(config) + ["---:"] * (len(header) - len(config))) + "|",
    ]
    ref = {m: reference_mean_ci(summary, m) for m in ("gold_score", "rm_score")}
    if any(np.isfinite(mean) for mean, _ in ref.values()):
        cells = ["pi_ref", *[""] * (len(config) - 1), ""]
        for m, _, spec in shown:
            if m == "gold_score" and not np.isfinite(ref[m][0]) and summary[f"{m}_mean"].notna().any():
                cells.append("n/a")  # the sweep has gold, but pi_ref's was not recorded
            else:
                cells.append(_cell(m, *ref[m], spec) if m in ref else f"{0:{spec}}" if m == "kl" else "")
        lines.append("| " + " | ".join(cells) + " |")
    for values in summary.to_dict("records"):
        seeds = values["seeds"]
        cells = [format_value(values[c]) for c in config] + [str(seeds)]
        cells += [
            _cell(
                m,
                values[f"{m}_mean"],
                values[f"{m}_ci"],
                spec,
                values.get(f"{m}_n", math.nan),
                seeds,
                values.get(f"{m}_bad", 0),
            )
            for m, _, spec in shown
        ]
        lines.append("| " + " | ".join(cells) + " |")
    footnote = _non_finite_footnote(summary, config)
    return "\n".join(lines) + "\n" + (f"\n{footnote}\n" if footnote else "")


def _non_finite_footnote(summary: pd.DataFrame, config: list[str]) -> str:
    """The footnote of the † marks: which configuration had how many non-finite values of which metric."""
    parts = []
    for values in summary.to_dict("records"):
        bad = [
            f"{m} in {values[f'{m}_bad']:.0f} of {values['seeds']} seeds"
            for m in (*RESULT_METRICS, *REF_METRICS)
            if values.get(f"{m}_bad", 0) > 0
        ]
        if bad:
            name = " ".join(f"{c}={format_value(values[c])}" for c in config if format_value(values[c]))
            parts.append(f"{name}: {', '.join(bad)}")
    if not parts:
        return ""
    return (
        f"{NON_FINITE_MARK} Non-finite values (NaN or inf) in results.csv, left out of these means (each entry "
        f"says over how many seeds it is): {'; '.join(parts)}."
    )
