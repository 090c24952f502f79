"""What the report's plots and text show at a few seeds, and for a task without gold reward (issue 13).

The plots are checked through matplotlib's objects (line data, error bar segments, legend entries, titles),
never pixels: `_figures` keeps each Figure that `plots._save` would write. Synthetic sweeps are built with
the sweep's own row writers (`schema.result_row`, `curve_rows`, `reference_row`) and csv.DictWriter, as
`rlhf_gym.sweep` writes them, so a NaN gold reaches the report as the env and the sweep write it.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection
from matplotlib.container import ErrorbarContainer
from matplotlib.lines import Line2D

from rlhf_base.io import DataError
from rlhf_base.maths import best_of_n_kl
from rlhf_gym.report import gao_fits, make_report, markdown_table, read_curves, read_results, summarise
from rlhf_gym.report import plots as report_plots
from rlhf_gym.report.gao import MIN_POINTS, GaoFit, fits_table, format_form
from rlhf_gym.report.schema import curve_rows, reference_row, result_row
from rlhf_gym.report.stats import interval

T1 = 12.706204736  # t_{0.975, 1}: 2 seeds


@pytest.fixture()
def figures(monkeypatch) -> list:
    """The figures the plot functions draw, in order, instead of PNG files."""
    drawn: list = []
    monkeypatch.setattr(report_plots, "_save", lambda fig, path: drawn.append(fig) or Path(path))
    return drawn


# --------------------------------------------------------------------------------------------------------
# A synthetic sweep: ppo (learns; 2 betas, 5 iterations) and best_of_n (learns nothing; n = 4, 16, one
# iteration), 2 seeds each, written as the sweep writes them
# --------------------------------------------------------------------------------------------------------
def _gold(agent: str, seed: int, value: float, gold: str) -> float:
    """`gold`: "all" cells have gold, "none" (a task without one: NaN everywhere), "some" (ppo seed 1 lacks it)."""
    if gold == "none" or (gold == "some" and agent == "ppo" and seed == 1):
        return math.nan
    return value


def _metrics(iteration: int, kl: float, rm: float, gold: float) -> dict[str, float]:
    return {
        "iteration": iteration,
        "rm_score": rm,
        "gold_score": gold,
        "kl": kl,
        "reward": rm - 0.05 * kl,
        "length": 20.0,
        "entropy": 2.0,
        "wall_time": 10.0 * iteration,
        "tokens": 1000.0 * iteration,
    }


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)


def _sweep(run_dir: Path, gold: str = "all") -> Path:
    results, curves = [], []
    reference = reference_row(_metrics(0, 0.0, 0.5, _gold("ref", 0, 0.05, gold)))
    for seed in (0, 1):
        for beta in (0.05, 0.1):
            cell = {"cell": f"ppo-b{beta}-s{seed}", "agent": "ppo", "seed": seed, "beta": beta}
            history = []
            for i in range(1, 6):
                kl = i * 0.4 * (1.5 - 5 * beta) + 0.05 * seed
                d = math.sqrt(kl)
                g = _gold("ppo", seed, 0.05 + d * (0.3 - 0.2 * math.log(d)), gold)
                history.append(_metrics(i, kl, 0.5 + 0.1 * i, g))
            results.append(result_row(cell, True, history[-1], history) | reference)
            curves += curve_rows(cell, history)
        for n in (4, 16):
            cell = {"cell": f"bon-n{n}-s{seed}", "agent": "best_of_n", "seed": seed, "beta": 0.05, "n": n}
            kl = best_of_n_kl(n) * (0.8 + 0.1 * seed)
            g = _gold("best_of_n", seed, 0.05 + 0.1 * math.sqrt(kl), gold)
            history = [
                _metrics(1, kl, 0.6 + 0.05 * math.log(n) + 0.01 * seed, g) | {"kl_bound": best_of_n_kl(n)}
            ]
            results.append(result_row(cell, False, history[-1], history) | reference)
            curves += curve_rows(cell, history)
    _write(run_dir / "results.csv", results)
    _write(run_dir / "curves.csv", curves)
    return run_dir


# --------------------------------------------------------------------------------------------------------
# Intervals of bounded metrics: clipped at the bound, in the table and the error bars
# --------------------------------------------------------------------------------------------------------
def test_interval_is_clipped_only_for_metrics_with_a_bound():
    assert interval(0.1, 0.3, "kl") == (0.0, pytest.approx(0.4))
    assert interval(-0.02, 0.01, "kl") == (0.0, 0.0)  # a k1 mean below 0: the KL is not
    assert interval(0.1, 0.3, "gold_score") == (pytest.approx(-0.2), pytest.approx(0.4))  # rewards: no bound
    assert interval(0.1, math.nan, "kl") == (0.1, 0.1)  # one seed


def _noisy_kl_rows() -> pd.DataFrame:
    """Two seeds of one configuration whose KL CI (12.7 * sd / sqrt 2) is far wider than its mean."""
    return pd.DataFrame(
        {"cell": ["a", "b"], "agent": ["ppo"] * 2, "seed": [0, 1], "beta": [0.1] * 2}
        | {"kl": [0.01, 0.21], "rm_score": [1.0, 1.2], "gold_score": [0.0, 0.4]}
    )


def test_kl_intervals_and_error_bars_never_run_below_zero(tmp_path, figures):
    rows = _noisy_kl_rows()
    ci = T1 * np.std([0.01, 0.21], ddof=1) / math.sqrt(2)  # 1.271 > the mean 0.11
    line = markdown_table(summarise(rows)).splitlines()[2]
    assert f"| 0.110 [0.000, {0.11 + ci:.3f}] |" in line  # KL: clipped, printed as an interval
    assert "| 0.200 ± 2.541 |" in line  # gold has no bound: mean ± CI, below 0 as it may be
    report_plots.plot_frontier(rows, tmp_path / "f.png")
    for ax in figures[0].axes:
        (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.get_label() == "ppo"]
        xerr, yerr = (c for c in bars[2] if isinstance(c, LineCollection))  # x bars are drawn first
        ((x_low, _), (x_high, _)) = xerr.get_segments()[0]
        assert (x_low, x_high) == (0.0, pytest.approx(0.11 + ci))
        ((_, y_low), (_, y_high)) = yerr.get_segments()[0]
        metric = [0.0, 0.4] if ax.get_ylabel().startswith("gold") else [1.0, 1.2]
        half = T1 * np.std(metric, ddof=1) / math.sqrt(2)
        assert (y_low, y_high) == (
            pytest.approx(np.mean(metric) - half),
            pytest.approx(np.mean(metric) + half),
        )
        assert y_low < 0 or not ax.get_ylabel().startswith("gold")  # the gold bar is not clipped


# --------------------------------------------------------------------------------------------------------
# Learning curves: every legend entry has something drawn
# --------------------------------------------------------------------------------------------------------
def _drawn(line: Line2D) -> bool:
    """A line shows something: a marker, or a visible line through two or more finite points."""
    xs, ys = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    finite = int((np.isfinite(xs) & np.isfinite(ys)).sum())
    has_marker = line.get_marker() not in ("", " ", "None", None)
    return (finite >= 1 and has_marker) or (finite >= 2 and line.get_linestyle() not in ("None", " ", ""))


def test_every_learning_curve_legend_entry_is_drawn_and_best_of_n_is_a_level(tmp_path, figures):
    curves = read_curves(_sweep(tmp_path) / "curves.csv")
    # a learning configuration with one iteration (a budget of 1) as well: a marker, not an empty line
    one = curves[(curves["agent"] == "ppo") & (curves["beta"] == 0.1) & (curves["iteration"] == 1)]
    curves = pd.concat([curves, one.assign(beta=0.2, cell="ppo-b0.2")])
    report_plots.plot_learning_curves(curves, tmp_path / "lc.png", sampling=["best_of_n"])
    proxy, gold = figures[0].axes
    handles, labels = proxy.get_legend_handles_labels()
    assert [h.get_label() for h in proxy.get_legend().legend_handles] == labels
    assert len(handles) == 5 and all(_drawn(h) for h in handles), labels
    for ax, metric in ((proxy, "rm_score"), (gold, "gold_score")):
        for n in (4, 16):
            (level,) = [ln for ln in ax.lines if ln.get_label() == f"best_of_n β=0.05 n={n} (no learning)"]
            rows = curves[(curves["agent"] == "best_of_n") & (curves["n"] == n)]
            assert list(level.get_xdata()) == [0, 1]  # axes coordinates: across the whole axis
            assert level.get_ydata() == [pytest.approx(rows[metric].mean())] * 2
    single = next(h for h in handles if h.get_label() == "ppo β=0.2")
    assert single.get_marker() not in ("", "None") and len(single.get_xdata()) == 1
    # without `sampling`, the registered class says best_of_n learns nothing (curves.csv has no `learns`)
    report_plots.plot_learning_curves(curves, tmp_path / "lc.png")
    assert sorted(h.get_label() for h in figures[1].axes[0].get_legend_handles_labels()[0]) == sorted(labels)


# --------------------------------------------------------------------------------------------------------
# Gao fits: drawn over their data, formula signs, caveats
# --------------------------------------------------------------------------------------------------------
def test_the_fitted_formula_prints_each_sign_once():
    assert format_form(0.5, 0.2, "bon") == "d (0.5 - 0.2 d)"
    assert format_form(0.5, -0.3, "bon") == "d (0.5 + 0.3 d)"  # was "d (0.5 - -0.3 d)"
    assert format_form(-0.1, 0.25, "rl") == "d (-0.1 - 0.25 log d)"
    assert format_form(0.1, -0.25, "rl") == "d (0.1 + 0.25 log d)"


def _bon_cells(ns: tuple[int, ...], a: float, b: float, seeds: tuple[int, ...] = (0, 1)) -> pd.DataFrame:
    """Best-of-n cells whose gold gain is Gao's best-of-n form d (a - b d) at the analytic KL of each n."""
    rows = []
    for n in ns:
        d = math.sqrt(best_of_n_kl(n))
        for seed in seeds:
            rows.append(
                {"cell": f"bon-{n}-{seed}", "agent": "best_of_n", "seed": seed, "beta": 0.0, "n": n}
                | {"learns": False, "kl": d * d, "rm_score": 1.0, "gold_score": 0.1 + d * (a - b * d)}
                | {"ref_gold_score": 0.1, "ref_rm_score": 0.5}
            )
    return pd.DataFrame(rows)


