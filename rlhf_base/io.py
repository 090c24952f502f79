"""Files in and out of rlhf-gym: nothing is lost, nothing is unpickled blindly.

Three promises, each the answer to a way a long run goes wrong:

* **A file is either the old version or the new one, never half of each.** Every write goes to a temporary
  sibling that is fsync'd and then ``os.replace``'d onto its name (:func:`atomic_path`, :func:`atomic_write`,
  :func:`atomic_dir`), so a run killed mid-checkpoint leaves the previous checkpoint readable. The temporary
  sibling's name carries its writer (this host and the writer's PID), so the next save of the same target
  removes what a killed writer left (:func:`remove_stale_temps`) and leaves a live writer's alone.
* **Tensors are stored as safetensors**, never pickles: ``torch.load`` of a pickle runs arbitrary code, and a
  checkpoint downloaded or shared should not be able to (:func:`save_tensors`, :func:`load_tensors`). A pickle
  weights file is refused by name, never opened, and a truncated or corrupt safetensors file is reported
  with its path (:func:`check_safetensors`, :func:`check_weights_folder`), before any loader touches it.
* **Bad data fails at load time, with the file and line**: :func:`read_records` reads prompts or preference
  pairs from JSONL, JSON, CSV, Parquet, a ``datasets.Dataset`` or a plain list, and names the file, the line
  or row, and the field when a record is malformed, instead of a ``KeyError`` deep inside a training step.

Results that must survive a kill are appended a line at a time with :func:`append_jsonl`.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and safetensors load when tensors are saved or read: configs and records don't pay
    import torch

__all__ = [
    "PICKLE_SUFFIXES",
    "RECORD_SUFFIXES",
    "DataError",
    "append_jsonl",
    "atomic_dir",
    "atomic_path",
    "atomic_write",
    "check_safetensors",
    "check_weights_folder",
    "load_tensors",
    "load_tensors_metadata",
    "read_records",
    "remove_stale_temps",
    "save_tensors",
    "write_jsonl",
]

RECORD_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".csv", ".parquet")
"""File suffixes :func:`read_records` understands."""


class DataError(ValueError):
    """A data source is missing, unreadable or holds malformed records; the message names file and line."""


# --------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------
def _umask() -> int:
    """The process umask, so temp files (created 0600 by ``mkstemp``) end up with ordinary permissions."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc (macOS): read it by setting it, then put it back at once
    os.umask(mask)
    return mask


