"""Shared fixtures: the embedded default model is built once (cached on disk) and shared per worker."""

from __future__ import annotations

import pytest
import torch

import text_env
from rlhf_base.models import trainable_copy
from text_env.core import EnvCore

torch.set_num_threads(1)  # two xdist workers on two cores


_SHARED: list[EnvCore] = []  # the session's core, once a test has asked for it


@pytest.fixture(scope="session")
def core() -> EnvCore:
    """The default env core: tiny-reviews model, reviews task, gold reward as the reward model."""
    _SHARED.append(EnvCore())
    return _SHARED[0]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.fixture(autouse=True)
def _pristine_shared_core():
    """After each test, the shared core's policy is again an untrained copy of pi_ref and its beta the
    default: a test that trains through the shared core (an agent's `set_policy`, PPO's adaptive beta)
    must not change what the next test on this worker sees, whichever tests xdist put before it."""
    yield
    if not _SHARED:
        return
    shared = _SHARED[0]
    policy = shared.judge.policy
    if (
        policy is shared.reference
        or type(policy) is not type(shared.reference)
        or not _same_weights(policy, shared.reference)
    ):
        shared.judge.policy = trainable_copy(shared.reference)
    shared.beta = EnvCore.__init__.__kwdefaults__["beta"]


@pytest.fixture(scope="session")
def tokenizer(core):
    return core.tokenizer


@pytest.fixture()
def env(core):
    return text_env.TextGenEnv(core=core)
