"""Checkpoints and `train --resume` (issue 13): a killed run, resumed, ends exactly as an uninterrupted one.

Three layers: the file format (`rlhf_base.checkpoint`: nested state as safetensors + JSON, atomic, never a
pickle); each built-in agent's `state_dict`/`load_state_dict` (save, go on N iterations; or restore into a
fresh agent and go on N: the same metrics and weights, to the bit); and the command itself, SIGKILLed in a
subprocess (from outside, and mid-checkpoint through the test-only `RLHF_GYM_FAULT` hook), then resumed.
Everything runs on the CPU with one thread, tiny settings. The clock columns are the only ones left out of
the comparisons: `wall_time` counts from the start of the process's learn() call, and SB3's tokens/s.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from agents import registry
from agents.registry import get_agent_class, resolve_config
from rlhf_base.checkpoint import (
    FAULT_ENV,
    CheckpointError,
    checkpoint_iteration,
    global_rng_state,
    latest_checkpoint,
    load_state,
    save_state,
    set_global_rng_state,
    write_checkpoint,
)
from rlhf_base.io import load_tensors
from rlhf_gym import cli
from rlhf_gym.train import train
from tests.test_runlog import read_tensorboard
from text_env.config import EnvConfig

ROOT = Path(__file__).resolve().parents[1]
CLOCK = {"wall_time", "sb3_collect_tokens_per_s"}  # seconds, not results: never equal between two runs
TINY_ENV = ["env.num_envs=4", "env.max_new_tokens=6"]
#: Per agent: tiny settings, and the options whose state a resume must carry (PPO's adaptive beta, the
#: moving-average baseline of REINFORCE, SB3's several updates per iteration).
AGENT_SETTINGS = {
    "ppo": ["adaptive_kl=true", "kl_target=0.01"],
    "reinforce": ["baseline=moving_average"],
    "raft": ["samples_per_prompt=2", "prompts_per_iteration=4", "batch_size=2"],
    "best_of_n": ["samples_per_prompt=2", "prompts_per_iteration=4"],
    "sb3_ppo": ["n_envs=2", "n_steps=8", "timesteps_per_iteration=24", "batch_size=8", "n_epochs=2"],
    "sb3_a2c": ["n_envs=2", "n_steps=5", "timesteps_per_iteration=16"],
    "grpo": ["samples_per_prompt=2", "num_minibatches=2", "epochs=2"],
    "dr_grpo": ["samples_per_prompt=2"],
    "remax": [],
    "reinforce_pp": ["num_minibatches=2"],
    "online_dpo": [],
}


def same(a, b) -> bool:
    """Equal, NaN equal to NaN (gold_score without a gold reward, an undefined explained variance)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def results(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in CLOCK} for row in rows]


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    got, want = results(got), results(want)
    assert [list(r) for r in got] == [list(r) for r in want]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        differ = {k: (g[k], w[k]) for k in w if not same(g[k], w[k])}
        assert not differ, f"row {i + 1} differs (got, want): {differ}"


# --------------------------------------------------------------------------------------------------------
# The format
# --------------------------------------------------------------------------------------------------------
def test_nested_state_round_trips_exactly_as_safetensors_and_json(tmp_path):
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))])
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
    optimizer.step()
    state = {
        "optimizer": optimizer.state_dict(),  # int keys, tuples (betas), 0-dim tensors (step)
        "floats": [0.1 + 0.2, float("nan"), -0.0, float("inf")],
        "pcg64": np.random.default_rng(7).bit_generator.state,  # 128-bit ints
        "array": np.arange(3, dtype=np.int64),
        "scalar": np.float32(0.1),
        "lookalike": {"__tensor__": "not a tensor"},  # a user's key that looks like a tag
        "nothing": None,
    }
    save_state(state, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "tensors.safetensors"]
    back = load_state(tmp_path)
    assert back["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][key], value)
    assert back["floats"][0] == 0.1 + 0.2 and math.isnan(back["floats"][1]) and back["floats"][3] == math.inf
    assert math.copysign(1, back["floats"][2]) == -1
    assert back["pcg64"] == state["pcg64"] and back["array"].tolist() == [0, 1, 2]
    assert type(back["scalar"]) is np.float32 and back["scalar"] == np.float32(0.1)
    assert back["lookalike"] == {"__tensor__": "not a tensor"} and back["nothing"] is None


def test_anything_but_tensors_and_json_values_is_refused_with_its_path(tmp_path):
    with pytest.raises(TypeError, match=r"'agent/extra' holds a set"):
        save_state({"agent": {"extra": {1, 2}}}, tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_global_rngs_are_put_back():
    state = global_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(2).tolist())  # noqa: NPY002
    set_global_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(2).tolist()) == first  # noqa: NPY002


