"""Behavioural tests for :mod:`rlhf_base.io`: atomic writes, safetensors, record loading and its errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rlhf_base.io import (
    DataError,
    append_jsonl,
    atomic_dir,
    atomic_path,
    atomic_write,
    load_tensors,
    load_tensors_metadata,
    read_records,
    save_tensors,
    write_jsonl,
)

PAIRS = [
    {"prompt": "p1", "chosen": "good", "rejected": "bad"},
    {"prompt": "p2", "chosen": "nice", "rejected": "mean", "source": "hand"},
]
REQUIRED = ("prompt", "chosen", "rejected")


def siblings(path: Path) -> list[str]:
    """Everything in ``path``'s directory except ``path``: temp files that should not have been left."""
    return sorted(p.name for p in path.parent.iterdir() if p != path)


# --------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------
def test_atomic_write_creates_parents_and_replaces(tmp_path):
    path = tmp_path / "a" / "b.txt"
    atomic_write(path, "old")
    atomic_write(path, b"new")
    assert path.read_text() == "new"
    assert siblings(path) == []
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's private 0600


def test_atomic_path_keeps_old_file_when_writer_raises_midway(tmp_path):
    path = tmp_path / "ckpt.bin"
    path.write_bytes(b"old contents")
    with pytest.raises(RuntimeError, match="killed"), atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp.suffix == ".bin"  # same dir, same suffix
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("killed")
    assert path.read_bytes() == b"old contents"
    assert siblings(path) == []  # temp removed


def test_atomic_dir_writes_and_replaces_a_directory(tmp_path):
    path = tmp_path / "checkpoint"
    with atomic_dir(path) as tmp:
        (tmp / "weights.txt").write_text("v1")
        (tmp / "stale.txt").write_text("only in v1")
    assert (path / "weights.txt").read_text() == "v1"
    with atomic_dir(path) as tmp:
        assert not path.samefile(tmp)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.txt").write_text("v2")
    assert sorted(p.name for p in path.iterdir()) == ["sub"]  # replaced, not merged
    assert (path / "sub" / "weights.txt").read_text() == "v2"
    assert siblings(path) == []  # neither the temp nor the old version remains


def test_atomic_dir_keeps_old_directory_when_writer_raises(tmp_path):
    path = tmp_path / "checkpoint"
    path.mkdir()
    (path / "weights.txt").write_text("v1")
    with pytest.raises(OSError, match="disk full"), atomic_dir(path) as tmp:
        (tmp / "weights.txt").write_text("partial")
        raise OSError("disk full")
    assert [p.name for p in path.iterdir()] == ["weights.txt"]
    assert (path / "weights.txt").read_text() == "v1"
    assert siblings(path) == []


# --------------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------------
def test_safetensors_round_trip_with_metadata_tied_and_noncontiguous(tmp_path):
    weight = torch.randn(4, 3)
    tensors = {
        "embed": weight,
        "lm_head": weight,  # tied weights share storage, which safetensors refuses as is
        "t": torch.arange(12, dtype=torch.int64).reshape(3, 4).T,  # non-contiguous
        "half": torch.ones(2, dtype=torch.bfloat16),
    }
    path = tmp_path / "model.safetensors"
    save_tensors(tensors, path, metadata={"step": "7"})
    loaded = load_tensors(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    assert load_tensors_metadata(path) == {"step": "7"}
    assert siblings(path) == []
    with pytest.raises(TypeError, match="metadata must map str to str"):
        save_tensors(tensors, path, metadata={"step": 7})
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_tensors(tmp_path / "nope.safetensors")


def test_tensor_files_are_not_pickles(tmp_path):
    path = tmp_path / "x.safetensors"
    save_tensors({"x": torch.zeros(1)}, path)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert json.loads(path.read_bytes()[8 : 8 + header_len])["x"]["dtype"] == "F32"


# --------------------------------------------------------------------------------------------------------
# read_records: every format
# --------------------------------------------------------------------------------------------------------
def test_read_records_from_list_jsonl_json_csv(tmp_path):
    assert read_records(PAIRS, REQUIRED) == PAIRS

    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps(PAIRS[0]) + "\n\n   \n" + json.dumps(PAIRS[1]) + "\n")  # blank lines skipped
    assert read_records(jsonl, REQUIRED) == PAIRS

    js = tmp_path / "pairs.json"
    js.write_text(json.dumps(PAIRS))
    assert read_records(str(js), REQUIRED) == PAIRS

    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text('prompt,chosen,rejected\np1,good,bad\n"p2, with comma","multi\nline",mean\n')
    records = read_records(csv_path, REQUIRED)
    assert all(type(r) is dict for r in records)  # plain dicts, whatever the reader built
    assert records == [
        {"prompt": "p1", "chosen": "good", "rejected": "bad"},
        {"prompt": "p2, with comma", "chosen": "multi\nline", "rejected": "mean"},
    ]


