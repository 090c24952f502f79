"""Helpers shared by the agent tests."""

from __future__ import annotations

import torch

import text_env
from rlhf_base.models import trainable_copy
from text_env.core import EnvCore


def fresh_envs(core: EnvCore, num_envs: int) -> text_env.TextGenVectorEnv:
    """A vector env whose policy is a fresh copy of pi_ref, so training never leaks into other tests."""
    envs = text_env.TextGenVectorEnv(num_envs=num_envs, core=core)
    envs.set_policy(trainable_copy(core.reference))
    return envs


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    """Detached copies of every parameter, to check which ones training changed."""
    return [p.detach().clone() for p in module.parameters()]
