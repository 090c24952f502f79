"""Sweeps: the grid, the CSV contract (the report reads what the sweep writes, in the agents' metric names),
the report from it, agents declared as learning nothing, old run folders, and resuming after a kill."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml

from agents.best_of_n import BestOfNAgent
from agents.registry import _REGISTRY
from rlhf_base.config import config_to_dict, load_config
from rlhf_base.metrics import METRIC_KEYS, OPTIONAL_METRIC_KEYS
from rlhf_gym.report import OldColumnsWarning, gao_fits, make_report, read_curves, read_results
from rlhf_gym.report.schema import CURVE_METRICS, REF_METRICS
from rlhf_gym.sweep import (
    RESULT_METRICS,
    SweepConfig,
    _append_rows,
    _reference_metrics,
    expand_cells,
    finished_cells,
    run_sweep,
)
from text_env.config import EnvConfig

DATA = Path(__file__).parent / "data"

TINY = {
    "agents": ["reinforce", "best_of_n"],
    "betas": [0.05],
    "seeds": [0, 1],
    "env": {"max_new_tokens": 8, "num_envs": 8},
    "overrides": [
        "reinforce.iterations=2",
        "reinforce.samples_per_prompt=2",
        "best_of_n.iterations=1",
        "best_of_n.samples_per_prompt=2",
        "best_of_n.prompts_per_iteration=4",
    ],
    "eval_episodes": 8,
    "workers": 1,
}


def _config(tmp_path: Path, **extra) -> SweepConfig:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**TINY, "runs_root": str(tmp_path / "runs"), "name": "tiny", **extra}))
    return load_config(SweepConfig, path)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_grid_expansion_routes_keys_to_the_right_config():
    config = SweepConfig(
        agents=["ppo", "best_of_n"],
        betas=[0.05, 0.1],
        seeds=[0, 1, 2],
        grid={"best_of_n.samples_per_prompt": [4, 16, 64], "env.max_new_tokens": [16]},
        overrides=["agent.seed=5"],
    )
    cells = expand_cells(config)
    assert len(cells) == 2 * 3 * 1 + 2 * 3 * 3 * 1  # n multiplies best-of-n's cells only
    bon = [c for c in cells if c.agent == "best_of_n"]
    assert {dict(c.swept)["samples_per_prompt"] for c in bon} == {4, 16, 64}
    assert all(f"samples_per_prompt={dict(c.swept)['samples_per_prompt']}" in c.agent_overrides for c in bon)
    assert all(c.env_overrides == ("max_new_tokens=16",) for c in cells)
    assert len({c.id for c in cells}) == len(cells), "cell ids are unique"
    with pytest.raises(ValueError, match="needs a prefix"):
        expand_cells(SweepConfig(grid={"lr": [1]}))


@pytest.mark.parametrize("key", ["ppo.beta", "agent.beta", "env.beta"])
def test_beta_has_one_owner_in_a_sweep_its_betas(key):
    with pytest.raises(
        ValueError, match=rf"sweep key '{key}': a sweep sets the env's beta per cell from `betas`"
    ):
        expand_cells(SweepConfig(agents=["ppo"], grid={key: [0.1]}))
    with pytest.raises(ValueError, match=rf"sweep key '{key}': .*from `betas`"):
        expand_cells(SweepConfig(agents=["ppo"], overrides=[f"{key}=0.1"]))
    with pytest.raises(
        ValueError, match=r"env\.beta=0\.1 would be ignored: each cell's beta comes from `betas`"
    ):
        expand_cells(SweepConfig(agents=["ppo"], env=EnvConfig(beta=0.1)))
    cells = expand_cells(SweepConfig(agents=["ppo"], seeds=[0], betas=[0.1, 0.2], env=EnvConfig(beta=0.1)))
    assert [c.beta for c in cells] == [0.1, 0.2]


def test_the_batch_size_is_the_envs_in_a_sweep_too():
    with pytest.raises(
        ValueError, match=r"sweep key 'ppo.num_envs': the env owns the batch size.*use 'env.num_envs'"
    ):
        expand_cells(SweepConfig(agents=["ppo"], overrides=["ppo.num_envs=8"]))
    (cell,) = expand_cells(SweepConfig(agents=["ppo"], seeds=[0], overrides=["env.num_envs=8"]))
    assert cell.env_overrides == ("num_envs=8",)


def test_tiny_sweep_writes_the_csv_table_and_plots(tmp_path):
    run_dir = run_sweep(_config(tmp_path), progress=False)
    rows = _rows(run_dir / "results.csv")
    assert len(rows) == 4
    assert list(rows[0]) == ["cell", "agent", "seed", "beta", "learns", *RESULT_METRICS, *REF_METRICS]
    assert {r["agent"]: r["learns"] for r in rows} == {"reinforce": "True", "best_of_n": "False"}
    bon = [r for r in rows if r["agent"] == "best_of_n"]
    assert float(bon[0]["kl_bound"]) == pytest.approx(0.6931 - 0.5, abs=1e-3), "the bound log n - (n-1)/n"
    assert 0.0 < float(bon[0]["kl"]) <= float(bon[0]["kl_bound"]), "best-of-n's kl is its estimate"
    assert all(r["kl_bound"] == "nan" for r in rows if r["agent"] == "reinforce")  # no bound: NaN
    assert {p.name for p in (run_dir / "tensorboard").iterdir()} == {r["cell"] for r in rows}
    curves = _rows(run_dir / "curves.csv")
    assert list(curves[0]) == ["cell", "agent", "seed", "beta", "iteration", *CURVE_METRICS]
    assert {r["cell"] for r in curves} == {r["cell"] for r in rows}
    # one vocabulary: every metric column is an agent metric name, and the report reads the files silently
    assert (
        set(RESULT_METRICS) - {"iterations"}
        == set(CURVE_METRICS)
        == (set(METRIC_KEYS) - {"iteration"}) | set(OPTIONAL_METRIC_KEYS)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", OldColumnsWarning)
        results = read_results(run_dir / "results.csv")
        assert len(read_curves(run_dir / "curves.csv")) == len(curves)
    assert results["rm_score"].tolist() == [float(r["rm_score"]) for r in rows]
    paths = make_report(run_dir)
    text = paths["report"].read_text()
    assert "| reinforce |" in text and "| best_of_n |" in text and "pi_ref" in text
    for key in ("frontier", "learning_curves", "overoptimisation"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_killed_sweep_resumes_and_runs_only_the_missing_cells(tmp_path):
    config = _config(tmp_path)
    config_path = tmp_path / "sweep.yaml"
    results = Path(config.runs_root) / config.name / "results.csv"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_gym.cli", "sweep", "--config", str(config_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (results.is_file() and len(_rows(results)) >= 1):
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # mid-sweep, as a crash or Ctrl-C would
    finally:
        proc.wait()
    first = _rows(results)
    assert 1 <= len(first) < 4, "killed after at least one and before all cells"
    run_sweep(config, progress=False)
    rows = _rows(results)
    assert len(rows) == 4 and len({r["cell"] for r in rows}) == 4, "each cell exactly once"
    assert rows[: len(first)] == first, "finished cells were not rerun"
    assert finished_cells(results.parent) == {c.id for c in expand_cells(config)}


class RenamedSampler(BestOfNAgent):
    """A user's own sampling agent: best-of-n under another name, declaring `learns = False` by inheritance."""

    name = "my_sampler"


