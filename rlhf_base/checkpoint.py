"""Training checkpoints: nested state as safetensors + JSON, written atomically, never pickled.

A training state is a nested structure of dicts, lists and tuples whose leaves are tensors, numpy arrays
and JSON values (None, bool, int, float, str): an agent's `state_dict()` (weights, optimiser state, RNG
states, its counters and metrics history), the process's global RNGs (:func:`global_rng_state`), and
whatever the trainer adds. :func:`save_state` splits it into

* ``tensors.safetensors``: every tensor and array, named by its path in the structure (``agent/policy/...``);
* ``state.json``: the structure itself, with each tensor replaced by ``{"__tensor__": name}``.

Nothing is pickled and nothing is unpickled: loading is safetensors' memory map plus ``json.loads``, so a
checkpoint downloaded or shared cannot run code (``torch.load`` of a pickle can). JSON keeps Python floats
exactly (``repr`` round trips), NaN and infinities included; tuples, dicts with int keys (an optimiser's
state) and numpy values are tagged so they come back as they were.

A run folder keeps its checkpoints in ``checkpoints/iteration-NNNNNN/`` (:func:`write_checkpoint`). Each is
written into a temporary sibling, fsync'd and renamed into place (`rlhf_base.io.atomic_dir`); the older ones
are deleted only after the new one is on disk. So a kill at any moment leaves the previous checkpoint
complete and loadable, and :func:`latest_checkpoint` finds it; the temporary folder a killed save leaves
behind is removed by the next save (`rlhf_base.io.remove_stale_temps`: only when its writer's PID is gone, so
a live save into the same folder keeps its own).

Test-only fault injection: with the environment variable ``RLHF_GYM_FAULT=kill-during-checkpoint:ITER``,
the save of iteration ITER SIGKILLs its own process after writing the tensors and before the JSON, inside
the temporary folder, as a crash mid-save would (``tests/test_checkpoint.py``). Never set it otherwise.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf_base.io import atomic_dir, atomic_write, load_tensors, remove_stale_temps, save_tensors

__all__ = [
    "CHECKPOINTS_DIR",
    "FAULT_ENV",
    "CheckpointError",
    "checkpoint_iteration",
    "global_rng_state",
    "latest_checkpoint",
    "load_state",
    "save_state",
    "set_global_rng_state",
    "write_checkpoint",
]

CHECKPOINTS_DIR = "checkpoints"  # in the run folder
FAULT_ENV = "RLHF_GYM_FAULT"  # test-only fault injection, see the module docstring
FORMAT = "rlhf-gym-checkpoint"
VERSION = 1
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
_NAME = re.compile(r"^iteration-(\d+)$")
#: A temporary sibling of a checkpoint: `atomic_dir`'s `.iteration-NNNNNN.HOST-PID.RANDOM.tmp` (or `.old`), or
#: one written before temporary names carried their writer (`.iteration-NNNNNN.RANDOM.tmp`, `.old-RANDOM`).
_TEMP = re.compile(r"^\.(iteration-\d+)\.(?:(?P<owner>[0-9a-f]{8}-\d+)\.)?")
_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__items__")


class CheckpointError(RuntimeError):
    """No checkpoint where one is needed, or one that cannot be read; the message says which and where."""


# --------------------------------------------------------------------------------------------------------
# The process's global RNGs
# --------------------------------------------------------------------------------------------------------
def global_rng_state() -> dict[str, Any]:
    """Python's `random`, numpy's global RNG, torch's CPU RNG and (when initialised) every CUDA device's.

    These are what code without its own generator draws from (SB3's action sampling and minibatch order,
    dropout); an agent's own generators belong to its `state_dict()`.
    """
    version, internal, gauss = random.getstate()
    # The legacy global RNG is the point here: code that draws from it (SB3's minibatch order) must resume.
    numpy_state = np.random.get_state(legacy=False)  # noqa: NPY002  {"bit_generator", "state": {key, pos}, ...}
    numpy_state["state"] = {"key": numpy_state["state"]["key"].tolist(), "pos": numpy_state["state"]["pos"]}
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss},
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what :func:`global_rng_state` returned."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {
        "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
        "pos": numpy_state["state"]["pos"],
    }
    np.random.set_state(numpy_state)  # noqa: NPY002  (see global_rng_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# --------------------------------------------------------------------------------------------------------
# Nested state <-> safetensors + JSON
# --------------------------------------------------------------------------------------------------------
def _flatten(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """The JSON skeleton of `value`; its tensors (and numpy values, as tensors) go into `tensors`."""
    if isinstance(value, torch.Tensor) or isinstance(value, (np.ndarray, np.generic)):
        name = path or "value"
        while name in tensors:  # two paths that join to one name ("a/b" as a key and as a nesting)
            name += "'"
        if isinstance(value, torch.Tensor):
            tensors[name] = value
            return {"__tensor__": name}
        try:
            tensors[name] = torch.from_numpy(np.array(value))  # a copy: safetensors then owns it
        except TypeError as e:
            raise TypeError(
                f"checkpoint state at {path!r}: numpy dtype {value.dtype} has no torch twin"
            ) from e
        return {"__ndarray__": name, "scalar": isinstance(value, np.generic)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        plain = all(isinstance(k, str) and k not in _TAGS for k in value)
        if plain:
            return {k: _flatten(v, f"{path}/{k}" if path else k, tensors) for k, v in value.items()}
        for key in value:
            if not (key is None or isinstance(key, (bool, int, float, str))):
                raise TypeError(f"checkpoint state at {path!r}: key {key!r} is not a JSON scalar")
        return {"__items__": [[k, _flatten(v, f"{path}/{k}", tensors)] for k, v in value.items()]}
    raise TypeError(
        f"checkpoint state at {path!r} holds a {type(value).__name__}: only dicts, lists, tuples, tensors, "
        "numpy arrays and JSON values (None, bool, int, float, str) are stored (never pickles)"
    )


def _unflatten(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        array = tensors[value["__ndarray__"]].numpy()
        return array[()] if value["scalar"] else array
    if "__tuple__" in value:
        return tuple(_unflatten(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {k: _unflatten(v, tensors) for k, v in value["__items__"]}
    return {k: _unflatten(v, tensors) for k, v in value.items()}


def save_state(state: Mapping[str, Any], folder: str | Path, _fault: bool = False) -> None:
    """Write `state` into `folder` (which must exist) as ``tensors.safetensors`` + ``state.json``.

    Not atomic by itself: :func:`write_checkpoint` calls it inside a temporary folder.

    Raises:
        TypeError: a leaf is none of the stored types; the message gives its path in `state`.
    """
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    text = json.dumps({"format": FORMAT, "version": VERSION, "state": skeleton})  # fails before any write
    save_tensors(tensors, folder / TENSORS_FILE)
    if _fault:
        os.kill(os.getpid(), signal.SIGKILL)  # test-only: a crash between the two files (module docstring)
    atomic_write(folder / STATE_FILE, text)


def load_state(folder: str | Path) -> dict[str, Any]:
    """Read what :func:`save_state` wrote: tensors come back on the CPU, everything else as it was saved.

    Raises:
        CheckpointError: a file is missing or is not an rlhf-gym checkpoint (the message names it).
    """
    folder = Path(folder)
    try:
        document = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        tensors = load_tensors(folder / TENSORS_FILE)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the checkpoint in {folder}: {e}") from e
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{folder / STATE_FILE} is not an rlhf-gym checkpoint")
    if document.get("version") != VERSION:
        raise CheckpointError(
            f"{folder} is a version {document.get('version')} checkpoint; this rlhf-gym reads version {VERSION}"
        )
    return _unflatten(document["state"], tensors)


# --------------------------------------------------------------------------------------------------------
# A run folder's checkpoints
# --------------------------------------------------------------------------------------------------------
def checkpoint_iteration(folder: str | Path) -> int | None:
    """The iteration of a checkpoint folder named ``iteration-NNNNNN``, or None for any other name."""
    match = _NAME.match(Path(folder).name)
    return int(match.group(1)) if match else None


def _fault_at(iteration: int) -> bool:
    kind, _, at = os.environ.get(FAULT_ENV, "").partition(":")
    return kind == "kill-during-checkpoint" and at.strip() == str(iteration)


def write_checkpoint(root: str | Path, iteration: int, state: Mapping[str, Any]) -> Path:
    """Save `state` as ``root/iteration-NNNNNN`` atomically, then delete the older checkpoints in `root`.

    Temporary folders left by a killed save of any iteration are removed first (those whose writer is gone:
    a live save's is kept). Returns the new checkpoint's folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():  # a killed save's temporary folder, of this iteration or another
        match = _TEMP.match(entry.name)
        if match is None or not (entry.name.endswith((".tmp", ".old")) or ".old-" in entry.name):
            continue
        if match["owner"]:
            remove_stale_temps(root / match[1])  # its writer's PID tells whether it is still writing
        else:  # an older rlhf-gym's name, without its writer: the run that owns this folder left it
            shutil.rmtree(entry, ignore_errors=True)
    path = root / f"iteration-{iteration:06d}"
    with atomic_dir(path) as tmp:
        save_state(state, tmp, _fault=_fault_at(iteration))
    for entry in root.iterdir():
        done = checkpoint_iteration(entry)
        if done is not None and done != iteration and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
    return path


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint of the highest iteration in `root`, or None if there is none.

    A folder with a checkpoint's name is complete: it got that name by a rename after it was written.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    found = [(checkpoint_iteration(e), e) for e in root.iterdir() if e.is_dir()]
    found = [(i, e) for i, e in found if i is not None and (e / STATE_FILE).is_file()]
    return max(found)[1] if found else None
