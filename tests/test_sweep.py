"""Sweeps: the grid, the CSV contract, the report from it, and resuming after a kill."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlhf_base.config import load_config
from rlhf_gym.report import make_report
from rlhf_gym.sweep import RESULT_METRICS, SweepConfig, expand_cells, finished_cells, run_sweep
from text_env.config import EnvConfig

TINY = {
    "agents": ["reinforce", "best_of_n"],
    "betas": [0.05],
    "seeds": [0, 1],
    "env": {"max_new_tokens": 8, "num_envs": 8},
    "overrides": [
        "reinforce.iterations=2",
        "reinforce.k=2",
        "best_of_n.iterations=1",
        "best_of_n.n=2",
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
        grid={"best_of_n.n": [4, 16, 64], "env.max_new_tokens": [16]},
        overrides=["agent.seed=5"],
    )
    cells = expand_cells(config)
    assert len(cells) == 2 * 3 * 1 + 2 * 3 * 3 * 1  # n multiplies best-of-n's cells only
    bon = [c for c in cells if c.agent == "best_of_n"]
    assert {dict(c.swept)["n"] for c in bon} == {4, 16, 64}
    assert all("n=" + str(dict(c.swept)["n"]) in c.agent_overrides for c in bon)
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
    for column in ("cell", "agent", "seed", "beta", *RESULT_METRICS, "ref_proxy_reward", "ref_gold_reward"):
        assert column in rows[0], column
    assert {r["agent"] for r in rows} == {"reinforce", "best_of_n"}
    bon = [r for r in rows if r["agent"] == "best_of_n"]
    assert float(bon[0]["kl"]) == pytest.approx(0.6931 - 0.5, abs=1e-3), "best-of-n reports log n - (n-1)/n"
    assert {p.name for p in (run_dir / "tensorboard").iterdir()} == {r["cell"] for r in rows}
    curves = _rows(run_dir / "curves.csv")
    assert {r["cell"] for r in curves} == {r["cell"] for r in rows}
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
