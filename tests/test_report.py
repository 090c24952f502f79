"""Sweep reports: means and t intervals checked by hand, Gao et al.'s fits on noiseless data, files written.

The fixtures `data/sweep_results.csv` (2 agents x 2 betas x 3 seeds, values picked so every mean and CI is
a one-line hand computation) and `data/sweep_curves.csv` (each cell's iterations 0..4, moving from pi_ref to
the cell's final values with a bump of gold halfway) follow the sweep's data contract (`report.schema`).
`data/sweep_*_old_names.csv` hold the same numbers under the column names used before issue 11.
"""

from __future__ import annotations

import argparse
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rlhf_base.io import DataError
from rlhf_base.maths import best_of_n_kl
from rlhf_gym.cli import add_report_command
from rlhf_gym.report import (
    OldColumnsWarning,
    fit_gao,
    gao_fits,
    make_report,
    markdown_table,
    mean_ci,
    read_curves,
    read_results,
    sampling_agents,
    summarise,
    t_quantile_975,
)
from rlhf_gym.report import plots as report_plots

DATA = Path(__file__).parent / "data"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T2 = 4.303  # t_{0.975, 2}: 3 seeds, from any printed t table


def _t_cdf(t: float, df: int) -> float:
    """P(T <= t) for t > 0, by the trapezoid rule on the Student t density (no scipy)."""
    x = np.linspace(0.0, t, 100_001)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return 0.5 + float(np.trapezoid(np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df)), x))


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    shutil.copy(DATA / "sweep_results.csv", tmp_path / "results.csv")
    shutil.copy(DATA / "sweep_curves.csv", tmp_path / "curves.csv")
    return tmp_path


# --------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------
def test_t_quantile_is_the_975_point_of_the_t_distribution():
    for df in [*range(1, 31), 31, 40, 100]:  # the table, then the Cornish-Fisher expansion
        assert _t_cdf(t_quantile_975(df), df) == pytest.approx(0.975, abs=1e-7), df


def test_t_quantile_rejects_zero_degrees_of_freedom():
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile_975(0)


def test_mean_ci_by_hand():
    mean, ci, n = mean_ci([0.1, 0.2, 0.3, math.nan])  # NaN (no gold for that seed) is left out
    assert (mean, n) == (pytest.approx(0.2), 3)
    assert ci == pytest.approx(T2 * 0.1 / math.sqrt(3), rel=1e-4)  # 0.2484
    mean, ci, n = mean_ci([0.7])
    assert (mean, n) == (0.7, 1) and math.isnan(ci)  # one seed: no interval
    assert all(math.isnan(v) for v in mean_ci([])[:2])


# --------------------------------------------------------------------------------------------------------
# Summary and table
# --------------------------------------------------------------------------------------------------------
def test_summarise_groups_by_configuration_over_seeds():
    summary = summarise(read_results(DATA / "sweep_results.csv"))
    assert list(summary[["agent", "beta"]].itertuples(index=False, name=None)) == [
        ("ppo", 0.05),
        ("ppo", 0.1),
        ("reinforce", 0.05),
        ("reinforce", 0.1),
    ]
    assert summary["seeds"].tolist() == [3, 3, 3, 3]
    ppo = summary.iloc[0]
    assert ppo["gold_score_mean"] == pytest.approx(0.2)  # (0.1 + 0.2 + 0.3) / 3
    assert ppo["gold_score_ci"] == pytest.approx(T2 * 0.1 / math.sqrt(3), rel=1e-4)  # sd 0.1
    assert ppo["kl_ci"] == pytest.approx(T2 * 0.2 / math.sqrt(3), rel=1e-4)  # kl 2.0, 2.2, 2.4: sd 0.2
    assert summary.iloc[3]["kl_ci"] == pytest.approx(0.0)  # reinforce beta 0.1: kl 1.5 for every seed


