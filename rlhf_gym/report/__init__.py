"""Sweep reports: mean ± 95% confidence interval over seeds, reward-vs-KL frontiers and over-optimisation fits.

Everything here is computed from the two CSV files a sweep writes, never from checkpoints, so a report can be
rebuilt anywhere and by anyone who has the run folder. The package is split by job:

- `schema`: the columns of results.csv and curves.csv, defined once (the sweep writes with it), the
  reader, and which agents learn nothing (their own `learns` declaration, never their name).
- `stats`: Student t intervals over seeds, the summary and its Markdown table.
- `gao`: Gao, Schulman & Hilton's (2022) over-optimisation fits.
- `plots`: the frontier, learning curves and over-optimisation plots.

This module writes the report from them (`make_report`, `rlhf-gym report`) and re-exports their public
names, so `from rlhf_gym.report import summarise` works as it did when the report was one file.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from rlhf_base.deprecation import moved_names
from rlhf_base.io import atomic_write
from rlhf_gym.report.gao import MIN_LEVELS, MIN_POINTS, GaoFit, fit_gao, fits_table, gao_fits, reference_gold
from rlhf_gym.report.plots import plot_frontier, plot_learning_curves, plot_overoptimisation
from rlhf_gym.report.schema import (
    CURVE_METRICS,
    OLD_NAMES,
    REF_METRICS,
    RESULT_METRICS,
    OldColumnsWarning,
    config_columns,
    gold_coverage,
    old_names_message,
    read_curves,
    read_results,
    read_table,
    sampling_agents,
)
from rlhf_gym.report.stats import (
    markdown_table,
    mean_ci,
    non_finite_cells,
    non_finite_message,
    summarise,
    t_quantile_975,
)

__all__ = [
    "CURVE_METRICS",
    "METRICS",
    "OLD_NAMES",
    "REF_METRICS",
    "RESULT_METRICS",
    "GaoFit",
    "OldColumnsWarning",
    "config_columns",
    "fit_gao",
    "gao_fits",
    "gold_coverage",
    "make_report",
    "markdown_table",
    "mean_ci",
    "non_finite_cells",
    "non_finite_message",
    "plot_frontier",
    "plot_learning_curves",
    "plot_overoptimisation",
    "read_curves",
    "read_results",
    "sampling_agents",
    "summarise",
    "t_quantile_975",
]

#: Per-cell metrics of results.csv: `schema.RESULT_METRICS` under the name this module gave it before the split.
METRICS = RESULT_METRICS


def _sampling_note(results: pd.DataFrame, sampling: list[str]) -> str:
    """What the KL of the agents that learn nothing is: an estimate with its upper bound, or (run folders
    written before the estimate) the bound alone."""
    if not sampling:
        return ""
    rows = results[results["agent"].isin(sampling)]
    head = f" {', '.join(sampling)} learn nothing (`learns = False`): their KL is that of the response they select"
    if "kl_bound" in rows.columns and rows["kl_bound"].notna().any():
        return (
            f"{head}, estimated from their samples (the exact best-of-n KL over the distinct completions "
            "drawn, at their probabilities under the sampling policy; Beirami et al. 2024, arXiv:2401.01879). "
            "KL upper bound is the analytic log n - (n-1)/n: the true KL never exceeds it, and comes near it "
            "only when the policy rarely repeats a completion."
        )
    return (
        f"{head}; no KL upper bound is recorded (best-of-n's `kl` in run folders written before its estimate "
        "is the analytic log n - (n-1)/n: an upper bound on that KL, not an estimate; Beirami et al. 2024, "
        "arXiv:2401.01879)."
    )


def _gold_note(results: pd.DataFrame) -> str:
    """What report.md says about gold reward when some or all cells lack it ("" when every cell has it)."""
    have, total = gold_coverage(results)
    if have == 0:
        return (
            "**No gold reward in this sweep**: `gold_score` is empty (NaN) in every row of results.csv, as "
            'the env writes it for a task without a gold reward. The gold column reads "no gold", the '
            "plots show proxy reward (`rm_score`) only, and there is no over-optimisation plot or fit (both "
            "measure gold reward). Proxy reward against KL is still reported, but a proxy gain cannot be "
            "told from reward hacking without gold."
        )
    if have < total:
        return (
            f"**Gold reward in {have} of {total} cells only**: the other cells' `gold_score` is NaN. Gold "
            'means are over the cells that have it, and the table says "(k of n seeds)" where a '
            "configuration's mean rests on some of its seeds only; gold panels say how many cells they show."
        )
    return ""


def _fits_section(fits: dict[str, GaoFit], ref_gold: float, ref_source: str) -> list[str]:
    """The over-optimisation section of report.md: the form, the table, each fit's caveats as a list."""
    caveats = [f"- {fit.agent} ({fit.form}): {c}." for fit in fits.values() for c in fit.caveats]
    return [
        "## Over-optimisation fits (Gao, Schulman & Hilton 2022)",
        "",
        "Gold gain R = gold - gold(pi_ref) against d = sqrt(KL), fitted by least squares to "
        "R_bon(d) = d (a - b d) for agents that learn nothing (best-of-n) and R_rl(d) = d (a - b log d) "
        "for agents that learn "
        "(arXiv:2210.10760). b > 0: the gain peaks at d* and optimising the proxy further costs gold."
        + (f" pi_ref's gold ({ref_gold:.4f}) is from {ref_source}." if ref_source else "")
        + f" A fit on fewer than {MIN_POINTS} points or {MIN_LEVELS} distinct KL levels is indicative only, "
        "and a peak outside the range of d fitted is an extrapolation; the plot draws each fit over its "
        "data only.",
        "",
        fits_table(fits),
        *(["Read with care:", "", *caveats, ""] if caveats else []),
    ]