def _fsync_path(path: Path) -> None:
    """Flush ``path`` (a file or a directory) to disk; best effort where the OS refuses (Windows dirs)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# A temporary sibling is named `.NAME.OWNER.RANDOM.tmp` (a file: `.STEM.OWNER.RANDOM.tmp.SUFFIX`; a directory
# set aside while its replacement is renamed in: `.NAME.OWNER.RANDOM.old`), OWNER being `HOST-PID`: a short
# hash of this machine's name and the writer's process id. A SIGKILLed writer cannot clean up after itself;
# the next save of the same target can, knowing from OWNER that the writer is gone.
_OWNER = r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)"
_RANDOM = r"[a-z0-9_]+"  # tempfile's random part
_ACTIVE: set[str] = set()  # the temporary paths this process is writing now (threads may save concurrently)


@functools.cache
def _host() -> str:
    """This machine, as 8 hex digits: a PID means something only on the host that wrote it."""
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _owner() -> str:
    return f"{_host()}-{os.getpid()}"  # read at each save: a forked worker has a PID of its own


def _pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host (a zombie counts; so does another user's)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: never call a writer dead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, and belongs to someone else
        return True
    return True


def _is_stale(host: str, pid: int, path: Path) -> bool:
    """A temporary sibling whose writer is gone: on this host, and its PID dead, or ours but not in use.

    Another host's writer cannot be seen from here, so its leftovers are kept. A PID reused by an unrelated
    process keeps a leftover too (until that process ends): kept by mistake is harmless, deleted by mistake
    is not. Our own PID on a path this process is not writing is a killed run's whose PID we inherited (a
    container restarted, PIDs counted from 1 again).
    """
    if host != _host():
        return False
    if pid == os.getpid():
        return str(path) not in _ACTIVE
    return not _pid_alive(pid)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete the temporary siblings of `path` that writers killed mid-save left behind; return them.

    Every save through :func:`atomic_path` and :func:`atomic_dir` calls it first, so a SIGKILL mid-save
    costs disk only until the next save of the same target. Only names this module made for `path` are
    touched, and only stale ones (see :func:`_is_stale`): a concurrent live save of the same target keeps
    its temporary. A directory set aside by a writer killed between its two renames (`.NAME.OWNER.RANDOM.old`)
    is the previous version: if `path` is missing it is put back there, else it is deleted. Errors (a
    permission, a race with another cleaner) are ignored: cleaning up must never fail a save.
    """
    path = Path(path)
    patterns = [  # (pattern, is atomic_dir's): atomic_dir's names hold the whole name, atomic_path's the suffix last
        (re.compile(rf"\.{re.escape(path.name)}\.{_OWNER}\.{_RANDOM}\.(?P<kind>tmp|old)"), True),
        (re.compile(rf"\.{re.escape(path.stem)}\.{_OWNER}\.{_RANDOM}\.tmp{re.escape(path.suffix)}"), False),
    ]
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith("."):
            continue
        for pattern, whole_name in patterns:
            match = pattern.fullmatch(entry.name)
            if match is None:
                continue
            leftover = Path(entry.path)
            if not _is_stale(match["host"], int(match["pid"]), leftover):
                break
            with contextlib.suppress(OSError):
                if whole_name and match["kind"] == "old" and not (path.exists() or path.is_symlink()):
                    os.replace(leftover, path)  # the only copy of the previous version: put it back
                else:
                    _remove(leftover)
                removed.append(leftover)
            break
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``, on failure delete it.

    Use it for writers that want a file name rather than bytes (``save_file``, ``fig.savefig``, pyarrow).
    The temporary file lives in the same directory, so the final ``os.replace`` is an atomic rename on the
    same filesystem, and it keeps ``path``'s suffix, so writers that choose a format by suffix still work.
    Readers see the old file until the writer has finished and its data is on disk. Temporary files of
    ``path`` that killed writers left are removed first (:func:`remove_stale_temps`).

    Args:
        path: Destination; its parent directories are created if needed.

    Yields:
        The temporary path, which already exists as an empty file and may be overwritten.

    Raises:
        Whatever the body raises; the destination is then untouched and the temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp_name = tempfile.mkstemp(
        dir=path.parent,
        prefix=f".{path.stem}.{_owner()}.",
        suffix=f".tmp{path.suffix}",
    )
    os.close(fd)
    tmp = Path(tmp_name)
    _ACTIVE.add(str(tmp))
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _ACTIVE.discard(str(tmp))
    _fsync_path(path.parent)  # make the rename itself durable


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically (str is encoded as UTF-8); see :func:`atomic_path`."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it becomes ``path``, on failure it is deleted.

    Made for checkpoints that are whole directories (``model.save_pretrained(tmp)``). An existing ``path`` is
    replaced safely: it is renamed aside, the new directory renamed in, and only then the old one deleted;
    if the second rename fails the old one is put back. POSIX has no atomic swap of two directories, so a
    crash between the two renames leaves the previous version intact under ``.<name>.<owner>.*.old`` beside
    ``path``, where the next save of ``path`` finds it (:func:`remove_stale_temps`: put back if ``path`` is
    missing), as it finds and removes the temporary directory of a writer killed mid-save.

    Args:
        path: Destination directory; its parent directories are created if needed.

    Yields:
        An empty temporary directory on the same filesystem as ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    owner = _owner()
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{owner}.", suffix=".tmp"))
    _ACTIVE.add(str(tmp))
    old: Path | None = None
    try:
        try:
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())
            for root, _dirs, files in os.walk(tmp):
                for name in files:
                    _fsync_path(Path(root, name))
                _fsync_path(Path(root))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

        if path.exists() or path.is_symlink():
            # mkdtemp reserves a unique name; rename needs it gone (an empty dir is replaced by rename on
            # POSIX, but not on Windows), so remove it and rename straight after.
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{owner}.", suffix=".old"))
            _ACTIVE.add(str(old))
            old.rmdir()
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        _ACTIVE.discard(str(tmp))
        if old is not None:
            _ACTIVE.discard(str(old))
    _fsync_path(path.parent)
    if old is not None:
        _remove(old)


