"""A sweep's run folder through kills, damaged files and a second sweep (issue 16).

* A sweep SIGKILLed at each step of recording a cell (`RLHF_GYM_FAULT=sweep-kill:POINT:N`, see
  `rlhf_gym.sweep_store`) and rerun gives exactly the results of an uninterrupted sweep (bar `wall_time`),
  with no row or curve row twice.
* A torn line in results.csv, a truncated or edited record and a torn reference.json are ignored with a
  warning, and what they held is computed again.
* A second sweep on a folder is refused naming the first one's PID; pool workers die with a SIGKILLed sweep.
"""

from __future__ import annotations

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

from rlhf_base.config import load_config
from rlhf_gym import cli
from rlhf_gym.sweep import FolderLocked, SweepConfig, run_sweep
from rlhf_gym.sweep_store import RecordWarning
from tests.test_sweep import TINY, _rows

#: A timing, different on every run; every other value must match the uninterrupted sweep's.
TIMED = ("wall_time",)


def _config(tmp_path: Path, name: str = "tiny", **extra) -> tuple[SweepConfig, Path]:
    """TINY as a YAML file (the CLI reads it too) and its config; the run folder is tmp_path/runs/NAME."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY, "runs_root": str(tmp_path / "runs"), "name": name, **extra}))
    return load_config(SweepConfig, path), path


def _untimed(path: Path) -> list[dict[str, str]]:
    """A CSV file's rows in file order, without the timings (the header's order is kept in each dict)."""
    return [{k: v for k, v in row.items() if k not in TIMED} for row in _rows(path)]


def _assert_as_uninterrupted(run_dir: Path, expected: Path) -> None:
    for name in ("results.csv", "curves.csv"):
        assert _untimed(run_dir / name) == _untimed(expected / name), f"{name} as an uninterrupted sweep's"
    cells = {row["cell"] for row in _rows(run_dir / "results.csv")}
    assert {p.stem for p in _records(run_dir)} == cells, "one record per cell"
    assert {p.name for p in (run_dir / "tensorboard").iterdir()} == cells
    assert not [p for p in run_dir.rglob(".*") if p.name != ".lock"], "no temporary file left behind"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """TINY run once, in this process, without a fault."""
    config, _ = _config(tmp_path_factory.mktemp("uninterrupted"))
    return run_sweep(config, progress=False)


def _hidden(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock"]


def _records(run: Path) -> list[Path]:
    return [p for p in (run / "cells").glob("*.json") if not p.name.startswith(".")]


#: Each fault point, and what the folder holds after the kill at the 2nd cell: the proof that it struck there.
FAULTS = {
    # the record's temporary file written and fsync'd, not renamed: one record, and the temporary file
    "record-tmp": lambda run: len(_records(run)) == 1 and _hidden(run / "cells"),
    # the record in place, the CSV files not rebuilt: results.csv lags the records
    "record": lambda run: len(_records(run)) == 2 and len(_rows(run / "results.csv")) == 1,
    # curves.csv rebuilt, results.csv not: before issue 16 a resume then wrote this cell's curve rows twice
    "views": lambda run: (
        len({r["cell"] for r in _rows(run / "curves.csv")}) == 2 and len(_rows(run / "results.csv")) == 1
    ),
    # half of results.csv's temporary file written: results.csv itself is the previous, whole, file
    "views-tmp": lambda run: len(_rows(run / "results.csv")) == 1 and _hidden(run),
}


@pytest.mark.parametrize(
    "point",
    [
        "views",
        "record-tmp",
        pytest.param("record", marks=pytest.mark.slow),
        pytest.param("views-tmp", marks=pytest.mark.slow),
    ],
)
def test_a_sweep_killed_while_recording_a_cell_resumes_to_the_uninterrupted_results(
    point, uninterrupted, tmp_path, capsys
):
    config, path = _config(tmp_path)
    run_dir = Path(config.runs_root) / config.name
    env = {**os.environ, "RLHF_GYM_FAULT": f"sweep-kill:{point}:2", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "rlhf_gym.cli", "sweep", "--config", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, (
        f"the fault did not strike:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    )
    assert FAULTS[point](run_dir), f"the folder after a kill at {point!r} is not as that point leaves it"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecordWarning)  # a killed write is not damage: no warning
        run_sweep(config, progress=True)
    first = capsys.readouterr().out.splitlines()[0]
    finished = 1 if point == "record-tmp" else 2
    assert f"4 cells, {finished} done, {4 - finished} to run" in first, "only cells without a record ran"
    _assert_as_uninterrupted(run_dir, uninterrupted)


def test_torn_lines_and_damaged_records_are_ignored_with_a_warning_and_recomputed(uninterrupted, tmp_path):
    """Issue 16: a torn results.csv row counted as finished and the next row was glued onto it; a torn
    reference.json stopped the resume with a bare JSONDecodeError."""
    config, _ = _config(tmp_path)
    run_dir = Path(config.runs_root) / config.name
    shutil.copytree(uninterrupted, run_dir)
    with open(run_dir / "results.csv", "a") as f:  # a row cut short by a full disk, no newline
        f.write("best_of_n-b0.05-s7-0123abcd,best_of_n,7,0.05,False,0.1")
    truncated, edited, *_ = sorted((run_dir / "cells").glob("*.json"))
    truncated.write_bytes(truncated.read_bytes()[:500])
    edited.write_text(edited.read_text().replace('"rm_score": ', '"rm_score": 1', 1))  # valid JSON, wrong sum
    reference = run_dir / "reference.json"
    reference.write_text(reference.read_text()[:40])
    with pytest.warns(RecordWarning) as caught:
        run_sweep(config, progress=False)
    said = "\n".join(str(w.message) for w in caught)
    assert f"{truncated} is damaged (not JSON" in said and f"{edited} is damaged (its checksum" in said
    assert "results.csv: torn line(s) 6 (a write cut short): ignored" in said
    assert "reference.json is damaged" in said and "pi_ref is measured again" in said
    _assert_as_uninterrupted(run_dir, uninterrupted)
    assert (truncated.parent / f"{truncated.name}.damaged").is_file(), "kept for a post-mortem"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecordWarning)
        run_sweep(config, progress=False)  # said once: the damage is gone


# --------------------------------------------------------------------------------------------------------
# One sweep per folder; workers die with the sweep
# --------------------------------------------------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from rlhf_gym.sweep_store import RunFolder
with RunFolder(sys.argv[1]).lock():
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_sweep_on_a_folder_is_refused_naming_the_first_ones_pid(tmp_path, capsys):
    """Issue 16: two sweeps on one folder computed every cell twice (18 rows for 9 cells)."""
    config, path = _config(tmp_path, agents=[])  # no cell: the lock is the point
    run_dir = Path(config.runs_root) / config.name
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLocked, match=rf"{run_dir} is in use by another sweep \(PID {holder.pid}\)"):
            run_sweep(config, progress=False)
        assert cli.main(["sweep", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(
            f"rlhf-gym sweep: error: {run_dir} is in use by another sweep (PID {holder.pid})"
        )
        assert err.count("\n") == 1 and "--debug" not in err
    finally:
        holder.kill()  # SIGKILL: the kernel releases its lock, no stale lock file to clean
        holder.wait()
    run_sweep(config, progress=False)


def _children(pid: int) -> list[int]:
    """The PIDs whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie awaiting its reaper has stopped running: it counts as gone)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _in_a_cell(pid: int) -> bool:
    """Whether the worker has unpickled a cell (`run_cell` brings torch; the worker's start does not)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the process table from /proc")
@pytest.mark.parametrize("moment", ["in their cells", pytest.param("starting", marks=pytest.mark.slow)])
def test_pool_workers_die_with_a_sigkilled_sweep(tmp_path, moment):
    """Issue 16: after SIGKILL of the sweep's main process its workers ran on for 65 s. Only the main
    process is killed (not its group, as a crash or the OOM killer would): the workers must go by themselves,
    whether they were running a cell or still starting (importing what a cell needs)."""
    slow = [*TINY["overrides"], "reinforce.iterations=100000"]  # cells that would run for hours
    config, path = _config(tmp_path, agents=["reinforce"], workers=2, overrides=slow)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_gym.cli", "sweep", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(workers) < 2:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            workers = [p for p in _children(proc.pid) if "spawn_main" in _cmdline(p)]
            time.sleep(0.05)
        assert len(workers) == 2, "two pool workers started"
        if moment == "in their cells":
            while time.time() < deadline and not all(map(_in_a_cell, workers)):
                time.sleep(0.2)
            assert all(map(_in_a_cell, workers)), "both workers took a cell"
            time.sleep(2)
        assert all(map(_alive, workers))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(map(_alive, workers)):
            time.sleep(0.1)
        assert not any(map(_alive, workers)), "the workers outlived the sweep"
    finally:
        for pid in [proc.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
