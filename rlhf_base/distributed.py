"""One agent's training over several processes (torchrun): the process group and the few collectives it needs.

`torchrun --nproc-per-node W -m rlhf_gym.cli train ...` starts W copies of the command with `WORLD_SIZE`,
`RANK`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` in their environment (issue 15). Each copy (a *rank*)
rolls out its own shard of the batch, `num_envs / W` responses, with its own RNG streams (`rank_seed`), and
all ranks take the same optimiser steps on the gradient of the *global* batch:

* **Gradients are averaged explicitly** (`average_gradients`, one flat all-reduce per step, after
  `backward` and before clipping), not by wrapping the policy in `DistributedDataParallel`. PPO runs several
  teacher-forced forwards per minibatch (length groups, `rlhf_base.lm.by_response_length`) through a policy
  the env also scores with, plus a value head outside it; DDP's reducer expects one forward of one wrapped
  module per backward, and the env would have to hold the wrapper. The explicit form leaves the
  single-process code unchanged (every function here is the identity on one process) and the maths plain:
  after it, every rank holds the same gradient, so clipping and the optimiser step agree on every rank,
  and the parameters stay equal (they start equal: `broadcast_parameters`). What it gives up is DDP's
  overlap of communication with the backward, which matters for large models, not for the ones here.
* **Batch statistics are global**: a statistic the one-process loss takes over the batch (advantage
  whitening, a batch-mean baseline, a token mean) is taken over all ranks' rows, from all-reduced sums and
  counts (`global_masked_mean`, `global_masked_var`, `global_masked_whiten`), so that the update equals
  one process's on the global batch, up to float rounding (`tests/test_distributed.py` checks it).
* **Token means as shares**: a loss averaged over a rank's tokens is multiplied by its `token_shares`,
  `W * n_rank / n_all`; averaging the gradients over ranks then gives the gradient of the mean over all
  tokens, however the tokens fall between ranks.

Every function is safe to call without a process group (or in a group of one): it then does nothing, or
returns its input, or computes exactly what the one-process code computes, so single-process training is
bit-identical with or without this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rlhf_base.maths import masked_mean, masked_sum, masked_var, masked_whiten
from rlhf_base.models import resolve_device

__all__ = [
    "average_gradients",
    "barrier",
    "broadcast_parameters",
    "gather_objects",
    "global_masked_mean",
    "global_masked_var",
    "global_masked_whiten",
    "is_distributed",
    "launched_world_size",
    "local_rank",
    "mean_over_ranks",
    "process_group",
    "rank",
    "rank_seed",
    "sum_over_ranks",
    "token_shares",
    "world_size",
]


# --------------------------------------------------------------------------------------------------------
# Where this process stands
# --------------------------------------------------------------------------------------------------------
def is_distributed() -> bool:
    """True inside a process group of two or more ranks (a group of one trains exactly as no group)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the group, 0 without one."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks, 1 without a group."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's rank on its machine (torchrun's `LOCAL_RANK`): the CUDA device it uses."""
    return int(os.environ.get("LOCAL_RANK", rank()))


def launched_world_size() -> int:
    """The ranks this process was launched among: the group's size if one is up, else torchrun's
    `WORLD_SIZE` (1 when not launched by torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_seed(seed: int) -> int:
    """The seed of this rank's RNG streams (prompt draws, sampling, minibatch order): `seed` itself on one
    process; in a group, one derived from `(seed, rank)` by numpy's `SeedSequence`, so that ranks sample
    different rollouts and no rank's stream is another seed's single-process stream."""
    if not is_distributed():
        return seed
    return int(np.random.SeedSequence([seed, rank()]).generate_state(1, np.uint64)[0] >> 1)  # < 2**63


# --------------------------------------------------------------------------------------------------------
# The group
# --------------------------------------------------------------------------------------------------------
@contextmanager
def process_group(device: str | None) -> Iterator[str | None]:
    """Join the group torchrun launched this process in, for the duration, and yield this rank's device.

    Not launched by torchrun (no `WORLD_SIZE`, or 1), or with a group already up (a caller's own): nothing
    is initialised or destroyed here, and `device` comes back as given. Otherwise the backend is NCCL when
    `device` resolves to CUDA, each rank on `cuda:LOCAL_RANK`, and gloo on the CPU.

    Args:
        device: the env's device setting ("cpu", "cuda", "auto", None).

    Raises:
        ValueError: a CUDA device with an index under torchrun (each rank takes its own), or CUDA without
            enough devices for the local ranks.
    """
    size = launched_world_size()
    if size <= 1 or dist.is_initialized():
        yield device
        return
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        if resolved.index is not None:
            raise ValueError(
                f"device {device!r}: under torchrun each rank trains on cuda:LOCAL_RANK; set env.device=cuda"
            )
        if local_rank() >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local_rank()} has no CUDA device ({torch.cuda.device_count()} visible): "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local_rank())
        backend, device = "nccl", f"cuda:{local_rank()}"
    else:
        backend, device = "gloo", "cpu"
    dist.init_process_group(backend=backend)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (e.g. while rank 0 writes the run's files); nothing on one process."""
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collectives run: the current CUDA device for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (`[value]` on one process): small states only."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


# --------------------------------------------------------------------------------------------------------
# Parameters and gradients
# --------------------------------------------------------------------------------------------------------
def _flat_groups(
    tensors: Iterable[torch.Tensor],
) -> dict[tuple[torch.dtype, torch.device], list[torch.Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups


def broadcast_parameters(params: Iterable[torch.nn.Parameter]) -> None:
    """Copy rank 0's values of `params` to every rank (one broadcast per dtype), so all ranks start equal."""
    if not is_distributed():
        return
    with torch.no_grad():
        for group in _flat_groups(params).values():
            flat = torch.cat([p.reshape(-1) for p in group]).to(_comm_device())
            dist.broadcast(flat, src=0)
            offset = 0
            for p in group:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over ranks: one flat all-reduce per dtype, in place.

    Call after `backward()` and before clipping and the optimiser step. Parameters without a gradient are
    left without one; every rank must have the same such parameters (the same model, the same losses), as
    each rank's flat buffer must line up with the others'.
    """
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    for group in _flat_groups(grads).values():
        flat = torch.cat([g.reshape(-1) for g in group]).to(_comm_device())
        dist.all_reduce(flat)
        flat /= world_size()
        offset = 0
        for g in group:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


# --------------------------------------------------------------------------------------------------------
# Statistics over the global batch
# --------------------------------------------------------------------------------------------------------
def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The elementwise sum over ranks of a float64 tensor (a new tensor on `values`' device)."""
    total = values.detach().to(_comm_device(), dtype=torch.float64, copy=True)
    dist.all_reduce(total)
    return total.to(values.device)


def sum_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """Each value summed over ranks (in float64, one all-reduce); a copy of `values` on one process."""
    if not is_distributed():
        return dict(values)
    total = _all_reduce_sum(torch.tensor(list(values.values()), dtype=torch.float64))
    return dict(zip(values, total.tolist(), strict=True))


def mean_over_ranks(values: Mapping[str, float], weight: float = 1.0) -> dict[str, float]:
    """The `weight`-weighted mean over ranks of each value (one all-reduce); a copy of `values` on one process.

    With `weight` the number of rows (or tokens) a rank's value is the mean of, this is the mean over the
    global batch. A NaN on any rank makes that value NaN, as one NaN in a one-process mean does.
    """
    if not is_distributed():
        return dict(values)
    local = torch.tensor([weight * v for v in values.values()] + [weight], dtype=torch.float64)
    *sums, total = _all_reduce_sum(local).tolist()
    return {k: v / total for k, v in zip(values, sums, strict=True)}


def token_shares(counts: Sequence[int | float | torch.Tensor]) -> list[float]:
    """`W * n_rank / n_all` for each of several token counts (minibatches), in one all-reduce.

    Multiplying a rank's token-mean loss by its share makes the mean over ranks of the gradients the
    gradient of the mean over all ranks' tokens (a rank with more tokens weighs more). All 1.0 on one
    process, where the multiplication is exact.
    """
    if not is_distributed():
        return [1.0] * len(counts)
    local = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    total = _all_reduce_sum(local)
    return (world_size() * local / total.clamp(min=1)).tolist()


def _global_sum_count(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 sum of `x` over the valid positions of every rank, and their count: one all-reduce."""
    sums = _all_reduce_sum(torch.stack([masked_sum(x.double(), valid), valid.sum().double()]))
    return sums[0], sums[1]


def global_masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`rlhf_base.maths.masked_mean(x, mask)` over every rank's rows (a scalar); that function on one process."""
    if not is_distributed():
        return masked_mean(x, mask)
    total, count = _global_sum_count(x, mask.bool().expand_as(x))
    return (total / count.clamp(min=1)).to(x.dtype)


def _global_mean_var(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance over the valid positions of every rank, in float64, two passes (two all-reduces)."""
    valid = mask.bool().expand_as(x)
    total, count = _global_sum_count(x, valid)
    n = int(count.item())
    if n == 0 or (unbiased and n == 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} valid positions, got {n}")
    mean = total / n
    squares = _all_reduce_sum(masked_sum((x.double() - mean) ** 2, valid)[None])[0]
    return mean, squares / (n - 1 if unbiased else n)


def global_masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """`rlhf_base.maths.masked_var` over every rank's rows; that function on one process.

    Raises:
        ValueError: fewer than 2 (unbiased) or 1 valid positions over all ranks.
    """
    if not is_distributed():
        return masked_var(x, mask, unbiased)
    return _global_mean_var(x, mask, unbiased)[1].to(x.dtype)


def global_masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """`rlhf_base.maths.masked_whiten` with the mean and variance of every rank's rows; that function on one
    process. Each rank gets its own rows back, whitened."""
    if not is_distributed():
        return masked_whiten(x, mask, shift_mean, eps)
    mean, var = (v.to(x.dtype) for v in _global_mean_var(x, mask, unbiased=True))
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=whitened.dtype, device=x.device))