# --------------------------------------------------------------------------------------------------------
# Tensors (safetensors, never pickles)
# --------------------------------------------------------------------------------------------------------
def save_tensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Save named tensors to a ``.safetensors`` file, atomically.

    safetensors refuses non-contiguous tensors and tensors that share storage (tied weights); both are
    copied here so callers can pass ``module.state_dict()`` as is. Loading is then a plain memory map.

    Args:
        tensors: Name to tensor; any device, any dtype safetensors supports.
        path: Destination file.
        metadata: Free-form string pairs stored in the header (e.g. config name, step); read them back
            with :func:`load_tensors_metadata`.

    Raises:
        TypeError: A name or metadata entry is not a string, or a value is not a tensor.
    """
    import torch
    from safetensors.torch import save_file

    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"safetensors metadata must map str to str; got {key!r}: {value!r} ({type(value).__name__})"
            )
    seen: set[tuple[torch.device, int]] = set()
    prepared: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"save_tensors needs str -> torch.Tensor; got {name!r}: {type(tensor).__name__}")
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        if storage in seen and tensor.numel() > 0:
            tensor = tensor.clone()  # tied weights: store each copy on its own
        seen.add(storage)
        prepared[name] = tensor.contiguous()
    with atomic_path(path) as tmp:
        save_file(prepared, str(tmp), metadata=dict(metadata) if metadata else None)


PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Suffixes of pickled weights (``torch.save``, ``pytorch_model.bin``), which are refused, never opened."""

#: Weights files of a Hugging Face folder saved as pickles (a folder of safetensors has none of them).
_PICKLE_WEIGHTS = re.compile(r"(pytorch_model|model|adapter_model)([-.].*)?\.(bin|pt|pth|ckpt)")


def _refuse_pickle(path: Path) -> DataError:
    return DataError(
        f"{path} is a pickle weights file ({path.suffix}): rlhf-gym loads weights from safetensors only, since "
        "unpickling can run code from the file, so it is not opened. If you trust it, convert it once "
        "yourself: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder) writes "
        "model.safetensors beside it, or safetensors.torch.save_file(torch.load(file), "
        "'model.safetensors') for a bare state dict"
    )


def _not_safetensors(path: Path, error: Exception) -> DataError:
    """The error for a file safetensors cannot read: its path, why, and what it looks like instead."""
    magic = b""
    with contextlib.suppress(OSError), path.open("rb") as f:
        magic = f.read(4)
    looks = ""
    if magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80":
        looks = " (it looks like a torch.save pickle, which rlhf-gym never opens: save it as safetensors)"
    elif not magic:
        looks = " (it is empty)"
    return DataError(
        f"{path} is not a readable safetensors file{looks}: {error}; the file is truncated or corrupt "
        "(a copy or download cut short?): save or fetch it again"
    )


def _tensor_file(path: str | Path) -> Path:
    """``path`` as a Path once it is known not to be a pickle (refused by suffix, never opened) and to exist."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _refuse_pickle(path)
    if not path.is_file():
        raise FileNotFoundError(f"tensor file not found: {path}")
    return path


def check_safetensors(path: str | Path) -> None:
    """Raise unless ``path`` is a complete safetensors file; reads the header only (no tensor is loaded).

    safetensors checks that the header's offsets cover the file exactly, so a file cut short (a copy or a
    download interrupted) fails here, named, rather than deep inside a loader as a bare ``SafetensorError``.

    Raises:
        FileNotFoundError: ``path`` does not exist (named).
        DataError: ``path`` has a pickle suffix (:data:`PICKLE_SUFFIXES`: refused, never opened), or is not a
            readable safetensors file; the message names it and says what is wrong.
    """
    load_tensors_metadata(path)  # opening the header is the check; the metadata is not needed


def check_weights_folder(folder: str | Path) -> None:
    """Check a model folder before a Hugging Face loader reads it: safetensors only, each one complete.

    Every ``*.safetensors`` file in ``folder`` must be readable (:func:`check_safetensors`); a folder whose
    weights are pickles only (``pytorch_model.bin``, ``model.pt`` ...) is refused naming the file, and is
    never unpickled (Hugging Face loaders would, with ``torch.load``). A folder with neither is left to the
    loader, whose error says what it expected.

    Raises:
        DataError: a safetensors file is truncated or corrupt, or the weights are pickles (named).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    found = sorted(folder.glob("*.safetensors"))
    for path in found:
        check_safetensors(path)
    if not found:
        pickles = sorted(p for p in folder.iterdir() if _PICKLE_WEIGHTS.fullmatch(p.name) and p.is_file())
        if pickles:
            raise _refuse_pickle(pickles[0])


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load every tensor of a ``.safetensors`` file onto ``device``; no code from the file is executed.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        DataError: ``path`` is a pickle (refused by its suffix, never opened) or not a readable safetensors
            file (truncated, corrupt); the message names it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _tensor_file(path)
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as e:
        raise _not_safetensors(path, e) from None