def _overopt(results: pd.DataFrame, tmp_path: Path, figures: list):
    report_plots.plot_overoptimisation(results, None, tmp_path / "o.png")
    ax_d = figures[-1].axes[1]
    (fit_line,) = [ln for ln in ax_d.lines if ln.get_label().startswith("best_of_n: ")]
    return ax_d, fit_line


def test_a_gao_fit_is_drawn_over_its_data_only_with_its_peak(tmp_path, figures):
    ns = (1, 2, 4, 8, 16, 64)  # n = 1 is d = 0: no information, not fitted
    results = _bon_cells(ns, a=0.5, b=0.2)
    fit = gao_fits(results)["best_of_n"]
    ax_d, line = _overopt(results, tmp_path, figures)
    d = np.sqrt([best_of_n_kl(n) for n in ns[1:]])
    assert (line.get_xdata().min(), line.get_xdata().max()) == (
        pytest.approx(d.min()),
        pytest.approx(d.max()),
    )
    assert line.get_label() == "best_of_n: d (0.5 - 0.2 d)"  # 10 points, 5 levels, peak inside: no caveat
    assert fit.caveats == () and fit.peak_in_data
    (peak,) = [ln for ln in ax_d.lines if ln.get_linestyle() == ":"]
    assert list(peak.get_xdata()) == [pytest.approx(0.5 / (2 * 0.2))] * 2
    assert ax_d.get_xlim()[1] < 1.1 * d.max()  # the axes end near the data, not at 2 d_max


