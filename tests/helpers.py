"""Helpers shared by the agent tests."""

from __future__ import annotations

import numpy as np
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


def replay_kl(envs: text_env.TextGenVectorEnv, batch: text_env.Rollout) -> np.ndarray:
    """Step `batch`'s tokens through `envs` one by one, without log-probs (as an agent stepping by hand
    would), so the env runs the policy itself; return the KL its info reports for each row."""
    envs.reset(options={"prompt_indices": batch.prompt_indices})
    kl = np.zeros(envs.num_envs, dtype=np.float32)
    for t in range(batch.response_ids.shape[1]):
        if envs.all_done:
            break
        _, _, _, _, info = envs.step(batch.response_ids[:, t].numpy())
        if info:
            kl[info["_kl"]] = info["kl"][info["_kl"]]
    return kl


def perturbed(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """A trainable copy of `model` with Gaussian noise on every weight: a policy that differs from pi_ref,
    so the KL is not trivially 0."""
    policy = trainable_copy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return policy
