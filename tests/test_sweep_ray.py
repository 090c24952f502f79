"""Sweeps as Ray tasks (issue 15): the same results.csv and curves.csv as the local backend, resuming after a
kill, failures and relative paths as the local workers see them, what each cell reserves, and the checks of
the Ray settings.

The tests that run cells share one local Ray instance of 2 CPUs (a module fixture: starting one takes ~5 s)
and skip, saying why, only where Ray is not installed (`pip install -e '.[ray]'`; `make test` installs it).
The settings' checks and the missing-Ray error run everywhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlhf_base.config import ConfigError, load_config
from rlhf_gym.sweep import FAILURES, CellResources, CellsFailed, SweepConfig, run_sweep, sweep_notes
from tests.test_sweep import TINY, _rows

RAY_MISSING = "Ray is not installed (an optional extra: pip install -e '.[ray]'; `make test` installs it)"
#: A timing, different on every run; every other column must match between the backends.
TIMED = ("wall_time",)


def _config(tmp_path: Path, name: str, **extra) -> SweepConfig:
    """TINY as a YAML file (the CLI reads it too) under tmp_path, run folder tmp_path/runs/NAME."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY, "runs_root": str(tmp_path / "runs"), "name": name, **extra}))
    return load_config(SweepConfig, path)


def _by_cell(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    """results.csv rows keyed by cell, without the timings."""
    return {row["cell"]: {k: v for k, v in row.items() if k not in TIMED} for row in rows}


def _curve_set(rows: list[dict[str, str]]) -> list[tuple]:
    """curves.csv rows as a sorted list, without the timings: the order cells finish in is not fixed."""
    return sorted(tuple(sorted((k, v) for k, v in row.items() if k not in TIMED)) for row in rows)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance with 2 CPUs for this module; yields its address (HOST:PORT), as `ray start` gives."""
    ray = pytest.importorskip("ray", reason=RAY_MISSING)
    saved = {k: v for k, v in os.environ.items() if k.startswith("RAY_")}
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no usage-stats prompt or upload
    ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=200 * 1024**2,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for key in [k for k in os.environ if k.startswith("RAY_")]:
            os.environ.pop(key)
        os.environ.update(saved)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    """TINY on the local backend, in this process: what a Ray sweep must reproduce."""
    return run_sweep(_config(tmp_path_factory.mktemp("local"), "tiny"), progress=False)


def test_a_ray_sweep_writes_what_the_local_backend_writes(ray_cluster, local_run, tmp_path):
    run_dir = run_sweep(_config(tmp_path, "tiny", backend="ray", workers=2), progress=False)
    rows, expected = _rows(run_dir / "results.csv"), _rows(local_run / "results.csv")
    assert list(rows[0]) == list(expected[0]), "the same columns, in the same order"
    assert _by_cell(rows) == _by_cell(expected), "the same cells, seeds and metrics"
    curves, expected_curves = _rows(run_dir / "curves.csv"), _rows(local_run / "curves.csv")
    assert list(curves[0]) == list(expected_curves[0])
    assert _curve_set(curves) == _curve_set(expected_curves)
    assert {p.name for p in (run_dir / "tensorboard").iterdir()} == {r["cell"] for r in rows}
    saved = yaml.safe_load((run_dir / "sweep.yaml").read_text())
    assert saved["backend"] == "ray" and saved["cell_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_a_killed_ray_sweep_resumes_and_runs_only_the_missing_cells(ray_cluster, local_run, tmp_path):
    """The sweep runs in the CLI, joined to the cluster by its address, one cell at a time, and is killed
    (SIGKILL) once a cell has landed; the rerun, in this process, runs only the others."""
    config = _config(tmp_path, "tiny", backend="ray", ray_address=ray_cluster, workers=1)
    results = Path(config.runs_root) / config.name / "results.csv"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    log = tmp_path / "sweep.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf_gym.cli", "sweep", "--config", str(tmp_path / "tiny.yaml")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (results.is_file() and len(_rows(results)) >= 1):
            assert proc.poll() is None, (
                f"the sweep ended before it could be killed:\n{log.read_text()[-3000:]}"
            )
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # mid-sweep, as a crash or a lost terminal would
    finally:
        proc.wait()
    first = _rows(results)
    assert 1 <= len(first) < 4, "killed after at least one and before all cells"
    run_sweep(config, progress=False)
    rows = _rows(results)
    assert len(rows) == 4 and len({r["cell"] for r in rows}) == 4, "each cell exactly once"
    assert rows[: len(first)] == first, "finished cells were not rerun"
    assert _by_cell(rows) == _by_cell(_rows(local_run / "results.csv")), "as an uninterrupted run"
    curves = _rows(results.parent / "curves.csv")
    assert _curve_set(curves) == _curve_set(_rows(local_run / "curves.csv")), "no curve row twice"


def test_relative_paths_and_failures_on_ray_read_as_on_the_local_backend(ray_cluster, tmp_path, monkeypatch):
    """A cell reads a relative path from the main process's folder; a cell that raises is recorded with its
    own error (not Ray's wrapper) and the worker's traceback, and the other cells go on."""
    monkeypatch.chdir(tmp_path)
    Path("prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("I liked", "It was")))
    config = _config(
        tmp_path,
        "paths",
        backend="ray",
        agents=["best_of_n"],
        seeds=[0],
        grid={"env.prompts": ["prompts.jsonl", "missing.jsonl"]},
    )
    with pytest.raises(CellsFailed, match=r"1 sweep cell\(s\) failed") as caught:
        run_sweep(config, progress=False)
    (row,) = _rows(caught.value.run_dir / "results.csv")
    assert row["env.prompts"] == "prompts.jsonl"
    (failure,) = [json.loads(line) for line in (caught.value.run_dir / FAILURES).read_text().splitlines()]
    assert failure["env.prompts"] == "missing.jsonl"
    assert failure["error"].startswith("DataError: ") and "missing.jsonl" in failure["error"]
    assert "in run_cell" in failure["traceback"], "the worker's traceback, chained as the cause"


def test_each_cell_holds_its_resources_on_ray(ray_cluster, tmp_path, monkeypatch):
    """What a task is given, seen from inside it; then a cell larger than every node is refused at once."""
    from rlhf_gym.sweep_ray import ray_backend

    def probe(cell, config):  # runs in a Ray worker (a local function: Ray sends it by value)
        import os

        import ray

        return ray.get_runtime_context().get_assigned_resources(), os.getcwd(), cell

    monkeypatch.chdir(tmp_path)
    config = SweepConfig(backend="ray", cell_resources=CellResources(num_cpus=2))
    with ray_backend(config, probe) as submit:
        assigned, folder, cell = submit("a cell").result(
            timeout=600
        )  # a guard against a hang, not a timing: loaded machines are slow
    assert assigned == {"CPU": 2.0} and folder == str(tmp_path) and cell == "a cell"

    too_big = _config(tmp_path, "big", backend="ray", cell_resources={"num_cpus": 3})
    with pytest.raises(ConfigError, match=r"num_cpus: 3, num_gpus: 0\) fit on no node .*2 CPU \+ 0 GPU"):
        run_sweep(too_big, progress=False)
    no_gpu = _config(tmp_path, "gpu", backend="ray", cell_resources={"num_gpus": 1}, env={"device": "cuda"})
    with pytest.raises(ConfigError, match=r"num_gpus: 1\) fit on no node"):
        run_sweep(no_gpu, progress=False)
    assert not (tmp_path / "runs" / "big" / "results.csv").exists(), "refused before any cell ran"


def test_a_sweep_that_stops_early_cancels_its_ray_tasks(ray_cluster):
    """An error in the main process (a full disk while recording, Ctrl-C) stops the cells in flight, rather
    than leaving them to hold the cluster's CPUs."""
    import ray

    from rlhf_gym.sweep_ray import ray_backend

    def sleeper(cell, config):
        import time

        time.sleep(600)

    with pytest.raises(OSError, match="disk full"):
        with ray_backend(SweepConfig(backend="ray"), sleeper) as submit:
            future = submit("a cell")
            time.sleep(1)  # started
            raise OSError("disk full")
    with pytest.raises(ray.exceptions.TaskCancelledError):
        future.result(timeout=60)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"backend": "dask"}, r"bad value for 'backend'.*expected one of 'local', 'ray', got 'dask'"),
        ({"ray_address": "head-node"}, r"ray_address='head-node' is not a Ray address; valid: null .*'auto'"),
        ({"ray_address": 6379}, r"bad value for 'ray_address'.*expected str \| None"),
        ({"cell_resources": {"num_cpu": 2}}, r"unknown key 'num_cpu'.*did you mean 'num_cpus'"),
        (
            {"cell_resources": {"num_cpus": -1}},
            r"CellResources.num_cpus = -1.*must be >= 0 \(valid range \[0, inf\)\)",
        ),
        ({"cell_resources": {"num_gpus": 1.5}}, r"num_gpus=1.5: Ray gives a task a share of one GPU"),
    ],
)
def test_the_ray_settings_are_checked_with_their_key_and_valid_values(tmp_path, setting, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, "bad", **setting)