def load_tensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored by :func:`save_tensors` (empty if none), without loading any tensor.

    Raises:
        FileNotFoundError, DataError: as :func:`load_tensors`.
    """
    from safetensors import SafetensorError, safe_open

    path = _tensor_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as e:
        raise _not_safetensors(path, e) from None


# --------------------------------------------------------------------------------------------------------
# Records (prompts, preference pairs, results)
# --------------------------------------------------------------------------------------------------------
def _fields_text(names: Iterable[Any]) -> str:
    names = [repr(n) for n in names]
    return ", ".join(names) if names else "(none)"


def _value_text(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_record(record: Any, required: Sequence[str], where: str, what: str) -> dict[str, Any]:
    """Return ``record`` as a plain dict after checking it has every required field, each a string."""
    if not isinstance(record, Mapping):
        raise DataError(
            f"{where}: expected a {what} (a mapping of field names to values), got "
            f"{type(record).__name__} {_value_text(record)}"
        )
    # csv.DictReader fills short rows with None: there None means an absent cell, not a wrong type.
    short_row = isinstance(record, _CsvRow)
    present = [k for k, v in record.items() if not (short_row and v is None)]
    for name in required:
        if name not in present:
            raise DataError(
                f"{where}: {what} is missing required field {name!r}; fields present: {_fields_text(present)}"
            )
        value = record[name]
        if not isinstance(value, str):
            raise DataError(
                f"{where}: field {name!r} of the {what} must be a string, got "
                f"{_value_text(value)} ({type(value).__name__})"
            )
    return dict(record)


class _CsvRow(dict):
    """Marks rows read from CSV, where ``None`` can only mean the row had too few columns."""


def _read_jsonl(path: Path, required: Sequence[str], what: str) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline, hand-edited files) carry no record
            line = line.rstrip("\r\n")  # else an error at the end of the line is reported at "column 1"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path} line {lineno}: malformed JSON ({e.msg} at column {e.colno}): {_value_text(line)}"
                ) from None
            records.append(_check_record(record, required, f"{path} line {lineno}", what))
    return records


def _read_json(path: Path, required: Sequence[str], what: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(
            f"{path} must hold a JSON list of {what} objects, got a {type(data).__name__}"
            + (" (for one record per line, use a .jsonl file)" if isinstance(data, dict) else "")
        )
    return [_check_record(r, required, f"{path} record {i}", what) for i, r in enumerate(data, start=1)]


def _read_csv(path: Path, required: Sequence[str], what: str) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        absent = [name for name in required if name not in header]
        if header and absent:
            raise DataError(
                f"{path} line 1: the CSV header lacks required column {absent[0]!r}; columns present: "
                f"{_fields_text(header)}"
            )
        for rowno, row in enumerate(reader, start=1):
            row.pop(None, None)  # surplus cells of an over-long row
            where = f"{path} row {rowno} (line {reader.line_num})"
            records.append(_check_record(_CsvRow(row), required, where, what))
    return records


def _read_parquet(path: Path, required: Sequence[str], what: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq  # heavy import, paid only by Parquet users

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own ArrowInvalid for corrupt files
        raise DataError(f"{path}: cannot read as Parquet: {e}") from e
    return [_check_record(r, required, f"{path} row {i}", what) for i, r in enumerate(rows, start=1)]


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _is_hf_dataset(source: Any) -> bool:
    """True for a ``datasets.Dataset``, without importing ``datasets`` (slow) when the caller has not."""
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(source, datasets.Dataset)


def read_records(
    source: str | Path | Sequence[Mapping[str, Any]] | Any, required: Sequence[str], *, what: str = "record"
) -> list[dict[str, Any]]:
    """Load a non-empty list of records and check each has the required string fields.

    Every data entry point (prompt sets, preference pairs) goes through here, so a typo in a data file is
    reported once, at load time, with the file and line, rather than as a ``KeyError`` mid-training.

    Args:
        source: A list of dicts; a path to a ``.jsonl`` (one JSON object per line, blank lines skipped),
            ``.json`` (a list of objects), ``.csv`` (with a header row) or ``.parquet`` file; or a
            ``datasets.Dataset``.
        required: Field names every record must have, each holding a string.
        what: What a record is, for messages (e.g. ``"preference pair"``).

    Returns:
        The records as plain dicts, in order, with all their fields (not only the required ones).

    Raises:
        DataError: The file is missing or of an unknown type, the source is empty, a JSON line is malformed,
            or a record lacks a required field or holds a non-string there. The message names the file,
            the line or row, the field, and the fields that were present.
        TypeError: ``source`` is none of the above.
    """
    if isinstance(required, str):
        required = (required,)  # a lone field name, not its characters
    if isinstance(source, (str, Path)):
        path = Path(source)
        suffix = path.suffix.lower()
        if suffix not in _READERS:
            raise DataError(
                f"cannot read {what}s from {path}: unsupported file type {suffix or '(no suffix)'!r}; "
                f"supported: {', '.join(RECORD_SUFFIXES)}"
            )
        if not path.is_file():
            raise DataError(
                f"{what} file not found: {path}" + (" (it is a directory)" if path.is_dir() else "")
            )
        try:
            records = _READERS[suffix](path, required, what)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        label = str(path)
    elif _is_hf_dataset(source):
        label = "the datasets.Dataset"
        absent = [name for name in required if name not in source.column_names]
        if absent and len(source):
            raise DataError(
                f"{label} lacks required column {absent[0]!r}; "
                f"columns present: {_fields_text(source.column_names)}"
            )
        records = [
            _check_record(r, required, f"{label} row {i}", what) for i, r in enumerate(source, start=1)
        ]
    elif isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        label = "the given list"
        records = [
            _check_record(r, required, f"{label}, record {i}", what) for i, r in enumerate(source, start=1)
        ]
    else:
        raise TypeError(
            f"read_records reads a path ({', '.join(RECORD_SUFFIXES)}), a list of dicts "
            "or a datasets.Dataset; "
            f"got {type(source).__name__}"
        )
    if not records:
        raise DataError(
            f"{label} is empty: expected at least one {what} with string fields {_fields_text(required)}"
        )
    return records


def _json_default(value: Any) -> Any:
    """Let results hold numpy/torch scalars and arrays and paths, the values metrics come as."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable: {_value_text(value)}")


def _json_line(record: Mapping[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, default=_json_default) + "\n"


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | Path) -> None:
    """Write records as JSON lines, atomically: the file is complete or, as before, untouched."""
    text = "".join(_json_line(r) for r in records)  # serialize everything before touching the disk
    atomic_write(path, text)


def append_jsonl(record: Mapping[str, Any], path: str | Path, *, fsync: bool = False) -> None:
    """Append one record as a JSON line and flush it, so results written so far survive a kill.

    The line is serialized first and written in one call, so a value that cannot be serialized leaves the
    file as it was. If a previous writer was killed mid-line, the new record starts on a fresh line rather
    than gluing onto the torn one.

    Args:
        record: A JSON-serializable mapping (numpy/torch scalars and paths are converted).
        path: The JSONL file; created, with its parent directories, if missing.
        fsync: Also force the line to disk, surviving power loss as well as a kill (slower).
    """
    line = _json_line(record)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        if fsync:
            os.fsync(f.fileno())
