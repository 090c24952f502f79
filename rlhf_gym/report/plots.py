"""The report's three plots: the reward/KL frontier, learning curves, and over-optimisation.

matplotlib's object API on an Agg canvas: no pyplot, no global backend, no figure left open. Each agent
keeps one colour and marker in every plot. Agents that learn nothing (`learns = False`, see
`schema.sampling_agents`) are drawn as one point per configuration, labelled with their `n`.

What a reader can trust at a few seeds (issue 13):

- error bars of a bounded metric are clipped at its bound (`stats.interval`): no KL bar below 0;
- every legend entry has something drawn: in the learning curves an agent that learns nothing is a
  horizontal line (its mean over iterations and seeds) with its CI band across the whole axis, the level
  the learning agents must beat, and a configuration with one iteration is a marker;
- a Gao fit is drawn only over the d it was fitted to, its formula printed with its signs (`gao.format_form`),
  its caveats (few points, peak outside the data) in its legend label;
- a task without gold reward (`gold_score` NaN everywhere) gets no gold panel: proxy reward only, the title
  saying "no gold"; a sweep with gold in some cells only says how many in the gold panel's title.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from rlhf_base.io import DataError, atomic_path
from rlhf_gym.report.gao import gao_fits, reference_gold
from rlhf_gym.report.schema import (
    CURVE_METRICS,
    CURVES_REQUIRED,
    check_columns,
    config_columns,
    gold_coverage,
    sampling_agents,
)
from rlhf_gym.report.stats import format_value, interval, mean_ci, reference_mean_ci, summarise

__all__ = ["plot_frontier", "plot_learning_curves", "plot_overoptimisation"]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")
_LINESTYLES = ("-", "--", ":", "-.")


def _figure(ncols: int):
    """A figure of `ncols` panels side by side; the axes as a list (one panel is a list of one)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * ncols, 4.5), layout="constrained")
    return fig, list(np.atleast_1d(fig.subplots(1, ncols)))


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


def _err(rows: pd.DataFrame, metric: str) -> np.ndarray:
    """(2, N) error bar extents below and above each configuration's mean: its 95% CI clipped at the
    metric's bound (`stats.interval`), so no KL bar runs below 0; 0 where there is no CI (one seed)."""
    means, cis = rows[f"{metric}_mean"].to_numpy(dtype=float), rows[f"{metric}_ci"].to_numpy(dtype=float)
    ends = np.array([interval(m, c, metric) for m, c in zip(means, cis, strict=True)]).reshape(-1, 2)
    return np.nan_to_num(np.clip(np.stack([means - ends[:, 0], ends[:, 1] - means]), 0, None), nan=0.0)


def _gold_title(ax, df: pd.DataFrame, what: str) -> None:
    """Title a gold panel with how many `what` have gold when only some do (never a silent average)."""
    have, total = gold_coverage(df)
    if 0 < have < total:
        ax.set_title(f"gold_score in {have} of {total} {what} only", fontsize="small")


def _n_from_kl(kl: float) -> float:
    """Invert best-of-n's KL bound log n - (n-1)/n (increasing in n) by bisection on log n; NaN for bad input.

    A sampling agent that picks the best of n samples reports this bound as `kl_bound` (`agents.best_of_n`;
    run folders written before the estimate existed have it as `kl`).
    """
    if not math.isfinite(kl) or kl < 0:
        return math.nan
    lo, hi = 0.0, 50.0  # log n
    for _ in range(100):
        mid = (lo + hi) / 2
        n = math.exp(mid)
        lo, hi = (mid, hi) if math.log(n) - (n - 1) / n < kl else (lo, mid)
    return math.exp(lo)


def _bounds(rows: pd.DataFrame) -> np.ndarray | None:
    """The configurations' mean `kl_bound`, when every one has it (best-of-n since the KL estimate)."""
    if "kl_bound_mean" in rows.columns and rows["kl_bound_mean"].notna().all():
        return rows["kl_bound_mean"].to_numpy(dtype=float)
    return None


