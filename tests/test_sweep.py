"""Sweeps: the grid, the CSV contract (the report reads what the sweep writes, in the agents' metric names),
the report from it, agents declared as learning nothing, a cell's identity (a changed setting is a new cell;
results of other settings are refused), misspelt keys, old run folders, and resuming after a kill.

Kills at every step of recording a cell, damaged files, the folder lock and workers dying with the sweep are
in tests/test_sweep_faults.py."""

from __future__ import annotations

import csv
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
from rlhf_base.config import ConfigError, load_config
from rlhf_base.metrics import METRIC_KEYS, OPTIONAL_METRIC_KEYS
from rlhf_gym import cli
from rlhf_gym.report import OldColumnsWarning, gao_fits, make_report, read_curves, read_results
from rlhf_gym.report.schema import CURVE_METRICS, REF_METRICS
from rlhf_gym.sweep import (
    RESULT_METRICS,
    StaleResults,
    SweepConfig,
    check_cells,
    expand_cells,
    finished_cells,
    plan_cells,
    run_sweep,
    sweep_notes,
)
from rlhf_gym.sweep_store import RecordWarning
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
    assert len({c.id for c, _ in plan_cells(config)}) == len(cells), "cell ids are unique"
    with pytest.raises(ValueError, match="has no id yet.*plan_cells"):
        cells[0].id  # noqa: B018 (an id needs the cell's identity)
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
    assert finished_cells(results.parent) == {c.id for c, _ in plan_cells(config)}


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


def test_a_folder_from_before_records_is_refused_then_set_aside_with_force(tmp_path):
    """Its rows do not record the settings they ran with (issue 16: they may be stale), so they are never
    taken as finished cells: refused, or with `force` kept in stale/ while the cells run again."""
    config = _config(tmp_path, agents=[])  # no cell: the folder's own files are the point here
    run_dir = Path(config.runs_root) / config.name
    run_dir.mkdir(parents=True)
    shutil.copy(DATA / "sweep_results_old_names.csv", run_dir / "results.csv")
    shutil.copy(DATA / "sweep_curves_old_names.csv", run_dir / "curves.csv")
    rows = len(_rows(DATA / "sweep_results_old_names.csv"))
    with pytest.raises(
        StaleResults,
        match=rf"from before per-cell records: its results.csv and curves.csv \({rows} result row\(s\)\).*--force",
    ):
        run_sweep(config, progress=False)
    assert (run_dir / "results.csv").read_bytes() == (DATA / "sweep_results_old_names.csv").read_bytes()
    assert not (run_dir / "sweep.yaml").exists(), "a refused sweep writes nothing"
    run_sweep(config, progress=False, force=True)
    (kept,) = (run_dir / "stale").glob("results.before-records-*.csv")
    assert kept.read_bytes() == (DATA / "sweep_results_old_names.csv").read_bytes()
    assert not (run_dir / "results.csv").exists(), "no current cell has finished"
    run_sweep(config, progress=False)  # no longer refused


#: The settings that decide only where and how fast cells run, or where the results go.
NOT_IDENTITY = {
    "workers": 2,
    "backend": "ray",
    "ray_address": "auto",
    "cell_resources": {"num_cpus": 2},
    "name": "other",
    "runs_root": "elsewhere",
}


def test_a_cell_id_covers_every_setting_that_changes_its_result(tmp_path, monkeypatch):
    """Issue 16: an id of agent, beta, seed and the swept values alone let a rerun with other overrides or
    another env keep the old numbers. The id now hashes the resolved configs and the inputs' content."""
    monkeypatch.chdir(tmp_path)
    Path("prompts.jsonl").write_text('{"prompt": "I liked"}\n{"prompt": "It was"}\n')
    Path("reinforce.yaml").write_text("learning_rate: 0.001\n")
    base = {
        "env": {**TINY["env"], "prompts": "prompts.jsonl"},
        "agent_configs": {"reinforce": "reinforce.yaml"},
    }

    def ids(**extra) -> list[str]:
        return [cell.id for cell, _ in plan_cells(_config(tmp_path, **{**base, **extra}))]

    first = ids()
    assert [i.rsplit("-", 1)[0] for i in first] == [
        "reinforce-b0.05-s0",
        "reinforce-b0.05-s1",
        "best_of_n-b0.05-s0",
        "best_of_n-b0.05-s1",
    ], "the readable prefix stays"
    assert ids() == first, "stable"
    changed = {
        "overrides": [*TINY["overrides"], "agent.iterations=3"],
        "env": {**base["env"], "max_new_tokens": 6},
        "eval_episodes": 16,
        "threads_per_worker": 2,
    }
    for key, value in changed.items():
        assert not set(ids(**{key: value})) & set(first), f"{key} changes every cell"
    for key, value in NOT_IDENTITY.items():
        assert ids(**{key: value}) == first, f"{key} changes no result"
    Path("reinforce.yaml").write_text("learning_rate: 0.002\n")  # the agent's file: its content counts
    assert ids()[:2] != first[:2] and ids()[2:] == first[2:]
    Path("prompts.jsonl").write_text('{"prompt": "I hated"}\n{"prompt": "It was"}\n')  # an input file
    assert not set(ids()) & set(first)
    (cell, identity), *_ = plan_cells(_config(tmp_path, **base))
    assert identity["inputs"]["prompts.jsonl"].startswith("sha256:")
    assert identity["agent"]["learning_rate"] == 0.002 and identity["env"]["max_new_tokens"] == 8