def test_a_new_checkpoint_replaces_the_old_one_and_clears_a_killed_saves_leftovers(tmp_path):
    write_checkpoint(tmp_path, 1, {"x": torch.zeros(2)})
    stale = tmp_path / ".iteration-000002.abcd.tmp"  # what a save killed midway leaves
    stale.mkdir()
    (stale / "tensors.safetensors").write_bytes(b"half")
    assert latest_checkpoint(tmp_path).name == "iteration-000001"  # the half-written one is not a checkpoint
    path = write_checkpoint(tmp_path, 2, {"x": torch.ones(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iteration-000002"]
    assert latest_checkpoint(tmp_path) == path and checkpoint_iteration(path) == 2
    assert torch.equal(load_state(path)["x"], torch.ones(2))
    assert latest_checkpoint(tmp_path / "missing") is None


def test_a_checkpoint_save_keeps_a_live_writers_temporary_folder(tmp_path):
    """Two runs saving into one folder: each removes only what a dead writer left (issue 16)."""
    from rlhf_base.io import _host

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        busy = tmp_path / f".iteration-000003.{_host()}-{live.pid}.abcd1234.tmp"
        dead = tmp_path / f".iteration-000003.{_host()}-999999999.abcd1234.tmp"
        for folder in (busy, dead):
            folder.mkdir()
        write_checkpoint(tmp_path, 2, {"x": torch.zeros(2)})
        assert busy.is_dir() and not dead.exists()
    finally:
        live.kill()
        live.wait()
    write_checkpoint(tmp_path, 3, {"x": torch.ones(2)})  # its writer is gone now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iteration-000003"]


# --------------------------------------------------------------------------------------------------------
# Each built-in agent's state
# --------------------------------------------------------------------------------------------------------
def build_agent(name: str, extra: list[str] = ()):
    envs = EnvConfig(num_envs=4, max_new_tokens=6).make()  # its own core: PPO's beta must not leak
    agent_cls = get_agent_class(name)
    return agent_cls(envs, resolve_config(agent_cls, None, [*AGENT_SETTINGS[name], *extra]))


#: LoRA (issue 15): the checkpoint holds the adapter and its optimiser state; the base is the env's model.
LORA_SETTINGS = ["lora.r=4", "learning_rate=0.01"]


@pytest.mark.parametrize(
    ("name", "lora"),
    [(name, False) for name in AGENT_SETTINGS]
    + [(name, True) for name in ("ppo", "reinforce", "grpo", "raft")],
)
def test_an_agent_restored_from_its_state_goes_on_exactly_as_the_saved_one(name, lora, tmp_path):
    extra = LORA_SETTINGS if lora else []
    saved = build_agent(name, extra)
    saved.learn(2)
    save_state({"agent": saved.state_dict(), "rng": global_rng_state()}, tmp_path)
    want = saved.learn(2)

    restored = build_agent(name, extra)  # fresh: its RNGs, weights and optimiser are those of iteration 0
    state = load_state(tmp_path)
    restored.load_state_dict(state["agent"])
    set_global_rng_state(state["rng"])  # last: building an agent draws from the global RNGs (SB3 seeds them)
    got = restored.learn(2)

    assert [row["iteration"] for row in got] == [3.0, 4.0]
    assert_same_rows(got, want)
    assert_same_rows(restored.history, saved.history)
    for p, q in zip(restored.envs.policy.parameters(), saved.envs.policy.parameters(), strict=True):
        assert torch.equal(p, q)
    assert restored.envs.beta == saved.envs.beta
    if lora:  # the checkpoint holds the adapter alone, and it moved
        policy = saved.state_dict()["policy"]
        assert policy and all("lora_" in key for key in policy)
        assert any(key.endswith("lora_B.weight") and value.abs().sum() > 0 for key, value in policy.items())
    if name == "ppo":  # the controller moved beta, and the value head learned
        assert saved.envs.beta != 0.05 and torch.equal(restored.value_head.weight, saved.value_head.weight)


# --------------------------------------------------------------------------------------------------------
# `rlhf-gym train`: killed, then resumed
# --------------------------------------------------------------------------------------------------------
ITERATIONS = 8
TRAIN_ARGS = ["--agent", "ppo", "--no-progress", "--checkpoint-every", "1", f"iterations={ITERATIONS}"]
TRAIN_ARGS += TINY_ENV + AGENT_SETTINGS["ppo"]
RESUME_ARGS = ["--resume", "--agent", "ppo", "--no-progress"]  # the run's own configs: none given


def start_train(run_dir: Path, *args: str, fault: str | None = None) -> subprocess.Popen:
    """`rlhf-gym train` in its own process, one thread as in this one (the thread count sets the length
    groups of the teacher-forced forwards, hence the float sums)."""
    code = "import sys, torch; torch.set_num_threads(1); from rlhf_gym.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    command = [sys.executable, "-c", code, "train", "--run-dir", str(run_dir), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> int:
    out, err = process.communicate(timeout=300)
    assert process.returncode in (0, -signal.SIGKILL), err[-3000:]
    return process.returncode


def read_run(run_dir: Path) -> dict:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [{k: float(v) if k != "agent" else v for k, v in row.items()} for row in csv.DictReader(f)]
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    weights = load_tensors(run_dir / "policy" / "model.safetensors")
    return {
        "csv": rows,
        "jsonl": jsonl,
        "final": summary["final"],
        "reference": summary["reference"],
        "w": weights,
    }


def assert_same_run(got: dict, want: dict) -> None:
    assert_same_rows(got["csv"], want["csv"])
    assert_same_rows(got["jsonl"], want["jsonl"])
    assert_same_rows([got["final"], got["reference"]], [want["final"], want["reference"]])
    assert got["w"].keys() == want["w"].keys()
    assert all(torch.equal(got["w"][k], want["w"][k]) for k in want["w"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The run as it goes without a kill (in this process: one thread too, the same code)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert cli.main(["train", "--run-dir", str(run_dir), *TRAIN_ARGS]) == 0
    return {"run_dir": run_dir, **read_run(run_dir)}


def test_a_run_killed_mid_checkpoint_then_from_outside_resumes_to_the_uninterrupted_result(
    uninterrupted, tmp_path
):
    """Killed twice, resumed twice: first by the fault hook in the middle of saving checkpoint 3 (the previous
    one must stay loadable), then by a SIGKILL from outside at whatever point it lands after checkpoint 4
    (mid-iteration, mid-row or mid-save). The end is the uninterrupted run's, to the bit."""
    checkpoints = tmp_path / "checkpoints"
    assert finish(start_train(tmp_path, *TRAIN_ARGS, fault="kill-during-checkpoint:3")) == -signal.SIGKILL
    leftovers = [p.name for p in checkpoints.iterdir() if p.name.startswith(".iteration-000003.")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # the half-written save, tensors only
    assert latest_checkpoint(checkpoints).name == "iteration-000002"
    assert len(load_state(checkpoints / "iteration-000002")["agent"]["history"]) == 2  # loadable
    assert (
        len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 3
    )  # row 3 was written, then the save

    process = start_train(tmp_path, *RESUME_ARGS)
    deadline = time.monotonic() + 240
    while (found := latest_checkpoint(checkpoints)) is None or checkpoint_iteration(found) < 4:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert finish(process) == -signal.SIGKILL, "the run finished before the kill: nothing was tested"
    assert not any(
        p.name.startswith(".iteration-000003.") for p in checkpoints.iterdir()
    )  # cleaned by a save

    assert finish(start_train(tmp_path, *RESUME_ARGS)) == 0
    assert_same_run(read_run(tmp_path), uninterrupted)
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"iteration-{ITERATIONS:06d}"]
    scalars = read_tensorboard(tmp_path / "tensorboard")["ppo/rm_score"]  # each step once: the kills' hidden
    assert scalars == [(int(r["iteration"]), pytest.approx(r["rm_score"])) for r in uninterrupted["csv"]]


# --------------------------------------------------------------------------------------------------------
# What --resume refuses, and agents without state
# --------------------------------------------------------------------------------------------------------
def test_resume_refuses_another_config_and_a_folder_without_checkpoints(uninterrupted, tmp_path, capsys):
    run_dir = str(uninterrupted["run_dir"])
    assert cli.main(["train", "--run-dir", run_dir, "--resume", "--agent", "ppo", "learning_rate=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "learning_rate is 0.1 now, 0.0003 in the run" in err
    assert cli.main(["train", "--run-dir", run_dir, "--resume", "--agent", "ppo", "env.beta=0.5"]) == 2
    assert "env.beta is 0.5 now, 0.05 in the run" in capsys.readouterr().err
    assert cli.main(["train", "--run-dir", run_dir, "--resume", "--agent", "reinforce"]) == 2
    assert "is a checkpoint of agent 'ppo', not 'reinforce'" in capsys.readouterr().err
    assert cli.main(["train", "--run-dir", str(tmp_path), "--resume", "--agent", "ppo"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "nothing to resume" in err


class _NoStateAgent(get_agent_class("best_of_n")):
    """A user's agent without the checkpoint methods."""

    name = "no_state"
    state_dict = load_state_dict = None


def test_an_agent_without_state_methods_is_named_when_checkpoints_are_asked_for(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(registry._REGISTRY, "no_state_test_agent", _NoStateAgent)
    args = ["--agent", "no_state_test_agent", "--no-progress", "iterations=1", "samples_per_prompt=2"]
    args += ["prompts_per_iteration=2", *TINY_ENV]
    assert cli.main(["train", "--run-dir", str(tmp_path), "--checkpoint-every", "2", *args]) == 2
    assert "has no state_dict() and load_state_dict()" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="state_dict"):
        train("no_state_test_agent", tmp_path, overrides=args[3:], resume=True)
    with pytest.warns(
        UserWarning, match="writes no checkpoints"
    ):  # the default: trains, says it cannot resume
        assert cli.main(["train", "--run-dir", str(tmp_path), *args]) == 0
    assert not (tmp_path / "checkpoints").exists() and (tmp_path / "summary.json").is_file()
