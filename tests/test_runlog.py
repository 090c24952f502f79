"""The run logger: CSV rows and header read back (while the run goes on), JSON lines, TensorBoard, no run dir."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlhf_base.runlog import RunLog


def read_csv(path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def read_tensorboard(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_rows_are_on_disk_as_they_come_with_the_first_rows_header(tmp_path):
    with RunLog(tmp_path, csv="metrics.csv", tensorboard=None) as log:
        log.log({"step": 1, "loss": 0.5, "agent": "ppo"}, step=1)
        assert read_csv(tmp_path / "metrics.csv") == (
            ["step", "loss", "agent"],
            [{"step": "1", "loss": "0.5", "agent": "ppo"}],
        )  # flushed: readable while the run goes on
        log.log({"step": 2, "loss": 0.1 + 0.2, "agent": "ppo"}, step=2)
    _, rows = read_csv(tmp_path / "metrics.csv")
    assert float(rows[1]["loss"]) == 0.1 + 0.2  # full precision, as repr
    assert not (tmp_path / "tensorboard").exists()


def test_a_new_column_widens_the_header_and_keeps_the_rows(tmp_path):
    with RunLog(tmp_path, tensorboard=None) as log:
        log.log({"epoch": 1, "train_loss": 0.7}, step=1)
        log.log({"epoch": 2, "train_loss": 0.6, "eval_loss": 0.65}, step=2)
        log.log({"epoch": 3, "eval_loss": 0.6}, step=3)
    header, rows = read_csv(tmp_path / "metrics.csv")
    assert header == ["epoch", "train_loss", "eval_loss"]
    assert [(r["epoch"], r["train_loss"], r["eval_loss"]) for r in rows] == [
        ("1", "0.7", ""),
        ("2", "0.6", "0.65"),
        ("3", "", "0.6"),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]  # no temporary file left


def test_fixed_fields_write_the_header_at_once_and_refuse_other_keys(tmp_path):
    (tmp_path / "sft_log.csv").write_text("stale,from,an,old,run\n1,2,3,4,5\n")
    log = RunLog(tmp_path, csv="sft_log.csv", fields=("step", "loss", "lr"), tensorboard=None)
    assert read_csv(tmp_path / "sft_log.csv") == (["step", "loss", "lr"], [])  # truncated, header at once
    log.log({"step": 1, "loss": 2.0}, step=1)  # a missing cell stays empty
    with pytest.raises(ValueError, match="grad_nrom"):
        log.log({"step": 2, "loss": 1.0, "lr": 0.1, "grad_nrom": 1.0}, step=2)
    log.close()
    assert read_csv(tmp_path / "sft_log.csv")[1] == [{"step": "1", "loss": "2.0", "lr": ""}]


def test_json_lines_get_every_row(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"old": 1}\n')
    with RunLog(tmp_path, csv=None, jsonl="metrics.jsonl", tensorboard=None) as log:
        log.log({"agent": "reinforce", "iteration": 1.0, "gold_score": math.nan}, step=1)
        log.log({"agent": "reinforce", "iteration": 2.0, "gold_score": 0.5}, step=2)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1.0, 2.0] and math.isnan(lines[0]["gold_score"])
    assert not (tmp_path / "metrics.csv").exists()


def test_tensorboard_gets_the_finite_numbers_with_the_prefix_at_their_steps(tmp_path):
    with RunLog(tmp_path, csv=None, tensorboard="tensorboard/sft", prefix="sft/") as log:
        log.log({"step": 3, "loss": 1.5, "agent": "x", "done": True, "gold": math.nan}, step=3)
        log.log({"step": 4, "loss": 1.25, "lr": 0.01}, step=4, scalars=("loss",))
        log.scalar("eval_nll", 2.0, step=4)
        log.scalars({"a": 1, "b": math.inf}, step=5)
    assert read_tensorboard(tmp_path / "tensorboard" / "sft") == {
        "sft/step": [(3, 3.0)],
        "sft/loss": [(3, 1.5), (4, 1.25)],  # lr was not picked for step 4
        "sft/eval_nll": [(4, 2.0)],
        "sft/a": [(5, 1.0)],
    }


def test_no_run_dir_writes_nothing_and_never_imports_tensorboard(tmp_path):
    code = (
        "import sys, os\n"
        "from rlhf_base.runlog import RunLog\n"
        "with RunLog(None, jsonl='m.jsonl') as log:\n"
        "    log.log({'step': 1, 'loss': 0.5}, step=1)\n"
        "    log.scalar('x', 1.0, 1)\n"
        "print(sorted(os.listdir('.')), 'torch.utils.tensorboard' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's modules
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["[]", "False"], out.stderr


def test_after_close_nothing_is_written_and_closing_twice_is_harmless(tmp_path):
    log = RunLog(tmp_path, jsonl="m.jsonl")
    log.log({"step": 1, "loss": 0.5}, step=1)
    log.close()
    log.close()
    log.log({"step": 2, "loss": 0.4}, step=2)
    assert len(read_csv(tmp_path / "metrics.csv")[1]) == 1
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 1
    assert read_tensorboard(tmp_path / "tensorboard") == {"step": [(1, 1.0)], "loss": [(1, 0.5)]}


def test_resume_keeps_the_rows_up_to_the_checkpoint_and_hides_later_tensorboard_events(tmp_path):
    """A run killed after writing rows 1-4 (the last JSON line torn), resumed from its checkpoint at step 2,
    ends with each step once: rows 3 and 4 are rewritten, not duplicated, in every file."""
    with RunLog(tmp_path, jsonl="m.jsonl", prefix="ppo/") as log:
        for step in range(1, 5):
            log.log({"iteration": float(step), "loss": 10.0 + step}, step=step)
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"iteration": 5.0, "lo')  # killed mid-line
    with RunLog(tmp_path, jsonl="m.jsonl", prefix="ppo/", resume=2, step_key="iteration") as log:
        _, kept = read_csv(tmp_path / "metrics.csv")
        assert [row["iteration"] for row in kept] == ["1.0", "2.0"]
        for step in range(3, 5):
            log.log({"iteration": float(step), "loss": 20.0 + step}, step=step)
    header, rows = read_csv(tmp_path / "metrics.csv")
    assert header == ["iteration", "loss"]
    assert [float(row["loss"]) for row in rows] == [11.0, 12.0, 23.0, 24.0]
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in lines] == [11.0, 12.0, 23.0, 24.0]
    tensorboard = read_tensorboard(tmp_path / "tensorboard")["ppo/loss"]
    assert tensorboard == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