def test_markdown_table_shows_the_hand_computed_cells():
    table = markdown_table(summarise(read_results(DATA / "sweep_results.csv")))
    lines = table.splitlines()
    assert lines[0] == "| agent | beta | seeds | gold | proxy | KL | length | time (s) |"
    # CI = 4.303 * sd / sqrt(3): sd 0.1 -> 0.248, 0.2 -> 0.497, 0.02 -> 0.050, 0.05 -> 0.124, 0.3 -> 0.745,
    # 1 -> 2.5, 2 -> 5.0, 3 -> 7.5, 5 -> 12.4, 6 -> 14.9; pi_ref's values are the same in every row: no CI.
    assert lines[2:] == [
        "| pi_ref |  |  | 0.050 | 0.500 | 0.000 |  |  |",
        "| ppo | 0.05 | 3 | 0.200 ± 0.248 | 1.200 ± 0.497 | 2.200 ± 0.497 | 22.0 ± 5.0 | 66.0 ± 14.9 |",
        "| ppo | 0.1 | 3 | 0.320 ± 0.050 | 0.900 ± 0.248 | 1.100 ± 0.248 | 18.0 ± 0.0 | 55.0 ± 12.4 |",
        "| reinforce | 0.05 | 3 | 0.100 ± 0.248 | 1.600 ± 0.248 | 3.300 ± 0.745 | 33.0 ± 7.5 | 40.0 ± 0.0 |",
        "| reinforce | 0.1 | 3 | 0.400 ± 0.124 | 1.200 ± 0.248 | 1.500 ± 0.000 | 26.0 ± 2.5 | 46.0 ± 2.5 |",
    ]


def _rows(agent: str, n: float, seeds: list[int], gold: list[float]) -> list[dict]:
    return [
        {
            "cell": f"{agent}-{n}-{s}",
            "agent": agent,
            "seed": s,
            "beta": 0.0,
            "n": n,
            "kl": 0.5,
            "rm_score": 1.0,
        }
        | {"gold_score": g}
        for s, g in zip(seeds, gold, strict=True)
    ]


def test_swept_fields_single_seeds_and_missing_gold_in_the_table():
    results = pd.DataFrame(
        _rows("ppo", math.nan, [0, 1], [math.nan, math.nan])  # `n` is not ppo's field: NaN, still a group
        + _rows("best_of_n", 16, [0], [0.25])
        + _rows("best_of_n", 4, [0, 1], [0.1, 0.3])
    )
    summary = summarise(results)
    assert summary["agent"].tolist() == ["best_of_n", "best_of_n", "ppo"]  # sorted by agent, then n
    assert summary["n"].fillna(-1).tolist() == [4, 16, -1]
    assert summary["seeds"].tolist() == [2, 1, 2]
    lines = markdown_table(summary).splitlines()
    assert (
        lines[0] == "| agent | beta | n | seeds | gold | proxy | KL |"
    )  # no length/time columns: none given
    assert (
        lines[2] == "| best_of_n | 0 | 4 | 2 | 0.200 ± 1.271 | 1.000 ± 0.000 | 0.500 ± 0.000 |"
    )  # 12.706*0.1414/1.414
    assert lines[3] == "| best_of_n | 0 | 16 | 1 | 0.250 | 1.000 | 0.500 |"  # one seed: mean only
    assert (
        lines[4] == "| ppo | 0 |  | 2 | no gold | 1.000 ± 0.000 | 0.500 ± 0.000 |"
    )  # none at all (issue 13)


def test_a_seed_twice_in_one_configuration_is_an_error():
    results = pd.DataFrame(_rows("ppo", 1, [0, 0], [0.1, 0.2]))
    with pytest.raises(DataError, match="seed 0 more than once"):
        summarise(results)


# --------------------------------------------------------------------------------------------------------
# Gao et al. fits
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "form"),
    [("bon", lambda d, a, b: d * (a - b * d)), ("rl", lambda d, a, b: d * (a - b * np.log(d)))],
)
def test_fit_gao_recovers_known_coefficients(kind, form):
    d = np.linspace(0.2, 3.0, 15)
    a, b = fit_gao(d, form(d, 0.8, 0.3), kind)
    assert (a, b) == (pytest.approx(0.8, abs=1e-10), pytest.approx(0.3, abs=1e-10))
    # d = 0 and NaN points carry nothing and are dropped
    a, b = fit_gao([0.0, *d, 1.0], [0.0, *form(d, 0.8, 0.3), math.nan], kind)
    assert (a, b) == (pytest.approx(0.8, abs=1e-10), pytest.approx(0.3, abs=1e-10))


