"""Sweep reports: mean ± 95% confidence interval over seeds, reward-vs-KL frontiers and over-optimisation fits.

Everything here is computed from the two CSV files a sweep writes, never from checkpoints, so a report can be
rebuilt anywhere and by anyone who has the run folder.

## The data contract
`runs/<name>/results.csv` holds one row per finished cell: `cell`, `agent`, `seed`, `beta`, the swept fields
(one column per dotted key: `n`, `agent.lr`, ...), the metrics in `METRICS`, and optionally pi_ref's
`ref_proxy_reward` and `ref_gold_reward` (the same for every cell). `runs/<name>/curves.csv` holds one row per
cell per iteration: `cell`, `agent`, `seed`, `beta`, `iteration`, the metrics in `CURVE_METRICS` and the
swept fields.

A *configuration* is the value of every column that is not a metric, `cell`, `seed`, `iteration` or `ref_*`:
the agent, beta and the swept fields. Seeds are the replicates of a configuration, and every number in the
table is a mean over them with a Student t interval (:func:`mean_ci`), since a sweep has a handful of seeds
and the normal 1.96 would understate the uncertainty (4.30 is the right factor for 3 seeds).

## Over-optimisation
Gao, Schulman & Hilton (2022, arXiv:2210.10760) found that the gold reward gained over pi_ref follows, in
d = sqrt(KL(pi || pi_ref)), `R_bon(d) = d (a - b d)` for best-of-n and `R_rl(d) = d (a - b log d)` for RL:
it rises, peaks and falls while the proxy reward keeps rising. Both forms are linear in (a, b), so
:func:`fit_gao` solves them by least squares; the peak is at d* = a / 2b (best-of-n) or exp(a/b - 1) (RL).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rlhf_base.io import DataError, atomic_path, atomic_write

__all__ = [
    "CURVE_METRICS",
    "METRICS",
    "REF_METRICS",
    "GaoFit",
    "add_report_command",
    "config_columns",
    "fit_gao",
    "gao_fits",
    "make_report",
    "markdown_table",
    "mean_ci",
    "plot_frontier",
    "plot_learning_curves",
    "plot_overoptimisation",
    "read_curves",
    "read_results",
    "summarise",
    "t_quantile_975",
]

#: Per-cell metrics of results.csv, in table order.
METRICS = (
    "kl",  # mean KL(pi || pi_ref) of the final policy's samples (best-of-n: log n - (n-1)/n)
    "proxy_reward",  # mean reward-model score: what the agent optimised
    "gold_reward",  # mean gold score (NaN when the task has none): what we care about
    "length",  # mean response length in tokens
    "entropy",  # mean per-token policy entropy
    "wall_time",  # seconds the cell took
    "tokens",  # response tokens generated
    "iterations",  # learning iterations run
)
#: Per-iteration metrics of curves.csv (the x axis `iteration` is a column of its own).
CURVE_METRICS = ("kl", "proxy_reward", "gold_reward", "length", "entropy", "wall_time", "tokens")
#: pi_ref's metrics, the same for every cell of a sweep; pi_ref's KL is 0 by definition.
REF_METRICS = ("ref_proxy_reward", "ref_gold_reward")

RESULTS_REQUIRED = ("cell", "agent", "seed", "beta", "kl", "proxy_reward", "gold_reward")
CURVES_REQUIRED = ("cell", "agent", "seed", "beta", "iteration", "kl", "proxy_reward", "gold_reward")
#: Columns that are neither configuration nor metric.
_NOT_CONFIG = frozenset({"cell", "seed", "iteration", *METRICS, *CURVE_METRICS, *REF_METRICS})

#: Table columns after the configuration and `seeds`: (metric, header, number format).
_TABLE_METRICS = (
    ("gold_reward", "gold", ".3f"),
    ("proxy_reward", "proxy", ".3f"),
    ("kl", "KL", ".3f"),
    ("length", "length", ".1f"),
    ("wall_time", "time (s)", ".1f"),
)
#: Agents whose KL is best-of-n's analytic one and whose gold gain takes Gao et al.'s best-of-n form.
BEST_OF_N_AGENTS = frozenset({"best_of_n"})


# --------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------
# Reading and summarising
# --------------------------------------------------------------------------------------------------------
def _check(df: pd.DataFrame, required: Sequence[str], numeric: Sequence[str], where: str) -> None:
    """Raise DataError naming every required column `df` lacks, or a numeric column holding text."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{where} lacks required column(s) {', '.join(map(repr, missing))}; "
            f"columns present: {', '.join(map(repr, df.columns)) or '(none)'}"
        )
    for column in numeric:
        if column in df.columns and not pd.api.types.is_numeric_dtype(df[column]):
            bad = df[column][pd.to_numeric(df[column], errors="coerce").isna() & df[column].notna()]
            raise DataError(
                f"{where}: column {column!r} must be numeric; data row {bad.index[0] + 1} holds {bad.iloc[0]!r}"
            )


