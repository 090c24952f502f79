"""Over-optimisation fits: where optimising the proxy reward stops paying on the gold one.

Gao, Schulman & Hilton (2022, arXiv:2210.10760) found that the gold reward gained over pi_ref follows, in
d = sqrt(KL(pi || pi_ref)), `R_bon(d) = d (a - b d)` for best-of-n and `R_rl(d) = d (a - b log d)` for RL:
it rises, peaks and falls while the proxy reward keeps rising. Both forms are linear in (a, b), so
:func:`fit_gao` solves them by least squares; the peak is at d* = a / 2b (best-of-n) or exp(a/b - 1) (RL).
Which form an agent gets is its own declaration (`learns`, see `schema.sampling_agents`), not its name.

A fit says how far it can be trusted (issue 13): one on fewer than `MIN_POINTS` points or `MIN_LEVELS`
distinct KL levels is "indicative only" (two coefficients from six noisy cells of a few seeds), and a peak
outside the range of d fitted is "extrapolated". `GaoFit.caveats` holds these; the report prints them in
the fits table and the plot's legend. A task without gold reward has no fit at all ("no gold reward").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rlhf_gym.report.schema import sampling_agents

__all__ = [
    "MIN_LEVELS",
    "MIN_POINTS",
    "GaoFit",
    "fit_gao",
    "fits_table",
    "format_form",
    "gao_fits",
    "reference_gold",
]

#: Below this many points (d > 0, finite gain) a fit is "indicative only": with two coefficients, fewer leave
#: too few degrees of freedom to tell the curve's bend from the noise of a few seeds.
MIN_POINTS = 8
#: Below this many distinct d (KL levels; best-of-n's n values) likewise: three levels fix a two-coefficient
#: curve through the origin with one level to spare, whatever the seeds at each.
MIN_LEVELS = 4


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


def _signed(value: float) -> str:
    """ " + 0.3" / " - 0.3": a term's sign as the operator, so a negative value never reads "- -0.3"."""
    return f" {'-' if value < 0 else '+'} {abs(value):.3g}"


def format_form(a: float, b: float, kind: str) -> str:
    """The fitted curve as it reads: `d (0.5 - 0.2 d)`, `d (0.5 + 0.2 log d)` for b < 0, `d (-0.1 - 0.2 d)`."""
    term = "d" if kind == "bon" else "log d"
    return f"d ({a:.3g}{_signed(-b)} {term})"


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
    def used(self) -> np.ndarray:
        """(P,) bool: the points a fit uses (finite gain, d > 0; both forms are 0 at d = 0)."""
        return np.isfinite(self.d) & np.isfinite(self.gain) & (self.d > 0)

    @property
    def points(self) -> int:
        return int(self.used.sum())

    @property
    def levels(self) -> int:
        """Distinct d among the points used (rounded to 1e-9: the same n's KL written twice is one level)."""
        return int(np.unique(np.round(self.d[self.used], 9)).size)

    @property
    def d_min(self) -> float:
        return float(self.d[self.used].min()) if self.points else math.nan

    @property
    def d_max(self) -> float:
        return float(self.d[self.used].max()) if self.points else math.nan

    @property
    def form(self) -> str:
        """The fitted curve with its coefficients (`format_form`), or "" without a fit."""
        return format_form(self.a, self.b, self.kind) if self.fitted else ""

    @property
    def peak_in_data(self) -> bool:
        """Whether the fitted peak d* lies within the range of d fitted (False without a peak)."""
        return math.isfinite(self.d_peak) and self.d_min <= self.d_peak <= self.d_max

    @property
    def caveats(self) -> tuple[str, ...]:
        """Why a fit should be read with care: too few points or KL levels, a peak outside the data."""
        if not self.fitted:
            return ()
        out = []
        if self.points < MIN_POINTS or self.levels < MIN_LEVELS:
            levels = f", {self.levels} KL levels" if self.levels < MIN_LEVELS else ""
            out.append(f"fit on {self.points} points{levels}: indicative only")
        if math.isfinite(self.d_peak) and not self.peak_in_data:
            out.append(
                f"peak outside the data (d* = {self.d_peak:.3g}, data d in [{self.d_min:.3g}, {self.d_max:.3g}]): "
                "extrapolated"
            )
        return tuple(out)