def test_a_registered_sampling_agent_is_written_and_reported_as_best_of_n_is(tmp_path, monkeypatch):
    monkeypatch.setitem(_REGISTRY, "my_sampler", RenamedSampler)
    config = _config(
        tmp_path,
        agents=["my_sampler"],
        seeds=[0],
        grid={"my_sampler.samples_per_prompt": [2, 4, 8]},
        overrides=["my_sampler.iterations=1", "my_sampler.prompts_per_iteration=4"],
    )
    run_dir = run_sweep(config, progress=False)
    rows = _rows(run_dir / "results.csv")
    assert [(r["samples_per_prompt"], r["learns"]) for r in rows] == [
        ("2", "False"),
        ("4", "False"),
        ("8", "False"),
    ]
    fit = gao_fits(read_results(run_dir / "results.csv"), read_curves(run_dir / "curves.csv"))["my_sampler"]
    assert (fit.kind, fit.source) == ("bon", "results.csv")  # one point per n, best-of-n's form
    assert "| my_sampler | d (a - b d) |" in make_report(run_dir)["report"].read_text()


def test_resuming_an_old_run_folder_upgrades_its_header_before_appending(tmp_path):
    path = tmp_path / "results.csv"
    shutil.copy(DATA / "sweep_results_old_names.csv", path)
    old = _rows(path)
    new_row = {**_rows(DATA / "sweep_results.csv")[0], "cell": "new-cell"}
    _append_rows(path, [new_row])
    rows = _rows(path)
    assert "proxy_reward" not in rows[0] and "rm_score" in rows[0]
    assert [r["rm_score"] for r in rows[:-1]] == [r["proxy_reward"] for r in old]  # old rows kept, renamed
    assert [r["learns"] for r in rows] == [""] * len(old) + ["True"]  # unknown for old rows: the class says
    assert rows[-1]["cell"] == "new-cell"
    with warnings.catch_warnings():
        warnings.simplefilter("error", OldColumnsWarning)
        assert len(read_results(path)) == len(old) + 1


def test_rerunning_a_finished_old_sweep_renames_its_columns_and_runs_nothing(tmp_path):
    config = _config(tmp_path, agents=[])  # no cell left to run, as for a finished sweep
    run_dir = Path(config.runs_root) / config.name
    run_dir.mkdir(parents=True)
    shutil.copy(DATA / "sweep_results_old_names.csv", run_dir / "results.csv")
    shutil.copy(DATA / "sweep_curves_old_names.csv", run_dir / "curves.csv")
    run_sweep(config, progress=False)
    assert "rm_score" in _rows(run_dir / "results.csv")[0] and "rm_score" in _rows(run_dir / "curves.csv")[0]
    assert len(_rows(run_dir / "curves.csv")) == len(_rows(DATA / "sweep_curves_old_names.csv"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", OldColumnsWarning)
        make_report(run_dir)


def test_a_cached_reference_in_old_names_is_read_in_the_new(tmp_path):
    config = SweepConfig()
    key = json.dumps(config_to_dict(config.env), sort_keys=True)
    metrics = {"ref_proxy_reward": 0.5, "ref_gold_reward": 0.05}
    (tmp_path / "reference.json").write_text(json.dumps({"env": key, "metrics": metrics}))
    assert _reference_metrics(config, tmp_path) == {"ref_rm_score": 0.5, "ref_gold_score": 0.05}
