"""Shared fixtures: the embedded default model is built once (cached on disk) and shared per worker."""

from __future__ import annotations

import pytest
import torch

import text_env
from text_env.core import EnvCore

torch.set_num_threads(1)  # two xdist workers on two cores


@pytest.fixture(scope="session")
def core() -> EnvCore:
    """The default env core: tiny-reviews model, reviews task, gold reward as the reward model."""
    return EnvCore()


@pytest.fixture(scope="session")
def tokenizer(core):
    return core.tokenizer


@pytest.fixture()
def env(core):
    return text_env.TextGenEnv(core=core)