def _sample_labels(rows: pd.DataFrame) -> list[str]:
    """Labels "n=4" per configuration of a sampling agent.

    `n` is the agent's `samples_per_prompt` when the sweep swept it (a `samples_per_prompt` /
    `*.samples_per_prompt` column, or `n` in run folders written before the rename), else it is read back
    from the analytic upper bound log n - (n-1)/n, which depends on n alone (`kl_bound`, or `kl` in run
    folders written before the estimate).
    """
    names = ("samples_per_prompt", "n")
    column = next((c for c in rows.columns if c.split(".")[-1] in names and rows[c].notna().all()), None)
    if column:
        values = rows[column]
    else:
        bounds = _bounds(rows)
        values = pd.Series(bounds if bounds is not None else rows["kl_mean"]).map(_n_from_kl)
    return [f"n={v:.0f}" if math.isfinite(v) else "" for v in values.astype(float)]


def _legend(ax, fontsize: str, below: bool = False) -> None:
    """The axes' legend, inside (matplotlib's best place) or `below` it (long labels: the Gao fits')."""
    if ax.get_legend_handles_labels()[0]:  # an empty legend() only warns
        where = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.14)} if below else {}
        ax.legend(fontsize=fontsize, **where)


def plot_frontier(results: pd.DataFrame, path: str | Path) -> Path:
    """Gold (left) and proxy (right) reward against KL to pi_ref, one colour and marker per agent.

    Points are configuration means with 95% CI bars in both directions (KL's clipped at 0); an agent's
    configurations are joined in order of KL; pi_ref is the black star at KL = 0. Without gold reward
    (`gold_score` NaN in every row) there is one panel, proxy reward, titled so. The points of agents that
    learn nothing (`learns = False`, e.g. best-of-n) carry their n. Where such an agent reports an analytic upper bound
    on its KL (`kl_bound`), a hollow marker at the same reward shows it, joined to the estimate by a dotted
    line: the distance is how much the bound overstates the KL.
    """
    summary = summarise(results)
    sampling = sampling_agents(results)
    panels = [("gold_score", "gold reward (gold_score)"), ("rm_score", "proxy reward (rm_score)")]
    has_gold = gold_coverage(results)[0] > 0
    if not has_gold:
        panels = panels[1:]
    fig, axes = _figure(len(panels))
    styles = _agent_styles(summary["agent"])
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for agent, rows in summary.groupby("agent", sort=True):
            rows = rows.sort_values("kl_mean")
            colour, marker = styles[agent]
            x, y = rows["kl_mean"].to_numpy(dtype=float), rows[f"{metric}_mean"].to_numpy(dtype=float)
            ax.errorbar(
                x, y, xerr=_err(rows, "kl"), yerr=_err(rows, metric), color=colour, marker=marker,
                linestyle="-", capsize=3, label=agent,
            )  # fmt: skip
            if agent in sampling:
                for xi, yi, text in zip(x, y, _sample_labels(rows), strict=True):
                    ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(5, -12), fontsize=8)
                bounds = _bounds(rows)
                if bounds is not None:
                    bound_label = f"{agent}: KL upper bound"
                    ax.hlines(y, x, bounds, colors=[colour], linestyles=":", linewidth=0.8, gid=bound_label)
                    ax.plot(
                        bounds, y, color=colour, marker=marker, markerfacecolor="none", linestyle="none",
                        label=bound_label,
                    )  # fmt: skip
        ref, ref_ci = reference_mean_ci(summary, metric)
        if math.isfinite(ref):
            ax.axhline(ref, color="0.6", linewidth=0.8, linestyle=":")
            ax.errorbar(
                [0.0], [ref], yerr=[0.0 if math.isnan(ref_ci) else ref_ci], color="black", marker="*",
                markersize=13, linestyle="none", capsize=3, label="pi_ref",
            )  # fmt: skip
        if metric == "gold_score":
            _gold_title(ax, results, "cells")
        ax.set_xlabel("KL(pi || pi_ref) (nats)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    _legend(axes[-1], "small")
    if has_gold:
        fig.suptitle("Reward against KL to pi_ref: mean over seeds with 95% CI")
    else:  # one panel: two short lines fit its width
        fig.suptitle(
            "Proxy reward against KL to pi_ref\n(no gold reward in this sweep; mean over seeds, 95% CI)"
        )
    return _save(fig, path)


def _config_label(config: Mapping[str, object]) -> str:
    parts = [str(config["agent"])]
    if "beta" in config and format_value(config["beta"]):
        parts.append(f"β={format_value(config['beta'])}")
    parts += [
        f"{k}={format_value(v)}" for k, v in config.items() if k not in ("agent", "beta") and format_value(v)
    ]
    return " ".join(parts)


def _by_iteration(group: pd.DataFrame, x: str, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (mean over seeds), and the metric's mean and CI over seeds, per iteration."""
    rows = [
        (float(g[x].mean()), *mean_ci(g[metric].to_numpy(dtype=float))[:2])
        for _, g in group.groupby("iteration", sort=True)
    ]
    xs, means, cis = (np.array(v, dtype=float) for v in zip(*rows, strict=True))
    return xs, means, cis


def _level(group: pd.DataFrame, metric: str) -> tuple[float, float]:
    """An agent that learns nothing: the mean over seeds of each seed's mean over its iterations, and the
    95% CI of that over seeds (its iterations are repeats of one policy, not progress)."""
    return mean_ci(group.groupby("seed")[metric].mean().to_numpy(dtype=float))[:2]


def plot_learning_curves(
    curves: pd.DataFrame, path: str | Path, x: str = "iteration", sampling: Iterable[str] | None = None
) -> Path:
    """Proxy (left) and gold (right) reward per iteration: mean over seeds, 95% CI band, per configuration.

    A configuration is (agent, beta) plus any other swept field; colour is the agent's, line style tells
    an agent's configurations apart. `x` is "iteration" or "tokens" (mean over seeds at each iteration).

    An agent that learns nothing (best-of-n: often one evaluation round) has no curve: it is drawn as a
    horizontal line at its mean over iterations and seeds with its CI band, across the whole axis, the
    level the learning agents are compared with; its legend entry says "(no learning)". A learning
    configuration with a single iteration is drawn as a marker. Without gold reward (`gold_score` NaN in
    every row) there is one panel, proxy reward.

    Args:
        sampling: The agents that learn nothing; None reads them from `curves` (`schema.sampling_agents`:
            curves.csv has no `learns` column, so the registered class decides). `make_report` passes
            results.csv's declaration.
    """
    check_columns(curves, CURVES_REQUIRED, CURVE_METRICS, "curves")
    if x not in ("iteration", "tokens"):
        raise ValueError(f"x must be 'iteration' or 'tokens', got {x!r}")
    if x not in curves.columns:
        raise DataError(f"curves lacks column {x!r} for the x axis")
    sampling = frozenset(sampling_agents(curves) if sampling is None else sampling)
    has_gold = gold_coverage(curves)[0] > 0
    panels = [("rm_score", "proxy reward (rm_score)"), ("gold_score", "gold reward (gold_score)")]
    panels = panels if has_gold else panels[:1]
    fig, axes = _figure(len(panels))
    styles = _agent_styles(curves["agent"])
    config = config_columns(curves)
    seen: dict[str, int] = {}
    for key, group in curves.groupby(config, dropna=False, sort=True):
        cfg = dict(zip(config, key, strict=True))
        colour, marker = styles[cfg["agent"]]
        linestyle = _LINESTYLES[seen.setdefault(cfg["agent"], 0) % len(_LINESTYLES)]
        seen[cfg["agent"]] += 1
        for ax, (metric, _) in zip(axes, panels, strict=True):
            if cfg["agent"] in sampling:
                level, ci = _level(group, metric)
                if not math.isfinite(level):
                    continue
                ax.axhline(
                    level, color=colour, linestyle=linestyle, label=f"{_config_label(cfg)} (no learning)"
                )
                if math.isfinite(ci):
                    ax.axhspan(level - ci, level + ci, color=colour, alpha=0.1, linewidth=0)
                continue
            xs, mean, ci = _by_iteration(group, x, metric)
            few = np.isfinite(mean).sum() < 2  # one point: a line alone would draw nothing
            ax.plot(
                xs,
                mean,
                color=colour,
                linestyle=linestyle,
                marker=marker if few else "",
                label=_config_label(cfg),
            )
            ax.fill_between(xs, mean - ci, mean + ci, color=colour, alpha=0.15, linewidth=0)
    for ax, (metric, label) in zip(axes, panels, strict=True):
        ax.set_xlabel("tokens generated" if x == "tokens" else "iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if metric == "gold_score":
            _gold_title(ax, curves, "rows")
    _legend(axes[0], "x-small")
    if has_gold:
        fig.suptitle("Learning curves: mean over seeds with 95% CI band")
    else:
        fig.suptitle(
            "Learning curves: proxy reward\n(no gold reward in this sweep; mean over seeds, 95% CI band)"
        )
    return _save(fig, path)


def plot_overoptimisation(results: pd.DataFrame, curves: pd.DataFrame | None, path: str | Path) -> Path:
    """Where optimising the proxy stops paying on gold (Gao, Schulman & Hilton 2022, arXiv:2210.10760).

    Left: gold against proxy reward, along each RL configuration's curve (mean over seeds per iteration)
    or through the configuration means (agents that learn nothing, or no curves); a ring marks each
    agent's best gold.
    Right: gold gained over pi_ref against d = sqrt(KL), every point, with the fitted Gao form drawn over
    the d it was fitted to (never past the data), labelled with its formula and caveats
    (`GaoFit.caveats`), and its peak d* (dotted line) when the peak lies within the data. `curves` may be
    None.

    Raises:
        DataError: `gold_score` is NaN in every row of results (a task without gold reward): both panels
            are gold, and `make_report` draws no such plot.
    """
    if gold_coverage(results)[0] == 0:
        raise DataError(
            "no gold_score in any row of results: the over-optimisation plot measures gold reward, and this "
            "sweep's task has none (its proxy reward against KL is in the frontier plot)"
        )
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
                proxy = _by_iteration(group, "iteration", "rm_score")[1]
                paths.append((proxy, _by_iteration(group, "iteration", "gold_score")[1]))
        else:
            rows = summary[summary["agent"] == agent].sort_values("kl_mean")
            paths.append((rows["rm_score_mean"].to_numpy(float), rows["gold_score_mean"].to_numpy(float)))
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
            grid = np.linspace(fit.d_min, fit.d_max, 200)  # only where there are points: no extrapolation
            label = "; ".join((f"{agent}: {fit.form}", *fit.caveats))
            ax_d.plot(grid, fit.predict(grid), color=colour, label=label)
            if fit.peak_in_data:
                ax_d.axvline(fit.d_peak, color=colour, linestyle=":", linewidth=1)
    ref_gold, _ = reference_gold(results, curves)
    ref_proxy, _ = reference_mean_ci(summary, "rm_score")
    if math.isfinite(ref_gold):
        ax_d.plot([0.0], [0.0], "*", color="black", markersize=13, label="pi_ref")
        if math.isfinite(ref_proxy):
            ax_proxy.plot([ref_proxy], [ref_gold], "*", color="black", markersize=13, label="pi_ref")
    _gold_title(ax_proxy, results, "cells")
    ax_proxy.set_xlabel("proxy reward (rm_score)")
    ax_proxy.set_ylabel("gold reward (gold_score)")
    ax_d.set_xlabel("d = sqrt(KL(pi || pi_ref))")
    ax_d.set_ylabel("gold reward - pi_ref's" if math.isfinite(ref_gold) else "gold reward (pi_ref's unknown)")
    for ax in (ax_proxy, ax_d):
        ax.grid(alpha=0.3)
    _legend(ax_proxy, "x-small")
    _legend(ax_d, "x-small", below=True)  # the fits' labels carry their formula and caveats
    fig.suptitle("Over-optimisation: gold against proxy and against d (Gao, Schulman & Hilton 2022)")
    return _save(fig, path)