def test_a_fit_on_few_points_or_with_its_peak_outside_the_data_says_so(tmp_path, figures):
    # three n (6 points, 3 KL levels), the gain still rising at the largest: peak a / 2b = 2.5 > d_max 1.3
    results = _bon_cells((2, 4, 16), a=1.0, b=0.2)
    fit = gao_fits(results)["best_of_n"]
    assert (fit.points, fit.levels) == (6, 3) and fit.points < MIN_POINTS
    assert fit.caveats[0] == "fit on 6 points, 3 KL levels: indicative only"
    assert fit.caveats[1] == "peak outside the data (d* = 2.5, data d in [0.439, 1.35]): extrapolated"
    ax_d, line = _overopt(results, tmp_path, figures)
    assert line.get_label() == "; ".join(("best_of_n: d (1 - 0.2 d)", *fit.caveats))
    assert not [ln for ln in ax_d.lines if ln.get_linestyle() == ":"]  # no peak line past the data
    assert all(c in fits_table({"best_of_n": fit}) for c in fit.caveats)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    results.to_csv(run_dir / "results.csv", index=False)
    text = make_report(run_dir)["report"].read_text()
    assert "- best_of_n (d (1 - 0.2 d)): fit on 6 points, 3 KL levels: indicative only." in text
    assert ": extrapolated." in text.split("Read with care:")[1]
    # a convex gain (b < 0): its label adds, never "- -"
    convex = _bon_cells((2, 4, 8, 16, 64), a=0.1, b=-0.05)
    assert _overopt(convex, tmp_path, figures)[1].get_label() == "best_of_n: d (0.1 + 0.05 d)"