def test_read_records_from_parquet_and_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{k: r[k] for k in REQUIRED} for r in PAIRS]
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    assert read_records(path, REQUIRED) == rows
    assert read_records(datasets.Dataset.from_list(rows), REQUIRED) == rows
    with pytest.raises(DataError, match=r"the datasets.Dataset lacks required column 'rejected'"):
        read_records(datasets.Dataset.from_list([{"prompt": "p", "chosen": "c"}]), REQUIRED)


def test_parquet_row_errors_name_file_and_row(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "chosen": ["x", None]}), path)
    assert data_error(path, ("prompt", "chosen"), what="pair") == (
        f"{path} row 2: field 'chosen' of the pair must be a string, got None (NoneType)"
    )


# --------------------------------------------------------------------------------------------------------
# read_records: errors name file, line and field
# --------------------------------------------------------------------------------------------------------
def data_error(source, required=REQUIRED, **kwargs) -> str:
    """The message of the DataError that ``read_records`` must raise."""
    with pytest.raises(DataError) as info:
        read_records(source, required, **kwargs)
    return str(info.value)


def test_malformed_jsonl_line_names_file_line_and_json_error(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + '\n{"prompt": "p2", "chosen": \n')
    assert f"{path} line 2: malformed JSON (Expecting value at column 28)" in data_error(path)


def test_missing_field_names_field_file_line_and_present_fields(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n\n" + json.dumps({"prompt": "p", "rejected": "r"}) + "\n")
    assert data_error(path, what="preference pair") == (
        f"{path} line 3: preference pair is missing required field 'chosen'; "
        "fields present: 'prompt', 'rejected'"
    )


def test_missing_field_in_json_list_csv_and_list(tmp_path):
    js = tmp_path / "pairs.json"
    js.write_text(json.dumps([PAIRS[0], {"prompt": "p"}]))
    assert data_error(js) == (
        f"{js} record 2: record is missing required field 'chosen'; fields present: 'prompt'"
    )

    no_column = tmp_path / "no_column.csv"
    no_column.write_text("prompt,chosen\np,c\n")
    assert data_error(no_column) == (
        f"{no_column} line 1: the CSV header lacks required column 'rejected'; "
        "columns present: 'prompt', 'chosen'"
    )

    short_row = tmp_path / "short_row.csv"
    short_row.write_text("prompt,chosen,rejected\np,c,r\np2,c2\n")
    assert data_error(short_row) == (
        f"{short_row} row 2 (line 3): record is missing required field 'rejected'; "
        "fields present: 'prompt', 'chosen'"
    )

    assert data_error([{"prompt": "p"}]).startswith(
        "the given list, record 1: record is missing required field 'chosen'"
    )


def test_non_string_required_value_and_non_object_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": 3, "rejected": "r"}) + "\n")
    assert data_error(path) == f"{path} line 1: field 'chosen' of the record must be a string, got 3 (int)"
    path.write_text("[1, 2]\n")
    assert data_error(path).startswith(f"{path} line 1: expected a record (a mapping of field names")


def test_empty_sources_say_what_was_expected(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    assert data_error(path, ["prompt"], what="prompt") == (
        f"{path} is empty: expected at least one prompt with string fields 'prompt'"
    )
    assert data_error([]).startswith("the given list is empty")
    js = tmp_path / "object.json"
    js.write_text('{"prompt": "p"}')
    assert "must hold a JSON list of record objects, got a dict (for one record per line, use a .jsonl" in (
        data_error(js, ["prompt"])
    )


def test_unknown_suffix_and_missing_file(tmp_path):
    assert data_error(tmp_path / "pairs.txt").endswith(
        "unsupported file type '.txt'; supported: .jsonl, .json, .csv, .parquet"
    )
    missing = tmp_path / "missing.jsonl"
    assert data_error(missing) == f"record file not found: {missing}"
    with pytest.raises(TypeError, match="got int"):
        read_records(3, REQUIRED)


# --------------------------------------------------------------------------------------------------------
# Writing records
# --------------------------------------------------------------------------------------------------------
def test_write_jsonl_round_trip_and_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(PAIRS, path)
    assert read_records(path, REQUIRED) == PAIRS
    with pytest.raises(TypeError):
        write_jsonl([PAIRS[0], {"x": object()}], path)  # fails before touching the file
    assert read_records(path, REQUIRED) == PAIRS and siblings(path) == []


def test_append_jsonl_flushes_each_line_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "results" / "metrics.jsonl"
    append_jsonl({"step": 1, "reward": torch.tensor(0.5), "path": Path("x")}, path)
    assert json.loads(path.read_text()) == {"step": 1, "reward": 0.5, "path": "x"}  # visible before close
    with path.open("a") as f:
        f.write('{"step": 2, "rew')  # a writer killed mid-line
    append_jsonl({"step": 3}, path)
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1]) == {"step": 3}
    assert len(lines) == 3
    with pytest.raises(TypeError):
        append_jsonl({"bad": object()}, path)
    assert path.read_text().endswith('{"step": 3}\n')
    assert os.path.getsize(path) == len(path.read_bytes())