def test_fit_gao_refuses_too_few_points_and_unknown_forms():
    with pytest.raises(ValueError, match="at least 3 distinct"):
        fit_gao([0.0, 1.0, 1.0, 2.0], [0.0, 0.1, 0.2, 0.3], "rl")
    with pytest.raises(ValueError, match="kind must be"):
        fit_gao([1.0, 2.0, 3.0], [0.1, 0.2, 0.3], "ppo")


def _sampling_rows(
    agent: str, learns: object, a: float = 0.5, b: float = 0.2, ref: float = 0.1
) -> pd.DataFrame:
    """Cells of an agent whose gold gain is exactly Gao's best-of-n form at the analytic KL of each n."""
    rows = []
    for n in (1, 2, 4, 8, 16, 64):
        d = math.sqrt(best_of_n_kl(n))
        for seed in (0, 1):
            rows.append(
                {"cell": f"{agent}-{n}-{seed}", "agent": agent, "seed": seed, "beta": 0.0, "n": n}
                | {
                    "learns": learns,
                    "kl": best_of_n_kl(n),
                    "rm_score": 1.0,
                    "gold_score": ref + d * (a - b * d),
                }
                | {"ref_gold_score": ref}
            )
    return pd.DataFrame(rows)


def test_an_agent_that_declares_it_learns_nothing_gets_the_best_of_n_fit_whatever_its_name():
    a, b = 0.5, 0.2
    fit = gao_fits(_sampling_rows("my_sampler", False, a, b))["my_sampler"]  # a user's agent, not registered
    assert (fit.kind, fit.source, fit.note) == ("bon", "results.csv", "")
    assert (fit.a, fit.b) == (pytest.approx(a), pytest.approx(b))
    assert fit.d_peak == pytest.approx(a / (2 * b))  # dR/dd = a - 2 b d = 0
    # the declaration decides, not the name: best_of_n's rows that say they learn get the RL form
    assert gao_fits(_sampling_rows("best_of_n", True))["best_of_n"].kind == "rl"
    assert sampling_agents(_sampling_rows("my_sampler", "False")) == {"my_sampler"}  # as read from CSV text


def test_rows_without_the_declaration_take_it_from_the_registered_agent_class():
    """Run folders written before the `learns` column: the class in the registry says it."""
    rows = pd.concat([_sampling_rows("best_of_n", None), _sampling_rows("not_registered", None)])
    assert sampling_agents(rows.drop(columns="learns")) == {"best_of_n"}
    assert sampling_agents(rows) == {"best_of_n"}  # empty cells of the column (a resumed old file) too
    assert gao_fits(rows.drop(columns="learns"))["not_registered"].kind == "rl"  # the protocol's default


def _frontier_texts(results: pd.DataFrame, tmp_path: Path, monkeypatch) -> dict[str, list[str]]:
    """The annotations plot_frontier puts on each panel, by the panel's y label."""
    figures = []
    monkeypatch.setattr(report_plots, "_save", lambda fig, path: figures.append(fig) or Path(path))
    report_plots.plot_frontier(results, tmp_path / "frontier.png")
    return {ax.get_ylabel(): sorted(t.get_text() for t in ax.texts) for ax in figures[0].axes}


def test_frontier_labels_the_points_of_agents_that_learn_nothing_with_their_n(tmp_path, monkeypatch):
    swept = _frontier_texts(_sampling_rows("my_sampler", False), tmp_path, monkeypatch)
    assert swept["gold reward (gold_score)"] == ["n=1", "n=16", "n=2", "n=4", "n=64", "n=8"]
    # a swept field of another name: n is read back from the KL, here the bound log n - (n-1)/n (old runs)
    unswept = _sampling_rows("my_sampler", False).rename(columns={"n": "budget"})
    texts = _frontier_texts(unswept, tmp_path, monkeypatch)
    assert texts["proxy reward (rm_score)"] == swept["gold reward (gold_score)"]
    # since the estimate, `kl` is below the bound and n is read back from `kl_bound`
    estimated = unswept.assign(kl_bound=unswept["kl"], kl=unswept["kl"] / 2)
    texts = _frontier_texts(estimated, tmp_path, monkeypatch)
    assert texts["proxy reward (rm_score)"] == swept["gold reward (gold_score)"]
    learning = _frontier_texts(_sampling_rows("my_sampler", True), tmp_path, monkeypatch)
    assert learning["gold reward (gold_score)"] == []  # an agent that learns has no n to show