def reference_gold(results: pd.DataFrame, curves: pd.DataFrame | None) -> tuple[float, str]:
    """pi_ref's gold and where it came from: the `ref_gold_score` column, else curves' iteration 0."""
    if "ref_gold_score" in results.columns and results["ref_gold_score"].notna().any():
        return float(results["ref_gold_score"].mean()), "ref_gold_score"
    if curves is not None:
        start = curves.loc[curves["iteration"] == 0, "gold_score"]
        if start.notna().any():
            return float(start.mean()), "iteration 0 of curves.csv"
    return math.nan, ""


def gao_fits(results: pd.DataFrame, curves: pd.DataFrame | None = None) -> dict[str, GaoFit]:
    """Fit Gao et al.'s form to each agent's gold gain against d = sqrt(KL).

    Agents that learn nothing (`learns = False`, e.g. best-of-n) take the best-of-n form, one point per
    cell of results.csv (their KL is that of the selection); the others take the RL form, on every
    iteration of curves.csv pooled over seeds and configurations (their path through KL), or on their
    cells when there are no curves. The gain is gold minus pi_ref's gold (`ref_gold_score`, else the mean
    gold at iteration 0 of the curves); without either there is no gain to fit and `note` says so.
    """
    ref_gold, _ = reference_gold(results, curves)
    sampling = sampling_agents(results)
    fits = {}
    for agent in sorted(results["agent"].unique()):
        kind = "bon" if agent in sampling else "rl"
        rows, source = results[results["agent"] == agent], "results.csv"
        if kind == "rl" and curves is not None and (curves["agent"] == agent).any():
            rows, source = curves[curves["agent"] == agent], "curves.csv"
        d = np.sqrt(np.clip(rows["kl"].to_numpy(dtype=float), 0, None))  # a k1 estimate can dip below 0
        gold = rows["gold_score"].to_numpy(dtype=float)
        a = b = math.nan
        if not np.isfinite(gold).any():
            note = "no gold reward"
        elif not math.isfinite(ref_gold):
            note = "no pi_ref gold (ref_gold_score, or iteration 0 in curves.csv) to measure the gain from"
        else:
            try:
                a, b = fit_gao(d, gold - ref_gold, kind)
                note = ""
            except ValueError as e:
                note = str(e)
        gain = gold - ref_gold if math.isfinite(ref_gold) else gold
        fits[agent] = GaoFit(agent, kind, a, b, source, d, gain, note)
    return fits


def fits_table(fits: Mapping[str, GaoFit]) -> str:
    """The fits as a Markdown table: form, coefficients, points, and the peak (or why there is none).

    The note column carries the fit's caveats (`GaoFit.caveats`: too few points, a peak outside the data).
    """
    lines = [
        "| agent | form | a | b | points | source | peak d* | KL at peak | gold gain at peak | note |",
        "|:---|:---|---:|---:|---:|:---|---:|---:|---:|:---|",
    ]
    for fit in fits.values():
        form = "d (a - b d)" if fit.kind == "bon" else "d (a - b log d)"
        if not fit.fitted:
            lines.append(f"| {fit.agent} | {form} | | | {fit.points} | {fit.source} | | | | {fit.note} |")
            continue
        peak, notes = fit.d_peak, list(fit.caveats)
        if math.isinf(peak):
            cells = ["none", "", ""]
            notes.append("b <= 0: gold still rising, no over-optimisation seen")
        else:
            cells = [f"{peak:.3f}", f"{peak**2:.3f}", f"{float(fit.predict(peak)):.3f}"]
        lines.append(
            f"| {fit.agent} | {form} | {fit.a:.4f} | {fit.b:.4f} | {fit.points} | {fit.source} | "
            + " | ".join(cells)
            + f" | {'; '.join(notes)} |"
        )
    return "\n".join(lines) + "\n"
