"""Checkpoints and `train --resume` (issue 13): a killed run, resumed, ends exactly as an uninterrupted one.

Three layers: the file format (`rlhf_base.checkpoint`: nested state as safetensors + JSON, atomic, never a
pickle); each built-in agent's `state_dict`/`load_state_dict` (save, go on N iterations; or restore into a
fresh agent and go on N: the same metrics and weights, to the bit); and the command itself, SIGKILLed in a
subprocess (from outside, and mid-checkpoint through the test-only `RLHF_GYM_FAULT` hook), then resumed.
Everything runs on the CPU with one thread, tiny settings. The clock columns are the only ones left out of
the comparisons: `wall_time` counts from the start of the process's learn() call, and SB3's tokens/s.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.registry import get_agent_class, resolve_config
from rlhf_base.checkpoint import (
    checkpoint_iteration,
    global_rng_state,
    latest_checkpoint,
    load_state,
    save_state,
    set_global_rng_state,
    write_checkpoint,
)
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


# --------------------------------------------------------------------------------------------------------
# Each built-in agent's state
# --------------------------------------------------------------------------------------------------------
def build_agent(name: str):
    envs = EnvConfig(num_envs=4, max_new_tokens=6).make()  # its own core: PPO's beta must not leak
    agent_cls = get_agent_class(name)
    return agent_cls(envs, resolve_config(agent_cls, None, AGENT_SETTINGS[name]))


@pytest.mark.parametrize("name", list(AGENT_SETTINGS))
def test_an_agent_restored_from_its_state_goes_on_exactly_as_the_saved_one(name, tmp_path):
    saved = build_agent(name)
    saved.learn(2)
    save_state({"agent": saved.state_dict(), "rng": global_rng_state()}, tmp_path)
    want = saved.learn(2)

    restored = build_agent(name)  # fresh: its RNGs, weights and optimiser are those of iteration 0
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
    if name == "ppo":  # the controller moved beta, and the value head learned
        assert saved.envs.beta != 0.05 and torch.equal(restored.value_head.weight, saved.value_head.weight)