# --------------------------------------------------------------------------------------------------------
# A save killed mid-way: its temporary sibling is removed by the next save, a live writer's is kept
# --------------------------------------------------------------------------------------------------------
_KILLED_SAVE = """
import sys, time
from pathlib import Path
from rlhf_base.io import atomic_dir, atomic_path

target, kind = Path(sys.argv[1]), sys.argv[2]
with (atomic_dir(target) if kind == "dir" else atomic_path(target)) as tmp:
    (tmp / "half.safetensors").write_bytes(b"half") if kind == "dir" else tmp.write_bytes(b"half")
    print(tmp, flush=True)
    time.sleep(600)  # SIGKILLed here, mid-save
"""


def _killed_save(target: Path, kind: str) -> Path:
    """Run a save in a subprocess, SIGKILL it mid-save (reaped: no zombie), return the temporary it left."""
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, str(target), kind],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    leftover = Path(process.stdout.readline().strip())
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    assert process.returncode == -signal.SIGKILL and leftover.exists() and leftover.parent == target.parent
    return leftover


def _live_process():
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def test_the_next_save_removes_a_killed_saves_temporary_and_keeps_a_live_ones(tmp_path):
    from rlhf_base.io import _host

    model = tmp_path / "policy"
    with atomic_dir(model) as tmp:
        (tmp / "weights.safetensors").write_bytes(b"v1")
    killed = _killed_save(model, "dir")  # `.policy.HOST-PID.RANDOM.tmp`, its writer gone
    assert killed.name.startswith(f".policy.{_host()}-") and killed.name.endswith(".tmp")
    live = _live_process()
    try:
        busy = tmp_path / f".policy.{_host()}-{live.pid}.abcd1234.tmp"  # a concurrent save, still writing
        busy.mkdir()
        elsewhere = tmp_path / f".policy.0badc0de-{live.pid + 1}.abcd1234.tmp"  # another host's: unknowable
        elsewhere.mkdir()
        other = tmp_path / f".reward_model.{_host()}-999999999.abcd1234.tmp"  # another target's: not ours
        other.mkdir()
        with atomic_dir(model) as tmp:
            (tmp / "weights.safetensors").write_bytes(b"v2")
        assert not killed.exists(), "the killed save's temporary folder is removed by the next save"
        assert busy.is_dir() and elsewhere.is_dir() and other.is_dir()
    finally:
        live.kill()
        live.wait()
    assert (model / "weights.safetensors").read_bytes() == b"v2"

    report = tmp_path / "report.md"
    killed_file = _killed_save(report, "file")  # `.report.HOST-PID.RANDOM.tmp.md`
    assert killed_file.name.endswith(".tmp.md")
    atomic_write(report, "done")
    assert not killed_file.exists() and report.read_text() == "done"