def test_rl_fits_pool_every_iteration_of_the_curves():
    results, curves = read_results(DATA / "sweep_results.csv"), read_curves(DATA / "sweep_curves.csv")
    fits = gao_fits(results, curves)
    ppo = curves[curves["agent"] == "ppo"]
    expected = fit_gao(np.sqrt(ppo["kl"]), ppo["gold_score"] - 0.05, "rl")  # pi_ref's gold is 0.05
    assert (fits["ppo"].kind, fits["ppo"].source) == ("rl", "curves.csv")
    assert (fits["ppo"].a, fits["ppo"].b) == pytest.approx(expected)
    reinforce = fits["reinforce"]  # its gold bumps up then falls: the curve turns over inside the data
    assert reinforce.b > 0 and reinforce.d_peak < reinforce.d_max
    assert float(reinforce.predict(reinforce.d_peak)) == pytest.approx(reinforce.b * reinforce.d_peak)
    # without curves RL agents fall back on their cells (4 distinct KLs for ppo: still a fit)
    assert gao_fits(results)["ppo"].source == "results.csv"


# --------------------------------------------------------------------------------------------------------
# make_report and the command
# --------------------------------------------------------------------------------------------------------
def test_make_report_writes_the_plots_and_the_markdown(run_dir):
    paths = make_report(run_dir)
    assert list(paths) == ["report", "frontier", "learning_curves", "overoptimisation"]
    for name in ("frontier", "learning_curves", "overoptimisation"):
        assert paths[name] == run_dir / f"{name}.png"
        assert paths[name].read_bytes()[:8] == PNG_MAGIC and paths[name].stat().st_size > 10_000
    report = paths["report"].read_text()
    assert "| ppo | 0.05 | 3 | 0.200 ± 0.248 |" in report
    assert all(f"({name}.png)" in report for name in ("frontier", "learning_curves", "overoptimisation"))
    assert "| ppo | d (a - b log d) |" in report and "| reinforce | d (a - b log d) |" in report
    assert not list(run_dir.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_missing_results_names_the_file_and_the_sweep_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `rlhf-gym sweep` first") as info:
        make_report(tmp_path)
    assert str(tmp_path / "results.csv") in str(info.value)


def test_missing_and_non_numeric_columns_are_named(run_dir):
    results = pd.read_csv(run_dir / "results.csv")
    results.drop(columns=["gold_score", "kl"]).to_csv(run_dir / "results.csv", index=False)
    with pytest.raises(DataError, match=r"results.csv lacks required column\(s\) 'kl', 'gold_score'"):
        make_report(run_dir)
    results.assign(kl=["high"] + [1.0] * 11).to_csv(run_dir / "results.csv", index=False)
    with pytest.raises(DataError, match="column 'kl' must be numeric; data row 1 holds 'high'"):
        make_report(run_dir)


def test_a_header_only_results_csv_is_one_line_naming_it(run_dir, capsys):
    """Issue 16: a header alone read as text columns and the numeric check indexed a row that is not there."""
    (run_dir / "results.csv").write_text(
        (DATA / "sweep_results.csv").read_text().splitlines()[0] + "\n"
    )  # the full header, no row
    with pytest.raises(DataError, match=r"results.csv holds a header but no rows: no cell has finished yet"):
        make_report(run_dir)
    from rlhf_gym import cli

    assert cli.main(["report", str(run_dir)]) == 1  # no finished sweep to report on, as a missing file
    err = capsys.readouterr().err
    assert (
        err
        == f"rlhf-gym report: error: {run_dir / 'results.csv'} holds a header but no rows: no cell has finished yet\n"
    )


def test_non_finite_values_are_counted_marked_and_named(run_dir, capsys):
    """Issue 16: a NaN/inf in one seed is left out of the mean, which then says over how many seeds it is, is
    marked † with a footnote, and named in report.md and in a warning line of `rlhf-gym report`; gold's NaN
    (no gold reward for that cell) is "not recorded" as before, not a non-finite value."""
    from rlhf_gym import cli
    from rlhf_gym.report import non_finite_cells

    results = pd.read_csv(run_dir / "results.csv")
    results.loc[1, "kl"] = math.inf  # ppo, beta 0.05, seed 1
    results.loc[2, "rm_score"] = math.nan  # ppo, beta 0.05, seed 2
    results.loc[7, "gold_score"] = math.nan  # reinforce, beta 0.05, seed 1: no gold there
    results.to_csv(run_dir / "results.csv", index=False)
    rows = read_results(run_dir / "results.csv")
    assert non_finite_cells(rows) == [
        ("ppo-b0.05-s1", "kl", math.inf),
        ("ppo-b0.05-s2", "rm_score", pytest.approx(math.nan, nan_ok=True)),
    ]
    summary = summarise(rows).set_index(["agent", "beta"])
    ppo = summary.loc[("ppo", 0.05)]
    assert (ppo["kl_n"], ppo["kl_bad"], ppo["rm_score_n"], ppo["rm_score_bad"]) == (2, 1, 2, 1)
    assert ppo["kl_mean"] == pytest.approx(np.mean([2.0, 2.4]))  # seeds 0 and 2 of the fixture
    reinforce = summary.loc[("reinforce", 0.05)]
    assert (reinforce["gold_score_n"], reinforce["gold_score_bad"]) == (2, 0)
    table = markdown_table(summarise(rows))
    ppo_line = next(line for line in table.splitlines() if line.startswith("| ppo | 0.05 |"))
    _, _, seeds, gold, proxy, kl, *_ = ppo_line.split(" | ")
    assert seeds == "3" and "†" not in gold
    assert proxy.endswith("(2 of 3 seeds) †") and kl.endswith("(2 of 3 seeds) †")
    reinforce_line = next(line for line in table.splitlines() if line.startswith("| reinforce | 0.05 |"))
    assert "(2 of 3 seeds)" in reinforce_line and "†" not in reinforce_line  # gold not recorded: no mark
    assert table.rstrip().endswith(
        "† Non-finite values (NaN or inf) in results.csv, left out of these means (each entry says over how "
        "many seeds it is): agent=ppo beta=0.05: rm_score in 1 of 3 seeds, kl in 1 of 3 seeds."
    )
    report = make_report(run_dir)["report"].read_text()
    assert "**Non-finite values**: results.csv holds 2 non-finite value(s)" in report
    assert "ppo-b0.05-s1 kl=inf, ppo-b0.05-s2 rm_score=nan" in report and "† Non-finite values" in report
    assert cli.main(["report", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert err == (
        f"rlhf-gym report: warning: {run_dir / 'results.csv'} holds 2 non-finite value(s) (NaN or inf), left out "
        "of the means, whose entries say over how many seeds they are and are marked †: ppo-b0.05-s1 kl=inf, "
        "ppo-b0.05-s2 rm_score=nan\n"
    )
    assert "(2 of 3 seeds) †" in out


def test_an_infinite_gold_is_non_finite_but_a_missing_one_is_no_gold():
    rows = pd.DataFrame(_rows("ppo", 1, [0, 1, 2], [0.1, math.inf, math.nan]))
    summary = summarise(rows)
    assert (summary["gold_score_n"].item(), summary["gold_score_bad"].item()) == (1, 1)
    line = markdown_table(summary).splitlines()[2]
    assert "| 0.100 (1 of 3 seeds) † |" in line
    all_bad = summarise(pd.DataFrame(_rows("ppo", 1, [0, 1], [math.inf, -math.inf])))
    assert "| n/a † |" in markdown_table(all_bad)  # no finite value left: not "no gold"
    lost = summarise(pd.DataFrame(_rows("ppo", 1, [0, 1], [0.1, 0.2])).assign(length=[20.0, math.nan]))
    assert lost["length_bad"].item() == 1  # a metric this agent reports, lost by one seed
    never = summarise(pd.DataFrame(_rows("ppo", 1, [0, 1], [0.1, 0.2])).assign(length=math.nan))
    assert never["length_bad"].item() == 0  # a metric this agent never reports: "n/a", not a fault
    assert summarise(pd.DataFrame(_rows("ppo", 1, [0], [0.1])).assign(kl=math.nan))["kl_bad"].item() == 1


def _report_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-gym")
    add_report_command(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.handler(args)


def test_report_command_without_curves_prints_the_table_and_skips_the_learning_curves(
    run_dir, tmp_path_factory, capsys
):
    (run_dir / "curves.csv").unlink()
    assert _report_command(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "| reinforce | 0.1 | 3 | 0.400 ± 0.124 |" in out
    assert f"frontier: {run_dir / 'frontier.png'}" in out and f"report: {run_dir / 'report.md'}" in out
    assert "learning_curves" not in out and not (run_dir / "learning_curves.png").exists()
    assert (run_dir / "overoptimisation.png").read_bytes()[:8] == PNG_MAGIC
    assert "No curves.csv: learning curves skipped" in (run_dir / "report.md").read_text()
    empty = tmp_path_factory.mktemp("empty")
    assert _report_command(["report", str(empty)]) == 1
    assert "rlhf-gym sweep" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# Run folders written before issue 11 (old column names, no `learns`)
# --------------------------------------------------------------------------------------------------------
OLD_TO_NEW = "proxy_reward -> rm_score, gold_reward -> gold_score, ref_proxy_reward -> ref_rm_score, "


@pytest.fixture()
def old_run_dir(tmp_path: Path) -> Path:
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(DATA / "sweep_results_old_names.csv", old / "results.csv")
    shutil.copy(DATA / "sweep_curves_old_names.csv", old / "curves.csv")
    return old


def test_old_column_names_are_read_under_the_new_names_with_a_warning(old_run_dir):
    with pytest.warns(OldColumnsWarning, match=f"results.csv uses old column names \\({OLD_TO_NEW}"):
        results = read_results(old_run_dir / "results.csv")
    assert issubclass(OldColumnsWarning, DeprecationWarning)
    new = read_results(DATA / "sweep_results.csv")
    assert set(new.columns) - set(results.columns) == {"learns", "reward"}  # what the old writer lacked
    pd.testing.assert_frame_equal(results, new[results.columns])
    with pytest.warns(
        OldColumnsWarning, match="curves.csv uses old column names \\(proxy_reward -> rm_score"
    ):
        curves = read_curves(old_run_dir / "curves.csv")
    pd.testing.assert_frame_equal(
        curves, read_curves(DATA / "sweep_curves.csv")[curves.columns], check_dtype=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file in the new names reads without a word
        read_results(DATA / "sweep_results.csv")


def test_an_old_run_folder_gets_the_same_report_and_a_note(old_run_dir, run_dir, capsys):
    with pytest.warns(OldColumnsWarning):
        make_report(old_run_dir)
    old_report = (old_run_dir / "report.md").read_text()
    new_report = make_report(run_dir)["report"].read_text()
    table = new_report.split("## Plots")[0].split("\n", 2)[2]  # past the title, which names the folder
    assert table in old_report
    assert f"- results.csv uses old column names ({OLD_TO_NEW}" in old_report.split("## Notes")[1]
    assert "## Notes" not in new_report
    with pytest.warns(OldColumnsWarning):
        assert _report_command(["report", str(old_run_dir)]) == 0
    err = capsys.readouterr().err
    assert err.count("rlhf-gym report: note:") == 1 and f"({OLD_TO_NEW}" in err


def test_old_and_new_names_in_one_file_or_a_frame_are_errors_that_say_what_to_do(old_run_dir):
    results = pd.read_csv(old_run_dir / "results.csv")
    with pytest.raises(
        DataError, match="old names: 'proxy_reward' -> 'rm_score', 'gold_reward' -> 'gold_score'"
    ):
        summarise(results)  # a frame read without read_results keeps the old names
    results.assign(rm_score=1.0).to_csv(old_run_dir / "results.csv", index=False)
    with pytest.raises(DataError, match="has both 'proxy_reward' \\(the old name\\) and 'rm_score'"):
        read_results(old_run_dir / "results.csv")


# --------------------------------------------------------------------------------------------------------
# Best-of-n's KL: the estimate as `kl`, the analytic upper bound as `kl_bound`
# --------------------------------------------------------------------------------------------------------
def _bon_run_dir(tmp_path: Path) -> Path:
    """The fixture's RL cells plus best-of-n cells (n = 4, 16; 2 seeds) whose estimated kl is below kl_bound."""
    bon = [
        {"cell": f"bon-{n}-{seed}", "agent": "best_of_n", "seed": seed, "beta": 0.05, "learns": False, "n": n}
        | {"rm_score": 1.0, "gold_score": 0.2, "kl": kl, "kl_bound": best_of_n_kl(n)}
        | {"ref_rm_score": 0.5, "ref_gold_score": 0.05}
        for n, estimates in ((4, (0.30, 0.34)), (16, (0.9, 1.0)))
        for seed, kl in enumerate(estimates)
    ]
    results = pd.concat([pd.read_csv(DATA / "sweep_results.csv"), pd.DataFrame(bon)])
    results.to_csv(tmp_path / "results.csv", index=False)  # the RL rows' n and kl_bound: empty, as a sweep's
    return tmp_path


def test_the_table_shows_best_of_ns_estimate_as_kl_and_its_upper_bound(tmp_path):
    lines = markdown_table(summarise(read_results(_bon_run_dir(tmp_path) / "results.csv"))).splitlines()
    assert lines[0] == "| agent | beta | n | seeds | gold | proxy | KL | KL upper bound | length | time (s) |"
    # KL: 0.30, 0.34 -> 0.320 ± 12.706 * 0.0283 / sqrt 2 = 0.254; 0.9, 1.0 -> 0.950 ± 0.635.
    # The bound log n - (n-1)/n: 0.636 (n = 4), 1.835 (n = 16), the same for every seed.
    assert lines[2] == "| pi_ref |  |  |  | 0.050 | 0.500 | 0.000 |  |  |  |"
    assert (
        lines[3]
        == "| best_of_n | 0.05 | 4 | 2 | 0.200 ± 0.000 | 1.000 ± 0.000 | 0.320 ± 0.254 | 0.636 ± 0.000 | n/a | n/a |"
    )
    assert (
        lines[4]
        == "| best_of_n | 0.05 | 16 | 2 | 0.200 ± 0.000 | 1.000 ± 0.000 | 0.950 ± 0.635 | 1.835 ± 0.000 | n/a | n/a |"
    )
    assert (
        lines[5]
        == "| ppo | 0.05 |  | 3 | 0.200 ± 0.248 | 1.200 ± 0.497 | 2.200 ± 0.497 | n/a | 22.0 ± 5.0 | 66.0 ± 14.9 |"
    )
    # a sweep with no bound anywhere has no such column (test_markdown_table_shows_the_hand_computed_cells)


def test_the_report_says_which_kl_is_the_estimate_and_which_the_upper_bound(tmp_path):
    run_dir = _bon_run_dir(tmp_path)
    text = make_report(run_dir)["report"].read_text()
    assert (
        "best_of_n learn nothing (`learns = False`): their KL is that of the response they select, " in text
    )
    assert "estimated from their samples" in text and "KL upper bound is the analytic log n - (n-1)/n" in text
    assert "analytic" not in text.replace("KL upper bound is the analytic", "")  # never the KL itself
    # a run folder written before the estimate: its best-of-n `kl` is the bound, and the report says so
    old = tmp_path / "old"
    old.mkdir()
    pd.read_csv(run_dir / "results.csv").drop(columns="kl_bound").to_csv(old / "results.csv", index=False)
    old_text = make_report(old)["report"].read_text()
    assert "an upper bound on that KL, not an estimate" in old_text and "KL upper bound |" not in old_text


def test_the_frontier_draws_the_upper_bound_beside_the_estimate(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(report_plots, "_save", lambda fig, path: figures.append(fig) or Path(path))
    report_plots.plot_frontier(read_results(_bon_run_dir(tmp_path) / "results.csv"), tmp_path / "f.png")
    for ax in figures[0].axes:
        (bound,) = [line for line in ax.lines if line.get_label() == "best_of_n: KL upper bound"]
        np.testing.assert_allclose(bound.get_xdata(), [best_of_n_kl(4), best_of_n_kl(16)])
        assert bound.get_markerfacecolor() == "none"
        (dotted,) = [c for c in ax.collections if c.get_gid() == "best_of_n: KL upper bound"]
        starts = [segment[0][0] for segment in dotted.get_segments()]
        ends = [segment[1][0] for segment in dotted.get_segments()]
        np.testing.assert_allclose(starts, [0.32, 0.95])
        np.testing.assert_allclose(ends, [best_of_n_kl(4), best_of_n_kl(16)])
        assert sorted(t.get_text() for t in ax.texts) == ["n=16", "n=4"]
