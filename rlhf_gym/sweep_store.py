"""A sweep's run folder: one atomic record per finished cell, the CSV files rebuilt from the records, a lock.

```
runs/NAME/
  .lock            held (flock) by the sweep running on the folder; holds its PID
  sweep.yaml       the config of the latest run
  inputs.json      content hashes of the files the cells read (a cache: reused while size and mtime hold)
  cells/ID.json    one record per finished cell: its identity, results row and curve rows, and a checksum
  results.csv      the current cells' rows, rebuilt from cells/ (what the report reads)
  curves.csv       their per-iteration rows, rebuilt from cells/
  reference.json   pi_ref's scores, with the settings they were measured under
  tensorboard/ID/  each current cell's curve, written from its record
  failures.jsonl   the cells that raised in the latest run
  stale/           records (and CSV files of a folder from before records) that `force` set aside
```

Why it holds through a kill (issue 16): a cell is finished exactly when `cells/ID.json` is a valid record,
and a record appears only by a rename of a complete, fsync'd temporary file. results.csv and curves.csv are
never appended to: each is rewritten whole from the records (temporary file, fsync, rename) after every
cell and at the start of every run, so a kill between or inside these writes leaves files the next run
rebuilds, never a torn or duplicated row. A damaged record (truncated, or edited: its checksum fails) is
ignored with a warning and its cell runs again; so is a torn line in a CSV file.

Two sweeps on one folder would run every cell twice: `RunFolder.lock` takes an exclusive `flock` on
`.lock`, which the kernel releases when the process ends however it ends, so a killed sweep leaves no stale
lock.

Test-only fault injection: with the environment variable ``RLHF_GYM_FAULT=sweep-kill:POINT:N`` (as
`rlhf_base.checkpoint`'s), the sweep SIGKILLs itself while recording its N-th cell (1 if N is left out) at
POINT: ``record-tmp`` (the record's temporary file written, not renamed), ``record`` (the record in place,
the CSV files not rebuilt), ``views`` (curves.csv rebuilt, results.csv not) or ``views-tmp`` (half of
results.csv's temporary file written). ``tests/test_sweep_faults.py`` kills a sweep at each and checks the
rerun's files against an uninterrupted run's. Never set it otherwise.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_base.config import ConfigError
from rlhf_base.io import atomic_dir, atomic_path, atomic_write

__all__ = [
    "FORMAT",
    "FolderLocked",
    "RecordWarning",
    "RunFolder",
    "StaleResults",
    "changes",
    "digest",
]

FORMAT = "rlhf-gym-sweep-cell"
VERSION = 1
VIEWS = ("results.csv", "curves.csv")


class RecordWarning(UserWarning):
    """A record, a line of results.csv/curves.csv or reference.json was damaged (a kill, a full disk, an
    edit): it is ignored and what it held is computed again."""


class FolderLocked(OSError):
    """Another sweep is running on this run folder (an OSError, as the `flock` it comes from)."""


class StaleResults(ConfigError):
    """The run folder holds results of these cells run with other settings; `force` sets them aside."""


def digest(value: Any) -> str:
    """The SHA-256 of `value`'s canonical JSON (sorted keys): a cell's identity, a record's checksum."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _flat(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, Mapping) and key != "inputs":
            out.update(_flat(item, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = item
    return out


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two cell identities, one phrase per key, in the sweep's own key names:
    `reinforce.iterations: 2 -> 3`, `env.max_new_tokens: 8 -> 16`, `the content of runs/default/sft`.
    A difference of `reference_env.X` that `env.X` repeats is left out."""
    a, b = _flat(old), _flat(new)
    agent = str((new.get("cell") or ["agent"])[0])
    missing = object()
    keys = [k for k in sorted(set(a) | set(b)) if k != "inputs" and a.get(k, missing) != b.get(k, missing)]
    found = []
    for key in keys:
        if key.startswith("reference_env.") and "env." + key.split(".", 1)[1] in keys:
            continue
        before, after = a.get(key, missing), b.get(key, missing)
        name = f"{agent}.{key.split('.', 1)[1]}" if key.startswith("agent.") else key
        found.append(f"{name}: {_text(before, missing)} -> {_text(after, missing)}")
    inputs_old, inputs_new = a.get("inputs") or {}, b.get("inputs") or {}
    for path in sorted(set(inputs_old) | set(inputs_new)):
        if path not in inputs_old:
            found.append(f"input {path} is new")
        elif path not in inputs_new:
            found.append(f"input {path} is no longer read")
        elif inputs_old[path] != inputs_new[path]:
            found.append(f"the content of {path}")
    return found


def _text(value: Any, missing: object) -> str:
    return "(none)" if value is missing else repr(value)


class RunFolder:
    """The files of one sweep's run folder (see the module docstring); hold `lock()` while using it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.cells = self.path / "cells"
        self.stale = self.path / "stale"
        self.recorded = 0  # records written by this process, counted for the fault hook

    # ---------------------------------------------------------------------------------------------------
    # The lock
    # ---------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for this process, or raise FolderLocked naming the PID of the sweep that holds it.

        `flock` is released by the kernel when the process exits, killed or not: no stale lock to clean.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = path.read_text().strip() or "unknown"
            raise FolderLocked(
                f"{self.path} is in use by another sweep (PID {holder}); two sweeps on one folder would run "
                "its cells twice: wait for that one to finish (or stop it), or give this sweep another name"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield
        finally:
            os.close(fd)  # releases the lock; the file stays (removing it would race with a new holder)

    # ---------------------------------------------------------------------------------------------------
    # Records
    # ---------------------------------------------------------------------------------------------------
    def legacy_views(self) -> list[Path]:
        """results.csv/curves.csv of a folder written before records (no cells/): rows of unknown settings."""
        if self.cells.is_dir():
            return []
        return [self.path / name for name in VIEWS if (self.path / name).is_file()]

    def load(self, repair: bool = True) -> dict[str, dict[str, Any]]:
        """Every valid record in cells/, by cell id. A damaged one warns (RecordWarning; its cell runs
        again) and, with `repair` (under the lock), is renamed `ID.json.damaged`, and a killed writer's
        temporary file is removed."""
        records: dict[str, dict[str, Any]] = {}
        if repair:
            self._remove_leftovers()
        if not self.cells.is_dir():
            return records
        for path in sorted(self.cells.iterdir()):
            if path.name.startswith("."):
                continue
            if path.suffix != ".json":
                continue
            record, problem = _read_record(path)
            if record is None:
                warnings.warn(
                    f"{path} is damaged ({problem}): ignored; its cell runs again"
                    + (f" (the file is kept as {path.name}.damaged)" if repair else ""),
                    RecordWarning,
                    stacklevel=2,
                )
                if repair:
                    os.replace(path, path.with_name(path.name + ".damaged"))
                continue
            records[record["cell"]] = record
        return records

    def _remove_leftovers(self) -> None:
        """Remove what killed writes left (`atomic_path`/`atomic_dir`'s hidden `.NAME.*.tmp*` and
        `.NAME.old-*`) in the folder, cells/ and tensorboard/: this process holds the lock, so no live
        writer owns them."""
        for folder in (self.path, self.cells, self.path / "tensorboard"):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.name.startswith(".") and (".tmp" in entry.name or ".old-" in entry.name):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)

    def write_record(
        self,
        cell_id: str,
        identity: Mapping[str, Any],
        row: Mapping[str, Any],
        curves: Sequence[Mapping[str, Any]],
    ) -> dict[str, Any]:
        """Write cells/ID.json atomically; return the record as it reads back (JSON values)."""
        body = {"format": FORMAT, "version": VERSION, "cell": cell_id, "identity": identity}
        body |= {"row": row, "curves": list(curves)}
        body = json.loads(json.dumps(body, default=_plain))  # numpy scalars, paths -> JSON, as read back
        text = json.dumps({**body, "sha256": digest(body)}, indent=1, default=_plain)
        self.recorded += 1
        with atomic_path(self.cells / f"{cell_id}.json") as tmp:
            tmp.write_text(text)
            if _fault("record-tmp", self.recorded):
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                _kill()
        if _fault("record", self.recorded):
            _kill()
        return body

    def set_aside(self, cell_ids: Iterable[str], legacy: Iterable[Path] = ()) -> Path:
        """Move records (and their TensorBoard runs) and a pre-record folder's CSV files into stale/."""
        self.stale.mkdir(parents=True, exist_ok=True)
        for cell_id in cell_ids:
            os.replace(self.cells / f"{cell_id}.json", self.stale / f"{cell_id}.json")
            board = self.path / "tensorboard" / cell_id
            if board.is_dir():
                _move(board, self.stale / "tensorboard" / cell_id)
        legacy = list(legacy)
        if legacy:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for path in legacy:
                _move(path, self.stale / f"{path.stem}.before-records-{stamp}{path.suffix}")
            if (self.path / "tensorboard").is_dir():
                _move(self.path / "tensorboard", self.stale / f"tensorboard.before-records-{stamp}")
        return self.stale

    # ---------------------------------------------------------------------------------------------------
    # The views: results.csv, curves.csv, tensorboard/
    # ---------------------------------------------------------------------------------------------------
    def check_views(self, known: Iterable[str]) -> None:
        """Warn about lines of results.csv/curves.csv that no record backs: torn (too few or too many
        fields, a last line without its newline) or naming a cell with no record. The files are then
        rebuilt from the records, which drops them."""
        known = set(known)
        for name in VIEWS:
            path = self.path / name
            if not path.is_file():
                continue
            text = path.read_text(errors="replace")
            lines = list(csv.reader(io.StringIO(text)))
            if not lines:
                continue
            width = len(lines[0])
            bad = [i + 1 for i, line in enumerate(lines[1:], start=1) if len(line) != width]
            if text and not text.endswith("\n") and len(lines) not in bad:
                bad.append(len(lines))
            column = lines[0].index("cell") if "cell" in lines[0] else None
            orphans = sorted(
                {
                    line[column]
                    for line in lines[1:]
                    if column is not None and len(line) == width and line[column] not in known
                }
            )
            if bad:
                warnings.warn(
                    f"{path}: torn line(s) {', '.join(map(str, bad))} (a write cut short): ignored; the file "
                    f"is rebuilt from the records in {self.cells}",
                    RecordWarning,
                    stacklevel=2,
                )
            if orphans:
                warnings.warn(
                    f"{path}: row(s) of cell(s) with no record in {self.cells} ({', '.join(orphans[:3])}"
                    f"{', ...' if len(orphans) > 3 else ''}): ignored; those cells run again if current",
                    RecordWarning,
                    stacklevel=2,
                )

    def rebuild_views(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Rewrite curves.csv, then results.csv, from `records` (in this order), each atomically; with no
        record, remove both (the report then says no cell has finished)."""
        if not records:
            for name in VIEWS:
                (self.path / name).unlink(missing_ok=True)
            return
        atomic_write(self.path / "curves.csv", _csv([row for r in records for row in r["curves"]]))
        if _fault("views", self.recorded):
            _kill()
        text = _csv([r["row"] for r in records])
        with atomic_path(self.path / "results.csv") as tmp:
            if _fault("views-tmp", self.recorded):
                tmp.write_text(text[: len(text) // 2])
                _kill()
            tmp.write_text(text)

    def write_tensorboard(
        self, record: Mapping[str, Any], scalars: Sequence[str], force: bool = False
    ) -> None:
        """tensorboard/ID/: the cell's curve by iteration, written whole (atomically) if missing or `force`."""
        from rlhf_base.runlog import RunLog

        path = self.path / "tensorboard" / record["cell"]
        if path.is_dir() and not force:
            return
        with atomic_dir(path) as tmp, RunLog(tmp, csv=None, tensorboard=".") as log:
            for row in record["curves"]:
                log.log(row, int(row["iteration"]), scalars=scalars)

    # ---------------------------------------------------------------------------------------------------
    # reference.json
    # ---------------------------------------------------------------------------------------------------
    def reference(self, key: Mapping[str, Any]) -> dict[str, float] | None:
        """pi_ref's cached scores if reference.json holds them for `key`; a damaged file warns (None)."""
        path = self.path / "reference.json"
        if not path.is_file():
            return None
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") != json.loads(json.dumps(key, default=str)):
                return None  # measured under other settings (or by an rlhf-gym before records)
            return {str(k): float(v) for k, v in cached["metrics"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            warnings.warn(
                f"{path} is damaged ({type(e).__name__}: {e}): ignored; pi_ref is measured again",
                RecordWarning,
                stacklevel=2,
            )
            return None

    def save_reference(self, key: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        payload = {"key": key, "metrics": dict(metrics)}
        atomic_write(self.path / "reference.json", json.dumps(payload, indent=2, default=str))


def _read_record(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(the record, "") or (None, what is wrong with it)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"not JSON: {e}"
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        return None, "not a sweep cell record"
    if record.get("version") != VERSION:
        return None, f"record version {record.get('version')!r}; this rlhf-gym reads version {VERSION}"
    checksum = record.pop("sha256", None)
    if checksum != digest(record):
        return None, "its checksum does not match its content"
    if record.get("cell") != path.stem:
        return None, f"it records cell {record.get('cell')!r}, not {path.stem!r}"
    return record, ""


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as CSV text: the columns in the order they first appear, a missing cell left empty."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _plain(value: Any) -> Any:
    """JSON for numpy/torch scalars and paths, the values metrics come as."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _move(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target = target.with_name(f"{target.name}.{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    shutil.move(str(source), str(target))


def _fault(point: str, nth: int) -> bool:
    """Test-only: whether RLHF_GYM_FAULT asks for a kill at `point` while recording the `nth` cell."""
    from rlhf_base.checkpoint import FAULT_ENV

    kind, _, rest = os.environ.get(FAULT_ENV, "").partition(":")
    where, _, at = rest.partition(":")
    return kind == "sweep-kill" and where == point and int(at or 1) == nth


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # test-only: a crash at this point (module docstring)