def test_an_unfitted_agent_has_no_caveats():
    fit = GaoFit("x", "bon", math.nan, math.nan, "results.csv", np.array([1.0]), np.array([0.1]), "why")
    assert fit.caveats == () and fit.form == ""


# --------------------------------------------------------------------------------------------------------
# Gold reward absent (a user task without one) or in some cells only
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blank", [False, True], ids=["nan", "empty"])
def test_a_sweep_without_gold_reports_proxy_against_kl_and_says_no_gold(tmp_path, figures, blank):
    run_dir = _sweep(tmp_path, gold="none")
    if blank:  # empty cells rather than the "nan" csv.DictWriter writes
        for name in ("results.csv", "curves.csv"):
            path = run_dir / name
            path.write_text(path.read_text().replace(",nan", ","))
    results = read_results(run_dir / "results.csv")
    assert results["gold_score"].isna().all() and results["ref_gold_score"].isna().all()
    paths = make_report(run_dir)
    assert list(paths) == ["report", "frontier", "learning_curves"]  # no over-optimisation plot
    text = paths["report"].read_text()
    assert "**No gold reward in this sweep**: `gold_score` is empty (NaN) in every row" in text
    assert "nan" not in text.replace("empty (NaN)", "").lower()  # no number reads nan
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| agent | beta | n | seeds | gold | proxy | KL |")
    assert all(line.split(" | ")[4] == "no gold" for line in table[1:]), table  # pi_ref's too
    assert "| ppo | 0.05 |  | 2 | no gold | 1.000 ± 0.000 | 2.525 ± 0.318 |" in text  # proxy and KL reported
    assert "None: no gold reward in this sweep" in text and "| agent | form |" not in text
    assert "overoptimisation.png" not in text
    frontier, curves = figures
    for fig, ylabel in ((frontier, "proxy reward (rm_score)"), (curves, "proxy reward (rm_score)")):
        (ax,) = fig.axes  # one panel: no gold axis drawn from NaNs
        assert ax.get_ylabel() == ylabel and "no gold" in fig.get_suptitle()
    (ax,) = frontier.axes
    assert ax.get_xlabel().startswith("KL") and {"ppo", "best_of_n", "pi_ref"} <= set(
        ax.get_legend_handles_labels()[1]
    )
    with pytest.raises(DataError, match="no gold_score in any row"):
        report_plots.plot_overoptimisation(results, None, tmp_path / "o.png")
    assert {fit.note for fit in gao_fits(results).values()} == {"no gold reward"}


def test_gold_in_some_cells_only_is_counted_not_silently_averaged(tmp_path, figures):
    run_dir = _sweep(tmp_path, gold="some")  # ppo's seed 1 has no gold
    paths = make_report(run_dir)
    text = paths["report"].read_text()
    assert "**Gold reward in 6 of 8 cells only**" in text
    results = read_results(run_dir / "results.csv")
    ppo = results[(results["agent"] == "ppo") & (results["beta"] == 0.05)]
    gold = ppo["gold_score"].dropna()
    assert len(gold) == 1
    assert f"| ppo | 0.05 |  | 2 | {gold.iloc[0]:.3f} (1 of 2 seeds) |" in text
    (bon,) = [line for line in text.splitlines() if line.startswith("| best_of_n | 0.05 | 4 | 2 | ")]
    assert "of 2 seeds" not in bon  # every seed has gold: a plain mean ± CI
    frontier, curves, overopt = figures
    assert frontier.axes[0].get_title() == "gold_score in 6 of 8 cells only"
    assert curves.axes[1].get_title() == "gold_score in 14 of 24 rows only"  # ppo seed 1's 2 x 5 lack it
    assert overopt.axes[0].get_title() == "gold_score in 6 of 8 cells only"
    assert "overoptimisation" in paths  # gold in some cells: still fitted, on those cells