def make_report(run_dir: str | Path) -> dict[str, Path]:
    """Write report.md, frontier.png, learning_curves.png and overoptimisation.png into `run_dir`.

    Reads `run_dir/results.csv` and, when present, `run_dir/curves.csv` (without it the learning curves
    are skipped, RL over-optimisation points are the cells' final values, and report.md says so).

    A sweep without gold reward (`gold_score` NaN in every row: a task with no gold) gets a report of
    proxy reward against KL, "no gold" in the table, and no over-optimisation plot or fits (report.md says
    so at the top); one with gold in some cells only says how many. Non-finite values (an inf, or a NaN
    where the metric may not be missing: `stats.MAY_BE_MISSING`) are left out of the means and named at the
    top, their entries marked † with a footnote (`stats.non_finite_cells`).

    Returns:
        The paths written, by name: "report", "frontier", "learning_curves" (when curves exist),
        "overoptimisation" (when some cell has gold).

    Raises:
        FileNotFoundError: No results.csv (the message names it and says to run `rlhf-gym sweep`).
        DataError: A required column is missing (named) or a metric is not numeric.
    """
    run_dir = Path(run_dir)
    results, renamed = read_table(run_dir / "results.csv", "results")
    notes = [old_names_message("results.csv", renamed)] if renamed else []
    curves_path, curves = run_dir / "curves.csv", None
    if curves_path.is_file():
        curves, renamed = read_table(curves_path, "curves")
        notes += [old_names_message("curves.csv", renamed)] if renamed else []
    summary = summarise(results)
    sampling = sorted(sampling_agents(results))
    has_gold = gold_coverage(results)[0] > 0
    paths = {"frontier": plot_frontier(results, run_dir / "frontier.png")}
    if curves is not None:
        paths["learning_curves"] = plot_learning_curves(
            curves, run_dir / "learning_curves.png", sampling=sampling
        )
    else:
        notes.append(
            "No curves.csv: learning curves skipped"
            + (", and RL over-optimisation fits use each cell's final values only." if has_gold else ".")
        )
    if has_gold:
        paths["overoptimisation"] = plot_overoptimisation(results, curves, run_dir / "overoptimisation.png")
    gold_note = _gold_note(results)
    non_finite = non_finite_message(results)

    text = [
        f"# Sweep report: {run_dir.name}",
        "",
        f"{len(results)} cells, {len(summary)} configurations, from `results.csv`"
        + (f" and `curves.csv` ({len(curves)} rows)." if curves is not None else "."),
        *(["", gold_note, ""] if gold_note else []),
        *(["", f"**Non-finite values**: {non_finite}.", ""] if non_finite else []),
        "Each entry is the mean over seeds ± the half-width of its 95% confidence interval "
        "(Student t with seeds - 1 degrees of freedom); no ± means a single seed; `mean [low, high]` is an "
        "interval clipped at a bound the metric cannot cross (KL, length and time are never negative). "
        "gold is `gold_score`, proxy is `rm_score` (the reward model's score)."
        + _sampling_note(results, sampling),
        "",
        markdown_table(summary),
        "## Plots",
        "",
        "- [frontier.png](frontier.png): "
        + (
            "gold and proxy reward against KL to pi_ref."
            if has_gold
            else "proxy reward against KL to pi_ref (no gold)."
        ),
    ]
    if "learning_curves" in paths:
        text.append(
            "- [learning_curves.png](learning_curves.png): "
            + ("proxy and gold reward per iteration" if has_gold else "proxy reward per iteration (no gold)")
            + (
                f"; {', '.join(sampling)}, which learn nothing, as a level (mean over iterations and seeds, "
                "with its CI band) across the axis."
                if sampling
                else "."
            )
        )
    if has_gold:
        text.append(
            "- [overoptimisation.png](overoptimisation.png): gold against proxy, and gold gain against sqrt(KL)."
        )
    text += [
        "",
        "![frontier](frontier.png)",
        "",
        *(["![learning curves](learning_curves.png)", ""] if "learning_curves" in paths else []),
        *(["![over-optimisation](overoptimisation.png)", ""] if has_gold else []),
    ]
    if has_gold:
        ref_gold, ref_source = reference_gold(results, curves)
        text += _fits_section(gao_fits(results, curves), ref_gold, ref_source)
    else:
        text += [
            "## Over-optimisation fits (Gao, Schulman & Hilton 2022)",
            "",
            "None: no gold reward in this sweep (the fits measure gold gained over pi_ref).",
            "",
        ]
    if notes:
        text += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    report = run_dir / "report.md"
    atomic_write(report, "\n".join(text))
    return {"report": report, **paths}


# The command line moved to rlhf_gym.cli (one CLI module); the old names work, with a warning.
__getattr__ = moved_names(__name__, {"add_report_command": "rlhf_gym.cli"})