def _read(path: str | Path, required: Sequence[str], numeric: Sequence[str]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `rlhf-gym sweep` first (it writes {path.name})")
    try:
        df = pd.read_csv(path, dtype={"cell": str, "agent": str})
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty: not even a header line") from None
    _check(df, required, numeric, str(path))
    if df.empty:
        raise DataError(f"{path} holds a header but no rows: no cell has finished yet")
    return df


def read_results(path: str | Path) -> pd.DataFrame:
    """Read a sweep's results.csv and check its columns (raises FileNotFoundError / DataError, naming path)."""
    return _read(path, RESULTS_REQUIRED, (*METRICS, *REF_METRICS, "seed"))


def read_curves(path: str | Path) -> pd.DataFrame:
    """Read a sweep's curves.csv and check its columns (raises FileNotFoundError / DataError, naming path)."""
    return _read(path, CURVES_REQUIRED, (*CURVE_METRICS, "iteration", "seed"))


def config_columns(df: pd.DataFrame) -> list[str]:
    """The columns naming a configuration: agent, beta, then the swept fields, in file order."""
    rest = [c for c in df.columns if c not in _NOT_CONFIG and c not in ("agent", "beta")]
    return [c for c in ("agent", "beta") if c in df.columns] + rest


def _sorted(df: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    return df.sort_values(list(by), na_position="last", kind="stable").reset_index(drop=True)


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% CI half-width over seeds of every metric, one row per configuration.

    Args:
        results: The rows of results.csv (see the module docstring for the contract).

    Returns:
        One row per configuration, sorted by agent then the swept values: the configuration columns,
        `seeds` (the rows averaged), then `<metric>_mean` and `<metric>_ci` for each metric present (and for
        pi_ref's `ref_*` metrics). A metric's NaN values (a task without gold) are left out of its mean;
        the CI is NaN with fewer than two finite values.

    Raises:
        DataError: A required column is missing, or a configuration has the same seed twice (a cell written
            twice, or a swept field missing from the file: either way its CI would be wrong).
    """
    _check(results, RESULTS_REQUIRED, (*METRICS, *REF_METRICS), "results")
    config = config_columns(results)
    metrics = [m for m in (*METRICS, *REF_METRICS) if m in results.columns]
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
            row[f"{m}_mean"], row[f"{m}_ci"], _ = mean_ci(group[m].to_numpy(dtype=float))
        rows.append(row)
    columns = [*config, "seeds", *(f"{m}_{s}" for m in metrics for s in ("mean", "ci"))]
    return _sorted(pd.DataFrame(rows, columns=columns), config)


def _summary_config(summary: pd.DataFrame) -> list[str]:
    stats = {f"{m}_{s}" for m in (*METRICS, *REF_METRICS) for s in ("mean", "ci")}
    return [c for c in summary.columns if c not in stats and c != "seeds"]


def _reference(summary: pd.DataFrame, metric: str) -> tuple[float, float]:
    """pi_ref's (mean, CI) of `metric` ("gold_reward"/"proxy_reward") from a summary; NaNs when absent.

    pi_ref is the same for every cell, so configurations agree; a zero CI (one evaluation copied to every
    row) is reported as NaN: there is no spread over seeds to show.
    """
    mean_col, ci_col = f"ref_{metric}_mean", f"ref_{metric}_ci"
    if mean_col not in summary.columns or not summary[mean_col].notna().any():
        return math.nan, math.nan
    ci = float(np.nanmean(summary[ci_col])) if summary[ci_col].notna().any() else math.nan
    mean = float(np.nanmean(summary[mean_col]))
    return mean, ci if ci > 1e-9 * max(
        1.0, abs(mean)
    ) else math.nan  # float noise of equal values is not spread


# --------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------
def _cell(mean: float, ci: float, spec: str) -> str:
    """Format a table entry: "0.412 ± 0.031", the mean alone without a CI, "n/a" without a mean."""
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:{spec}}" if not np.isfinite(ci) else f"{mean:{spec}} ± {ci:{spec}}"


def _value(value: object) -> str:
    """A configuration value: floats as %g (so an `n` stored as 4.0 reads 4), NaN as blank."""
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else f"{value:g}"
    return str(value)


def markdown_table(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table: configuration, seeds, then "mean ± CI" for gold, proxy, KL, ...

    Rows keep the summary's order (agent, then swept values); pi_ref comes first when the sweep recorded it.
    """
    config = _summary_config(summary)
    shown = [(m, h, s) for m, h, s in _TABLE_METRICS if f"{m}_mean" in summary.columns]
    header = [*config, "seeds", *(h for _, h, _ in shown)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] * len(config) + ["---:"] * (len(header) - len(config))) + "|",
    ]
    ref = {m: _reference(summary, m) for m in ("gold_reward", "proxy_reward")}
    if any(np.isfinite(mean) for mean, _ in ref.values()):
        cells = ["pi_ref", *[""] * (len(config) - 1), ""]
        for m, _, spec in shown:
            cells.append(_cell(*ref[m], spec) if m in ref else f"{0:{spec}}" if m == "kl" else "")
        lines.append("| " + " | ".join(cells) + " |")
    for values in summary.to_dict("records"):
        cells = [_value(values[c]) for c in config] + [str(values["seeds"])]
        cells += [_cell(values[f"{m}_mean"], values[f"{m}_ci"], spec) for m, _, spec in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# Over-optimisation fits (Gao, Schulman & Hilton 2022)
# --------------------------------------------------------------------------------------------------------
def _basis(d: np.ndarray, kind: str) -> np.ndarray:
    """Columns multiplying (a, b): R = a d - b d^2 (best-of-n) or R = a d - b d log d (RL)."""
    if kind == "bon":
        return np.column_stack([d, -d * d])
    if kind == "rl":
        return np.column_stack([d, -d * np.log(d)])
    raise ValueError(f"kind must be 'bon' (best-of-n) or 'rl', got {kind!r}")


def fit_gao(
    d: Sequence[float] | np.ndarray, r: Sequence[float] | np.ndarray, kind: str
) -> tuple[float, float]:
    """Least-squares (a, b) of Gao et al.'s gold-gain curve: `R_bon(d) = d (a - b d)`, `R_rl(d) = d (a - b log d)`.

    Args:
        d: sqrt(KL(pi || pi_ref)) per point; non-finite and d <= 0 points are dropped (they carry no
            information: both forms are 0 at d = 0).
        r: Gold reward gained over pi_ref per point (same shape as `d`); non-finite points are dropped.
        kind: "bon" or "rl".

    Returns:
        (a, b). b > 0 means the curve turns over: optimising the proxy further loses gold reward.

    Raises:
        ValueError: Unknown `kind`, shapes differ, or fewer than 3 distinct d > 0 (a two-parameter fit
            through two points would match any data and say nothing).
    """
    d, r = np.asarray(d, dtype=float).ravel(), np.asarray(r, dtype=float).ravel()
    if d.shape != r.shape:
        raise ValueError(f"d and r must have the same number of points, got {d.size} and {r.size}")
    _basis(np.ones(1), kind)  # validates kind before the data
    keep = np.isfinite(d) & np.isfinite(r) & (d > 0)
    d, r = d[keep], r[keep]
    if np.unique(d).size < 3:
        raise ValueError(
            f"fitting R_{kind}(d) needs at least 3 distinct d > 0 points, got {np.unique(d).size}"
        )
    (a, b), *_ = np.linalg.lstsq(_basis(d, kind), r, rcond=None)
    return float(a), float(b)


@dataclass(frozen=True, eq=False)
class GaoFit:
    """One agent's gold-gain curve against d = sqrt(KL), and the points it was fitted to."""

    agent: str
    kind: str  # "bon" (best-of-n form) or "rl"
    a: float  # NaN when not fitted (see `note`)
    b: float
    source: str  # where the points came from: "results.csv" (one per cell) or "curves.csv" (per iteration)
    d: np.ndarray = field(repr=False)  # (P,) sqrt(KL) of every point
    gain: np.ndarray = field(repr=False)  # (P,) gold - pi_ref's gold (or raw gold when pi_ref's is unknown)
    note: str = ""  # why there is no fit, or "" when there is one

    @property
    def fitted(self) -> bool:
        return math.isfinite(self.a) and math.isfinite(self.b)

    def predict(self, d: np.ndarray | float) -> np.ndarray:
        """R(d) of the fitted form (0 at d = 0)."""
        d = np.asarray(d, dtype=float)
        safe = np.where(d > 0, d, 1.0)
        return np.where(d > 0, _basis(safe.ravel(), self.kind) @ np.array([self.a, self.b]), 0.0).reshape(
            d.shape
        )

    @property
    def d_peak(self) -> float:
        """Where the fitted gain peaks (dR/dd = 0): a / 2b for best-of-n, exp(a/b - 1) for RL; inf if b <= 0."""
        if not self.fitted or self.b <= 0:
            return math.inf
        return self.a / (2 * self.b) if self.kind == "bon" else math.exp(min(self.a / self.b - 1, 700))

    @property
    def d_max(self) -> float:
        finite = self.d[np.isfinite(self.d) & np.isfinite(self.gain)]
        return float(finite.max()) if finite.size else math.nan


def _is_best_of_n(agent: str) -> bool:
    return agent in BEST_OF_N_AGENTS or agent.startswith("best_of_n")


def _reference_gold(results: pd.DataFrame, curves: pd.DataFrame | None) -> tuple[float, str]:
    """pi_ref's gold and where it came from: the `ref_gold_reward` column, else curves' iteration 0."""
    if "ref_gold_reward" in results.columns and results["ref_gold_reward"].notna().any():
        return float(results["ref_gold_reward"].mean()), "ref_gold_reward"
    if curves is not None:
        start = curves.loc[curves["iteration"] == 0, "gold_reward"]
        if start.notna().any():
            return float(start.mean()), "iteration 0 of curves.csv"
    return math.nan, ""


def gao_fits(results: pd.DataFrame, curves: pd.DataFrame | None = None) -> dict[str, GaoFit]:
    """Fit Gao et al.'s form to each agent's gold gain against d = sqrt(KL).

    Best-of-n agents use one point per cell of results.csv (their KL is the analytic one); RL agents use
    every iteration of curves.csv pooled over seeds and configurations (their path through KL), or their
    cells when there are no curves. The gain is gold minus pi_ref's gold (`ref_gold_reward`, else the mean
    gold at iteration 0 of the curves); without either there is no gain to fit and `note` says so.
    """
    ref_gold, _ = _reference_gold(results, curves)
    fits = {}
    for agent in sorted(results["agent"].unique()):
        kind = "bon" if _is_best_of_n(agent) else "rl"
        rows, source = results[results["agent"] == agent], "results.csv"
        if kind == "rl" and curves is not None and (curves["agent"] == agent).any():
            rows, source = curves[curves["agent"] == agent], "curves.csv"
        d = np.sqrt(np.clip(rows["kl"].to_numpy(dtype=float), 0, None))  # a k1 estimate can dip below 0
        gold = rows["gold_reward"].to_numpy(dtype=float)
        a = b = math.nan
        if not np.isfinite(gold).any():
            note = "no gold reward"
        elif not math.isfinite(ref_gold):
            note = "no pi_ref gold (ref_gold_reward, or iteration 0 in curves.csv) to measure the gain from"
        else:
            try:
                a, b = fit_gao(d, gold - ref_gold, kind)
                note = ""
            except ValueError as e:
                note = str(e)
        gain = gold - ref_gold if math.isfinite(ref_gold) else gold
        fits[agent] = GaoFit(agent, kind, a, b, source, d, gain, note)
    return fits


# --------------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API on an Agg canvas: no pyplot, no global backend, no figure left open)
# --------------------------------------------------------------------------------------------------------
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")
_LINESTYLES = ("-", "--", ":", "-.")


def _figure(ncols: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * ncols, 4.5), layout="constrained")
    return fig, fig.subplots(1, ncols)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def _agent_styles(agents: Iterable[str]) -> dict[str, tuple[tuple[float, ...], str]]:
    """A colour and marker per agent, fixed by sorted name so the same agent looks the same in every plot."""
    from matplotlib import colormaps

    colours = colormaps["tab10"].colors
    return {
        agent: (colours[i % len(colours)], _MARKERS[i % len(_MARKERS)])
        for i, agent in enumerate(sorted(set(agents)))
    }


def _err(ci: pd.Series) -> np.ndarray:
    return np.nan_to_num(ci.to_numpy(dtype=float), nan=0.0)


def _n_from_kl(kl: float) -> float:
    """Invert best-of-n's KL = log n - (n-1)/n (increasing in n) by bisection on log n; NaN for bad input."""
    if not math.isfinite(kl) or kl < 0:
        return math.nan
    lo, hi = 0.0, 50.0  # log n
    for _ in range(100):
        mid = (lo + hi) / 2
        n = math.exp(mid)
        lo, hi = (mid, hi) if math.log(n) - (n - 1) / n < kl else (lo, mid)
    return math.exp(lo)


def _best_of_n_labels(rows: pd.DataFrame) -> list[str]:
    """Labels "n=4" per configuration: from a swept `n` / `*.n` column, else by inverting the analytic KL."""
    column = next((c for c in rows.columns if c.split(".")[-1] == "n" and rows[c].notna().all()), None)
    values = rows[column] if column else rows["kl_mean"].map(_n_from_kl)
    return [f"n={v:.0f}" if math.isfinite(v) else "" for v in values.astype(float)]


def _legend(ax, fontsize: str) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty legend() only warns
        ax.legend(fontsize=fontsize)


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def plot_frontier(results: pd.DataFrame, path: str | Path) -> Path:
    """Gold (left) and proxy (right) reward against KL to pi_ref, one colour and marker per agent.

    Points are configuration means with 95% CI bars in both directions; an agent's configurations are
    joined in order of KL; pi_ref is the black star at KL = 0; best-of-n points carry their n.
    """
    summary = summarise(results)
    fig, axes = _figure(2)
    styles = _agent_styles(summary["agent"])
    for ax, metric, label in (
        (axes[0], "gold_reward", "gold reward"),
        (axes[1], "proxy_reward", "proxy reward (reward model)"),
    ):
        for agent, rows in summary.groupby("agent", sort=True):
            rows = rows.sort_values("kl_mean")
            colour, marker = styles[agent]
            x, y = rows["kl_mean"].to_numpy(dtype=float), rows[f"{metric}_mean"].to_numpy(dtype=float)
            ax.errorbar(
                x, y, xerr=_err(rows["kl_ci"]), yerr=_err(rows[f"{metric}_ci"]), color=colour, marker=marker,
                linestyle="-", capsize=3, label=agent,
            )  # fmt: skip
            if _is_best_of_n(agent):
                for xi, yi, text in zip(x, y, _best_of_n_labels(rows), strict=True):
                    ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(5, -12), fontsize=8)
        ref, ref_ci = _reference(summary, metric)
        if math.isfinite(ref):
            ax.axhline(ref, color="0.6", linewidth=0.8, linestyle=":")
            ax.errorbar(
                [0.0], [ref], yerr=[0.0 if math.isnan(ref_ci) else ref_ci], color="black", marker="*",
                markersize=13, linestyle="none", capsize=3, label="pi_ref",
            )  # fmt: skip
        if not summary[f"{metric}_mean"].notna().any():
            _no_data(ax, f"no {label} in this sweep")
        ax.set_xlabel("KL(pi || pi_ref) (nats)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    _legend(axes[1], "small")
    fig.suptitle("Reward against KL to pi_ref: mean over seeds with 95% CI")
    return _save(fig, path)


def _config_label(config: Mapping[str, object]) -> str:
    parts = [str(config["agent"])]
    if "beta" in config and _value(config["beta"]):
        parts.append(f"β={_value(config['beta'])}")
    parts += [f"{k}={_value(v)}" for k, v in config.items() if k not in ("agent", "beta") and _value(v)]
    return " ".join(parts)


def _by_iteration(group: pd.DataFrame, x: str, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (mean over seeds), and the metric's mean and CI over seeds, per iteration."""
    rows = [
        (float(g[x].mean()), *mean_ci(g[metric].to_numpy(dtype=float))[:2])
        for _, g in group.groupby("iteration", sort=True)
    ]
    xs, means, cis = (np.array(v, dtype=float) for v in zip(*rows, strict=True))
    return xs, means, cis


def plot_learning_curves(curves: pd.DataFrame, path: str | Path, x: str = "iteration") -> Path:
    """Proxy (left) and gold (right) reward per iteration: mean over seeds, 95% CI band, per configuration.

    A configuration is (agent, beta) plus any other swept field; colour is the agent's, line style tells
    an agent's configurations apart. `x` is "iteration" or "tokens" (mean over seeds at each iteration).
    """
    _check(curves, CURVES_REQUIRED, CURVE_METRICS, "curves")
    if x not in ("iteration", "tokens"):
        raise ValueError(f"x must be 'iteration' or 'tokens', got {x!r}")
    if x not in curves.columns:
        raise DataError(f"curves lacks column {x!r} for the x axis")
    fig, axes = _figure(2)
    styles = _agent_styles(curves["agent"])
    config = config_columns(curves)
    seen: dict[str, int] = {}
    for key, group in curves.groupby(config, dropna=False, sort=True):
        cfg = dict(zip(config, key, strict=True))
        colour, _ = styles[cfg["agent"]]
        linestyle = _LINESTYLES[seen.setdefault(cfg["agent"], 0) % len(_LINESTYLES)]
        seen[cfg["agent"]] += 1
        for ax, metric in zip(axes, ("proxy_reward", "gold_reward"), strict=True):
            xs, mean, ci = _by_iteration(group, x, metric)
            ax.plot(xs, mean, color=colour, linestyle=linestyle, label=_config_label(cfg))
            ax.fill_between(xs, mean - ci, mean + ci, color=colour, alpha=0.15, linewidth=0)
    for ax, label in zip(axes, ("proxy reward (reward model)", "gold reward"), strict=True):
        ax.set_xlabel("tokens generated" if x == "tokens" else "iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if not curves["gold_reward"].notna().any():
        _no_data(axes[1], "no gold reward in this sweep")
    _legend(axes[0], "x-small")
    fig.suptitle("Learning curves: mean over seeds with 95% CI band")
    return _save(fig, path)


def plot_overoptimisation(results: pd.DataFrame, curves: pd.DataFrame | None, path: str | Path) -> Path:
    """Where optimising the proxy stops paying on gold (Gao, Schulman & Hilton 2022, arXiv:2210.10760).

    Left: gold against proxy reward, along each RL configuration's curve (mean over seeds per iteration)
    or through the configuration means (best-of-n, or no curves); a ring marks each agent's best gold.
    Right: gold gained over pi_ref against d = sqrt(KL), every point, with the fitted Gao form and its
    peak d* (dotted line) when the fit exists. `curves` may be None.
    """
    summary = summarise(results)
    fits = gao_fits(results, curves)
    fig, (ax_proxy, ax_d) = _figure(2)
    styles = _agent_styles(summary["agent"])
    config = config_columns(curves) if curves is not None else []
    for agent, fit in fits.items():
        colour, marker = styles[agent]
        paths = []  # (proxy, gold) arrays, one per line drawn
        if fit.source == "curves.csv":
            for _, group in curves[curves["agent"] == agent].groupby(config, dropna=False, sort=True):
                proxy = _by_iteration(group, "iteration", "proxy_reward")[1]
                paths.append((proxy, _by_iteration(group, "iteration", "gold_reward")[1]))
        else:
            rows = summary[summary["agent"] == agent].sort_values("kl_mean")
            paths.append(
                (rows["proxy_reward_mean"].to_numpy(float), rows["gold_reward_mean"].to_numpy(float))
            )
        for i, (proxy, gold) in enumerate(paths):
            ax_proxy.plot(
                proxy, gold, color=colour, marker=marker, markersize=4, label=agent if i == 0 else None
            )
        proxy, gold = (np.concatenate(v) for v in zip(*paths, strict=True))
        if np.isfinite(gold).any():
            best = int(np.nanargmax(gold))
            ax_proxy.plot(proxy[best], gold[best], "o", markersize=14, markerfacecolor="none", color=colour)

        ax_d.scatter(fit.d, fit.gain, color=colour, marker=marker, s=12, alpha=0.4)
        if fit.fitted:
            top = max(fit.d_max, min(fit.d_peak, 2 * fit.d_max)) * 1.05
            grid = np.linspace(0, top, 200)
            term = "d" if fit.kind == "bon" else "log d"
            label = f"{agent}: d ({fit.a:.3g} - {fit.b:.3g} {term})"
            ax_d.plot(grid, fit.predict(grid), color=colour, label=label)
            if math.isfinite(fit.d_peak) and fit.d_peak <= top:
                ax_d.axvline(fit.d_peak, color=colour, linestyle=":", linewidth=1)
    ref_gold, _ = _reference_gold(results, curves)
    ref_proxy, _ = _reference(summary, "proxy_reward")
    if math.isfinite(ref_gold):
        ax_d.plot([0.0], [0.0], "*", color="black", markersize=13, label="pi_ref")
        if math.isfinite(ref_proxy):
            ax_proxy.plot([ref_proxy], [ref_gold], "*", color="black", markersize=13, label="pi_ref")
    if not results["gold_reward"].notna().any():
        for ax in (ax_proxy, ax_d):
            _no_data(ax, "no gold reward in this sweep")
    ax_proxy.set_xlabel("proxy reward (reward model)")
    ax_proxy.set_ylabel("gold reward")
    ax_d.set_xlabel("d = sqrt(KL(pi || pi_ref))")
    ax_d.set_ylabel("gold reward - pi_ref's" if math.isfinite(ref_gold) else "gold reward (pi_ref's unknown)")
    for ax in (ax_proxy, ax_d):
        ax.grid(alpha=0.3)
        _legend(ax, "x-small")
    fig.suptitle("Over-optimisation: gold against proxy and against d (Gao, Schulman & Hilton 2022)")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------
def _fits_table(fits: Mapping[str, GaoFit]) -> str:
    lines = [
        "| agent | form | a | b | points | source | peak d* | KL at peak | gold gain at peak | note |",
        "|:---|:---|---:|---:|---:|:---|---:|---:|---:|:---|",
    ]
    for fit in fits.values():
        form = "d (a - b d)" if fit.kind == "bon" else "d (a - b log d)"
        points = int((np.isfinite(fit.d) & np.isfinite(fit.gain) & (fit.d > 0)).sum())
        if not fit.fitted:
            lines.append(f"| {fit.agent} | {form} | | | {points} | {fit.source} | | | | {fit.note} |")
            continue
        peak, note = fit.d_peak, ""
        if math.isinf(peak):
            cells = ["none", "", ""]
            note = "b <= 0: gold still rising, no over-optimisation seen"
        else:
            cells = [f"{peak:.3f}", f"{peak**2:.3f}", f"{float(fit.predict(peak)):.3f}"]
            if peak > fit.d_max:
                note = f"peak extrapolated beyond the data (d <= {fit.d_max:.3f})"
        lines.append(
            f"| {fit.agent} | {form} | {fit.a:.4f} | {fit.b:.4f} | {points} | {fit.source} | "
            + " | ".join(cells)
            + f" | {note} |"
        )
    return "\n".join(lines) + "\n"


def make_report(run_dir: str | Path) -> dict[str, Path]:
    """Write report.md, frontier.png, learning_curves.png and overoptimisation.png into `run_dir`.

    Reads `run_dir/results.csv` and, when present, `run_dir/curves.csv` (without it the learning curves
    are skipped, RL over-optimisation points are the cells' final values, and report.md says so).

    Returns:
        The paths written, by name: "report", "frontier", "learning_curves" (when curves exist),
        "overoptimisation".

    Raises:
        FileNotFoundError: No results.csv (the message names it and says to run `rlhf-gym sweep`).
        DataError: A required column is missing (named) or a metric is not numeric.
    """
    run_dir = Path(run_dir)
    results = read_results(run_dir / "results.csv")
    curves_path = run_dir / "curves.csv"
    curves = read_curves(curves_path) if curves_path.is_file() else None
    summary = summarise(results)
    notes = []
    paths = {"frontier": plot_frontier(results, run_dir / "frontier.png")}
    if curves is not None:
        paths["learning_curves"] = plot_learning_curves(curves, run_dir / "learning_curves.png")
    else:
        notes.append(
            "No curves.csv: learning curves skipped, and RL over-optimisation fits use each cell's final "
            "values only."
        )
    paths["overoptimisation"] = plot_overoptimisation(results, curves, run_dir / "overoptimisation.png")
    fits = gao_fits(results, curves)
    ref_gold, ref_source = _reference_gold(results, curves)

    text = [
        f"# Sweep report: {run_dir.name}",
        "",
        f"{len(results)} cells, {len(summary)} configurations, from `results.csv`"
        + (f" and `curves.csv` ({len(curves)} rows)." if curves is not None else "."),
        "Each entry is the mean over seeds ± the half-width of its 95% confidence interval "
        "(Student t with seeds - 1 degrees of freedom); no ± means a single seed. "
        "Best-of-n's KL is the analytic log n - (n-1)/n.",
        "",
        markdown_table(summary),
        "## Plots",
        "",
        "- [frontier.png](frontier.png): gold and proxy reward against KL to pi_ref.",
    ]
    if "learning_curves" in paths:
        text.append("- [learning_curves.png](learning_curves.png): proxy and gold reward per iteration.")
    text += [
        "- [overoptimisation.png](overoptimisation.png): gold against proxy, and gold gain against sqrt(KL).",
        "",
        "![frontier](frontier.png)",
        "",
        *(["![learning curves](learning_curves.png)", ""] if "learning_curves" in paths else []),
        "![over-optimisation](overoptimisation.png)",
        "",
        "## Over-optimisation fits (Gao, Schulman & Hilton 2022)",
        "",
        "Gold gain R = gold - gold(pi_ref) against d = sqrt(KL), fitted by least squares to "
        "R_bon(d) = d (a - b d) for best-of-n and R_rl(d) = d (a - b log d) for RL agents "
        "(arXiv:2210.10760). b > 0: the gain peaks at d* and optimising the proxy further costs gold."
        + (f" pi_ref's gold ({ref_gold:.4f}) is from {ref_source}." if ref_source else ""),
        "",
        _fits_table(fits),
    ]
    if notes:
        text += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    report = run_dir / "report.md"
    atomic_write(report, "\n".join(text))
    return {"report": report, **paths}


def add_report_command(sub: argparse._SubParsersAction) -> None:
    """Install `rlhf-gym report RUN_DIR`: write the report, print the table and the files written."""
    p = sub.add_parser("report", help="tables and plots of a finished sweep (reads runs/NAME/results.csv)")
    p.add_argument("run_dir", help="the sweep's folder, e.g. runs/NAME")

    def run(args: argparse.Namespace) -> int:
        try:
            paths = make_report(args.run_dir)
        except (FileNotFoundError, DataError) as e:
            print(f"rlhf-gym report: error: {e}", file=sys.stderr)
            return 1
        print(markdown_table(summarise(read_results(Path(args.run_dir) / "results.csv"))))
        for name, path in paths.items():
            print(f"{name}: {path}")
        return 0

    p.set_defaults(handler=run)
