"""Preference pairs `{prompt, chosen, rejected}`: the data a Bradley-Terry reward model learns from.

Pairs come from a JSONL/JSON/CSV/Parquet file, a `datasets.Dataset` or a list of dicts, all through
`rlhf_base.io.read_records`, so a malformed line, a missing field or an empty file is reported with the file
and line. Extra fields are kept (the labeller stores the gold scores of both responses for evaluation, and a
numeric field can serve as a margin).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_base.io import DataError, read_records, write_jsonl

__all__ = ["PAIR_FIELDS", "load_pairs", "write_pairs"]

PAIR_FIELDS = ("prompt", "chosen", "rejected")
"""The fields every preference pair must have, each a string."""


def _locations(source: Any, count: int) -> list[str]:
    """Where each record came from, in the words `read_records` uses; computed only to report an error."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        suffix = path.suffix.lower()
        if suffix == ".jsonl":  # blank lines carry no record, so record i is the i-th non-blank line
            with path.open(encoding="utf-8") as f:
                lines = [n for n, line in enumerate(f, start=1) if line.strip()]
            return [f"{path} line {n}" for n in lines]
        unit = "record" if suffix == ".json" else "row"
        return [f"{path} {unit} {i}" for i in range(1, count + 1)]
    if isinstance(source, Sequence):
        return [f"the given list, record {i}" for i in range(1, count + 1)]
    return [f"the datasets.Dataset row {i}" for i in range(1, count + 1)]


def load_pairs(source: Any) -> list[dict[str, Any]]:
    """Read preference pairs and check them.

    Args:
        source: a path (`.jsonl`, `.json`, `.csv`, `.parquet`), a `datasets.Dataset`, or a list of dicts,
            each with string fields `prompt`, `chosen` and `rejected` (other fields are kept).

    Returns:
        The pairs as plain dicts, in order.

    Raises:
        rlhf_base.io.DataError: the source is missing, empty or malformed, a field is missing or not a
            string, or a pair's chosen and rejected responses are identical (such a pair says nothing
            about which is better, and its Bradley-Terry loss is a constant log 2). The message names the
            file and line, or the index.
    """
    pairs = read_records(source, required=PAIR_FIELDS, what="preference pair")
    same = [i for i, pair in enumerate(pairs) if pair["chosen"] == pair["rejected"]]
    if same:
        where = _locations(source, len(pairs))[same[0]]
        raise DataError(
            f"{where}: the preference pair has identical chosen and rejected responses "
            f"({pairs[same[0]]['chosen'][:60]!r}), which carries no preference; {len(same)} such pair(s) "
            "in all: drop them"
        )
    return pairs


def write_pairs(pairs: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Check `pairs` as `load_pairs` does, then write them as JSONL, atomically. Returns the path."""
    checked = load_pairs(list(pairs))
    write_jsonl(checked, path)
    return Path(path)