def test_ray_addresses_that_are_valid():
    for address in (None, "auto", "10.0.0.5:6379", "head.cluster:6379", "ray://head.cluster:10001"):
        assert SweepConfig(backend="ray", ray_address=address).ray_address == address


def test_settings_that_would_do_nothing_are_noted():
    assert sweep_notes(SweepConfig(agents=["ppo"], seeds=[0])) == []
    assert sweep_notes(SweepConfig(agents=["ppo"], seeds=[0], ray_address="auto")) == [
        "ray_address apply to backend: ray only; this sweep's backend is local"
    ]
    ray = {"agents": ["ppo"], "seeds": [0], "backend": "ray"}
    (threads,) = sweep_notes(SweepConfig(**ray, threads_per_worker=4))
    assert threads.startswith("each cell runs 4 torch threads on 1 reserved CPU(s)")
    (gpu,) = sweep_notes(SweepConfig(**ray, cell_resources=CellResources(num_gpus=0.5)))
    assert gpu == "each cell reserves 0.5 GPU(s) but runs on env.device 'cpu'; set env.device: cuda"
    (cuda,) = sweep_notes(SweepConfig(**ray, overrides=["env.device=cuda"]))
    assert cuda.startswith("env.device is 'cuda' but cell_resources.num_gpus is 0")


def test_without_ray_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(ImportError, match=r"backend: ray needs Ray.*pip install -e '\.\[ray\]'"):
        run_sweep(_config(tmp_path, "noray", backend="ray"), progress=False)


def test_importing_the_package_and_its_cli_needs_no_ray():
    code = "import sys, rlhf_gym, rlhf_gym.sweep, rlhf_gym.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
