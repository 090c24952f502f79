"""One run logger for every stage: rows of scalars to a CSV (and JSON lines) as they come, and to TensorBoard.

The SFT stage, reward-model training, `rlhf-gym train` and the sweep each log a run's curve; this is the
one writer they share, so every run folder reads the same way:

    with RunLog(run_dir, csv="sft_log.csv", tensorboard="tensorboard/sft", prefix="sft/") as log:
        log.log({"step": 1, "loss": 2.3}, step=1)          # a CSV row, flushed; "sft/loss" in TensorBoard
        log.scalar("eval_nll", 1.9, step=1)                # TensorBoard only

* **Flushed row by row**, so a killed run keeps its curve up to the last step (a file written only at the
  end loses it all). A row with a new column rewrites the file once with the wider header (rare: a metric
  that appears late), so the CSV always has one header that names every column.
* **TensorBoard is imported on the first scalar**: `torch.utils.tensorboard` costs seconds to import, and
  runs that log nothing (tests, `run_dir=None`) never pay it. Only finite numbers are sent; NaN (a task
  without a gold reward) would only break TensorBoard's plots.
* **`run_dir=None` writes nothing**: every method is then a no-op, so code that logs optionally needs no
  branches.
* **A resumed run continues its files** (`resume=STEP`): the rows an interrupted run wrote past the
  checkpoint it resumes from are dropped, so no row appears twice, and TensorBoard hides its events past
  that step (`SummaryWriter(purge_step=...)`).
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from csv import DictReader, DictWriter
from pathlib import Path
from typing import IO, Any

from rlhf_base.io import append_jsonl, atomic_write

__all__ = ["RunLog"]


class RunLog:
    """A run's scalars, written as they come to `run_dir`: a CSV, optional JSON lines, and TensorBoard.

    Args:
        run_dir: the run folder (created if missing); None writes nothing.
        csv: the CSV's file name in `run_dir` (truncated when the log opens), or None for no CSV.
        fields: the CSV's columns, in order, written at once; a row with another key is an error. None:
            the first row's keys, widened when a later row brings a new one (missing cells stay empty).
        jsonl: a JSON-lines file in `run_dir` that receives every row as well (truncated when the log
            opens), or None.
        tensorboard: the TensorBoard folder in `run_dir`, or None for no TensorBoard.
        prefix: put before every TensorBoard tag, e.g. "sft/" or "ppo/" to group a run's scalars.
        resume: continue the files of an interrupted run from this step (the checkpoint it resumes from)
            instead of truncating them: rows whose `step_key` value is above it are dropped (they will be
            logged again), the others kept, and TensorBoard hides that run's events at later steps. None:
            start afresh.
        step_key: the column holding a row's step, read when resuming.
    """

    def __init__(
        self,
        run_dir: str | Path | None,
        *,
        csv: str | None = "metrics.csv",
        fields: Iterable[str] | None = None,
        jsonl: str | None = None,
        tensorboard: str | None = "tensorboard",
        prefix: str = "",
        resume: int | None = None,
        step_key: str = "step",
    ) -> None:
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.prefix = prefix
        self.fields: list[str] | None = None if fields is None else list(fields)
        self._strict = fields is not None  # fixed columns: another key is a bug, not a new column
        self.csv_path = self.jsonl_path = self.tensorboard_dir = None
        self._file: IO[str] | None = None
        self._writer: DictWriter | None = None
        self._tb: Any = None  # SummaryWriter, made on the first scalar
        self._purge_step = None if resume is None else int(resume) + 1
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept = (lambda row: float(row[step_key]) <= resume) if resume is not None else None
        if csv is not None:
            self.csv_path = self.run_dir / csv
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            header = self._keep_csv_rows(kept) if kept is not None and self.csv_path.is_file() else None
            if header:
                self._file = self.csv_path.open("a", newline="", encoding="utf-8")
                self._open_writer(header, header=False)
            else:
                self._file = self.csv_path.open("w", newline="", encoding="utf-8")
                if self.fields is not None:
                    self._open_writer(self.fields, header=True)
        if jsonl is not None:
            self.jsonl_path = self.run_dir / jsonl
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            if kept is not None and self.jsonl_path.is_file():
                self._keep_jsonl_rows(kept)
            else:
                self.jsonl_path.write_text("", encoding="utf-8")
        if tensorboard is not None:
            self.tensorboard_dir = self.run_dir / tensorboard

    # ---- writing ----------------------------------------------------------------------------------------
    def log(self, row: Mapping[str, Any], step: int, scalars: Iterable[str] | None = None) -> None:
        """Append `row` to the CSV and the JSON lines, and send its numbers to TensorBoard at `step`.

        Args:
            row: column -> value (numbers, or text such as an agent's name, which TensorBoard skips).
            step: TensorBoard's x axis (an optimiser step, an iteration, an epoch's last step).
            scalars: the keys sent to TensorBoard; None: every finite number in the row.
        """
        if self.run_dir is None:
            return
        if self._file is not None:
            self._write_csv(row)
        if self.jsonl_path is not None:
            append_jsonl(row, self.jsonl_path)
        keys = row if scalars is None else scalars
        self.scalars({key: row[key] for key in keys}, step)

    def scalar(self, name: str, value: Any, step: int) -> None:
        """One TensorBoard scalar, `prefix + name` at `step`, if it is a finite number."""
        self.scalars({name: value}, step)

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        """TensorBoard scalars at `step` (finite numbers only; text, bools and NaN are skipped)."""
        if self.tensorboard_dir is None:
            return
        for name, value in values.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
                self._tensorboard().add_scalar(self.prefix + name, value, int(step))

    def close(self) -> None:
        """Flush and close the files; the log writes nothing after this (closing twice is harmless)."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        self._file = self._writer = self._tb = None
        self.jsonl_path = self.tensorboard_dir = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the pieces -------------------------------------------------------------------------------------
    def _keep_csv_rows(self, kept: Callable[[Mapping[str, Any]], bool]) -> list[str] | None:
        """Rewrite the CSV with only the rows `kept` accepts (atomically); return its header (None: empty)."""
        with self.csv_path.open(newline="", encoding="utf-8") as f:
            reader = DictReader(f)
            rows = [row for row in reader if _readable(kept, row)]
            header = list(reader.fieldnames or [])
        if not header:
            return None
        if self._strict:  # fixed columns: the kept rows are rewritten under them
            header, rows = self.fields, [{k: row.get(k) for k in self.fields} for row in rows]
        text = io.StringIO(newline="")
        writer = DictWriter(text, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.csv_path, text.getvalue())
        return header

    def _keep_jsonl_rows(self, kept: Callable[[Mapping[str, Any]], bool]) -> None:
        """Rewrite the JSON lines with only the rows `kept` accepts, each line as it was (a torn one dropped)."""
        lines = self.jsonl_path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # the last line of a run killed mid-write
            if isinstance(row, dict) and _readable(kept, row):
                keep.append(line if line.endswith("\n") else line + "\n")
        atomic_write(self.jsonl_path, "".join(keep))

    def _open_writer(self, fields: list[str], header: bool) -> None:
        self.fields = fields
        self._writer = DictWriter(self._file, fieldnames=fields)  # extra keys raise
        if header:
            self._writer.writeheader()
            self._file.flush()

    def _write_csv(self, row: Mapping[str, Any]) -> None:
        if self.fields is None:
            self._open_writer(list(row), header=True)
        elif not self._strict and any(key not in self.fields for key in row):
            self._widen([*self.fields, *(key for key in row if key not in self.fields)])
        self._writer.writerow(row)
        self._file.flush()

    def _widen(self, fields: list[str]) -> None:
        """Rewrite the CSV with a wider header (atomically: a crash leaves the narrower file), then go on."""
        self._file.close()
        with self.csv_path.open(newline="", encoding="utf-8") as f:
            rows = list(DictReader(f))
        tmp = self.csv_path.with_name(f".{self.csv_path.name}.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.csv_path)
        self._file = self.csv_path.open("a", newline="", encoding="utf-8")
        self._open_writer(fields, header=False)

    def _tensorboard(self) -> Any:
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter  # seconds to import: only runs that log pay

            self._tb = SummaryWriter(str(self.tensorboard_dir), purge_step=self._purge_step)
        return self._tb


def _readable(kept: Callable[[Mapping[str, Any]], bool], row: Mapping[str, Any]) -> bool:
    """`kept(row)`, False for a row whose step cannot be read (a torn last line)."""
    try:
        return bool(kept(row))
    except (KeyError, TypeError, ValueError):
        return False