def test_a_changed_setting_is_refused_naming_it_and_force_runs_those_cells_again(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    Path("prompts.jsonl").write_text('{"prompt": "I liked"}\n{"prompt": "It was"}\n')
    env = {**TINY["env"], "prompts": "prompts.jsonl"}
    config = _config(tmp_path, agents=["reinforce"], env=env)
    run_dir = run_sweep(config, progress=False)
    before = _rows(run_dir / "results.csv")
    saved = (run_dir / "sweep.yaml").read_text()
    longer = _config(
        tmp_path, agents=["reinforce"], env=env, overrides=[*TINY["overrides"], "reinforce.iterations=3"]
    )
    with pytest.raises(
        StaleResults, match=r"2 cell\(s\) .*: reinforce\.iterations: 2 -> 3\. Refusing .*--force"
    ):
        run_sweep(longer, progress=False)
    Path("prompts.jsonl").write_text('{"prompt": "I hated"}\n{"prompt": "It was"}\n')
    with pytest.raises(StaleResults, match=r"the content of prompts\.jsonl"):
        run_sweep(config, progress=False)
    # The command line: one line naming both changes, exit 2; then --force.
    capsys.readouterr()
    assert cli.main(["sweep", "--config", str(tmp_path / "sweep.yaml")]) == 2  # the file holds `longer`
    err = capsys.readouterr().err
    assert err.startswith("rlhf-gym sweep: error: ") and err.count("\n") == 1
    assert "reinforce.iterations: 2 -> 3; the content of prompts.jsonl" in err
    assert (run_dir / "sweep.yaml").read_text() == saved, "a refused config is not saved as the folder's"
    assert _rows(run_dir / "results.csv") == before
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecordWarning)  # nothing is damaged: the old rows are not "torn"
        assert cli.main(["sweep", "--config", str(tmp_path / "sweep.yaml"), "--force"]) == 0
    assert "force: 2 record(s) of other settings set aside" in capsys.readouterr().out
    after = _rows(run_dir / "results.csv")
    assert [r["iterations"] for r in after] == ["3", "3"], "the cells ran again, with the new settings"
    assert {r["cell"] for r in after}.isdisjoint(r["cell"] for r in before)
    assert {p.stem for p in (run_dir / "stale").glob("*.json")} == {r["cell"] for r in before}, "kept aside"
    assert {p.name for p in (run_dir / "tensorboard").iterdir()} == {r["cell"] for r in after}
    assert len(_rows(run_dir / "curves.csv")) == 2 * 3, "no curve row of the old cells"
    run_sweep(longer, progress=False)  # rerun: nothing stale now, nothing to run
    assert _rows(run_dir / "results.csv") == after
    more = _config(tmp_path, agents=["reinforce"], env=env, overrides=longer.overrides, seeds=[0, 1, 2])
    capsys.readouterr()
    run_sweep(more)  # a new seed (or beta, or grid value) adds cells; the others' settings are unchanged
    assert "3 cells, 2 done, 1 to run" in capsys.readouterr().out
    assert _rows(run_dir / "results.csv")[:2] == after


def test_a_misspelt_key_fails_at_planning_with_did_you_mean():
    """Issue 16: a key whose prefix named no agent of the sweep was taken for another agent's and dropped."""
    for key in ("best_of_m.samples_per_prompt", "envv.max_new_tokens", "agnet.learning_rate"):
        with pytest.raises(
            ConfigError, match=rf"sweep key '{key}': .* is neither 'env', 'agent' nor an agent"
        ):
            expand_cells(SweepConfig(agents=["best_of_n"], overrides=[f"{key}=4"]))
    with pytest.raises(ConfigError, match=r"did you mean 'best_of_n'\?"):
        expand_cells(SweepConfig(agents=["ppo", "best_of_n"], grid={"best_of_m.samples_per_prompt": [4, 16]}))
    with pytest.raises(ConfigError, match=r"did you mean 'env'\?"):
        expand_cells(SweepConfig(agents=["ppo"], overrides=["envv.max_new_tokens=8"]))
    # A field the agent's config lacks fails at planning, before any cell, naming the cell and the key.
    for bad in ({"overrides": ["best_of_n.nosuch=1"]}, {"grid": {"agent.nosuch": [1, 2]}}):
        config = SweepConfig(agents=["best_of_n"], seeds=[0], **bad)
        with pytest.raises(ConfigError, match=r"sweep cell best_of_n-b0.05-s0.*unknown key 'nosuch'"):
            check_cells(expand_cells(config), config)
    # A registered agent outside the sweep (a shipped config narrowed with agents=[...]) is said, not an error.
    narrowed = SweepConfig(agents=["reinforce"], seeds=[0], overrides=["ppo.iterations=40"])
    assert [c.agent_overrides for c in expand_cells(narrowed)] == [()]
    assert "not in this sweep's agents, so not used: ppo.iterations" in sweep_notes(narrowed)
    with pytest.raises(ConfigError, match=r"grid 'best_of_n.samples_per_prompt' lists no value"):
        expand_cells(SweepConfig(agents=["best_of_n"], grid={"best_of_n.samples_per_prompt": []}))
    with pytest.raises(ConfigError, match=r"seeds lists 1 twice"):
        expand_cells(SweepConfig(agents=["best_of_n"], seeds=[0, 1, 1]))