def test_a_leftover_with_our_own_pid_is_stale_unless_this_process_writes_it(tmp_path):
    """A container restarted counts PIDs from 1 again: a killed run's PID may be ours now."""
    from rlhf_base.io import _owner, remove_stale_temps

    path = tmp_path / "summary.json"
    inherited = tmp_path / f".summary.{_owner()}.zz99zz99.tmp.json"
    inherited.write_text("{")
    with atomic_path(path) as tmp:
        assert not inherited.exists()  # removed before this save began
        assert remove_stale_temps(path) == [] and tmp.exists()  # our own save in progress is kept
        tmp.write_text("{}")
    assert path.read_text() == "{}" and siblings(path) == []


def test_a_directory_set_aside_by_a_killed_swap_is_put_back_or_removed(tmp_path):
    """Killed between atomic_dir's two renames: the previous version is the `.old` sibling, and the only copy
    when the target is missing; the next save puts it back first, so a failing save loses nothing."""
    from rlhf_base.io import _host, remove_stale_temps

    path = tmp_path / "checkpoint"
    old = tmp_path / f".checkpoint.{_host()}-999999999.abcd1234.old"
    old.mkdir()
    (old / "weights.txt").write_text("v1")
    assert remove_stale_temps(path) == [old]
    assert (path / "weights.txt").read_text() == "v1" and not old.exists()
    old.mkdir()  # and with the target present, the set-aside copy is only a leftover
    assert remove_stale_temps(path) == [old] and not old.exists() and path.is_dir()


# --------------------------------------------------------------------------------------------------------
# Bad tensor files: named, and pickles never opened
# --------------------------------------------------------------------------------------------------------
def test_a_truncated_safetensors_file_is_named(tmp_path):
    from rlhf_base.io import check_safetensors

    path = tmp_path / "model.safetensors"
    save_tensors({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:1000])  # a copy cut short
    for read in (load_tensors, load_tensors_metadata, check_safetensors):
        with pytest.raises(
            DataError, match=rf"{path} is not a readable safetensors file.*truncated or corrupt"
        ):
            read(path)
    path.write_bytes(b"")
    with pytest.raises(
        DataError, match=r"model.safetensors is not a readable safetensors file \(it is empty\)"
    ):
        load_tensors(path)


def test_pickled_weights_are_refused_by_name_and_never_opened(tmp_path, monkeypatch):
    from rlhf_base.io import check_weights_folder

    def never(*args, **kwargs):
        raise AssertionError("torch.load was called: a pickle was opened")

    monkeypatch.setattr(torch, "load", never)
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"PK\x03\x04 not opened anyway")
    for read in (load_tensors, load_tensors_metadata):
        with pytest.raises(
            DataError, match=rf"{weights} is a pickle weights file \(\.bin\).*safetensors only"
        ):
            read(weights)
    with pytest.raises(DataError, match=r"pytorch_model.bin is a pickle weights file.*save_pretrained"):
        check_weights_folder(tmp_path)
    disguised = tmp_path / "model.safetensors"  # a torch.save zip under a safetensors name
    disguised.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(
        DataError, match=r"model.safetensors is not a readable .* looks like a torch.save pickle"
    ):
        check_weights_folder(tmp_path)
    disguised.unlink()
    (tmp_path / "training_args.bin").write_bytes(b"x")  # a trainer's pickle beside safetensors weights: fine
    save_tensors({"w": torch.zeros(1)}, tmp_path / "model.safetensors")
    check_weights_folder(tmp_path)
