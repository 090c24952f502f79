"""The report's three plots: the reward/KL frontier, learning curves, and over-optimisation.

matplotlib's object API on an Agg canvas: no pyplot, no global backend, no figure left open. Each agent
keeps one colour and marker in every plot. Agents that learn nothing (`learns = False`, see
`schema.sampling_agents`) are drawn as one point per configuration, labelled with their `n`.
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
    sampling_agents,
)
from rlhf_gym.report.stats import format_value, mean_ci, reference_mean_ci, summarise

__all__ = ["plot_frontier", "plot_learning_curves", "plot_overoptimisation"]

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


def _legend(ax, fontsize: str) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty legend() only warns
        ax.legend(fontsize=fontsize)


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def plot_frontier(results: pd.DataFrame, path: str | Path) -> Path:
    """Gold (left) and proxy (right) reward against KL to pi_ref, one colour and marker per agent.

    Points are configuration means with 95% CI bars in both directions; an agent's configurations are
    joined in order of KL; pi_ref is the black star at KL = 0; the points of agents that learn nothing
    (`learns = False`, e.g. best-of-n) carry their n. Where such an agent reports an analytic upper bound
    on its KL (`kl_bound`), a hollow marker at the same reward shows it, joined to the estimate by a dotted
    line: the distance is how much the bound overstates the KL.
    """
    summary = summarise(results)
    sampling = sampling_agents(results)
    fig, axes = _figure(2)
    styles = _agent_styles(summary["agent"])
    for ax, metric, label in (
        (axes[0], "gold_score", "gold reward (gold_score)"),
        (axes[1], "rm_score", "proxy reward (rm_score)"),
    ):
        for agent, rows in summary.groupby("agent", sort=True):
            rows = rows.sort_values("kl_mean")
            colour, marker = styles[agent]
            x, y = rows["kl_mean"].to_numpy(dtype=float), rows[f"{metric}_mean"].to_numpy(dtype=float)
            ax.errorbar(
                x, y, xerr=_err(rows["kl_ci"]), yerr=_err(rows[f"{metric}_ci"]), color=colour, marker=marker,
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


def plot_learning_curves(curves: pd.DataFrame, path: str | Path, x: str = "iteration") -> Path:
    """Proxy (left) and gold (right) reward per iteration: mean over seeds, 95% CI band, per configuration.

    A configuration is (agent, beta) plus any other swept field; colour is the agent's, line style tells
    an agent's configurations apart. `x` is "iteration" or "tokens" (mean over seeds at each iteration).
    """
    check_columns(curves, CURVES_REQUIRED, CURVE_METRICS, "curves")
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
        for ax, metric in zip(axes, ("rm_score", "gold_score"), strict=True):
            xs, mean, ci = _by_iteration(group, x, metric)
            ax.plot(xs, mean, color=colour, linestyle=linestyle, label=_config_label(cfg))
            ax.fill_between(xs, mean - ci, mean + ci, color=colour, alpha=0.15, linewidth=0)
    for ax, label in zip(axes, ("proxy reward (rm_score)", "gold reward (gold_score)"), strict=True):
        ax.set_xlabel("tokens generated" if x == "tokens" else "iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if not curves["gold_score"].notna().any():
        _no_data(axes[1], "no gold reward in this sweep")
    _legend(axes[0], "x-small")
    fig.suptitle("Learning curves: mean over seeds with 95% CI band")
    return _save(fig, path)


def plot_overoptimisation(results: pd.DataFrame, curves: pd.DataFrame | None, path: str | Path) -> Path:
    """Where optimising the proxy stops paying on gold (Gao, Schulman & Hilton 2022, arXiv:2210.10760).

    Left: gold against proxy reward, along each RL configuration's curve (mean over seeds per iteration)
    or through the configuration means (agents that learn nothing, or no curves); a ring marks each
    agent's best gold.
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
            top = max(fit.d_max, min(fit.d_peak, 2 * fit.d_max)) * 1.05
            grid = np.linspace(0, top, 200)
            term = "d" if fit.kind == "bon" else "log d"
            label = f"{agent}: d ({fit.a:.3g} - {fit.b:.3g} {term})"
            ax_d.plot(grid, fit.predict(grid), color=colour, label=label)
            if math.isfinite(fit.d_peak) and fit.d_peak <= top:
                ax_d.axvline(fit.d_peak, color=colour, linestyle=":", linewidth=1)
    ref_gold, _ = reference_gold(results, curves)
    ref_proxy, _ = reference_mean_ci(summary, "rm_score")
    if math.isfinite(ref_gold):
        ax_d.plot([0.0], [0.0], "*", color="black", markersize=13, label="pi_ref")
        if math.isfinite(ref_proxy):
            ax_proxy.plot([ref_proxy], [ref_gold], "*", color="black", markersize=13, label="pi_ref")
    if not results["gold_score"].notna().any():
        for ax in (ax_proxy, ax_d):
            _no_data(ax, "no gold reward in this sweep")
    ax_proxy.set_xlabel("proxy reward (rm_score)")
    ax_proxy.set_ylabel("gold reward (gold_score)")
    ax_d.set_xlabel("d = sqrt(KL(pi || pi_ref))")
    ax_d.set_ylabel("gold reward - pi_ref's" if math.isfinite(ref_gold) else "gold reward (pi_ref's unknown)")
    for ax in (ax_proxy, ax_d):
        ax.grid(alpha=0.3)
        _legend(ax, "x-small")
    fig.suptitle("Over-optimisation: gold against proxy and against d (Gao, Schulman & Hilton 2022)")
    return _save(fig, path)
