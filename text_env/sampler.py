"""Roll a policy out through the vector env with the KV cache: the fast path every native agent uses.

The prompt is prefilled once; each step then feeds one token per row through the cached policy, sends the
B sampled ids to the env, and the env scores rows as they finish. Nothing re-runs the prefix, and the only
host round trip per token is the B action ids.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from rlhf_gym.maths import entropy_from_logits
from text_env.scoring import position_ids_from_mask
from text_env.vector_env import TextGenVectorEnv

__all__ = ["Rollout", "rollout"]


@dataclass
class Rollout:
    """B finished episodes. Tensors live on the policy's device; token axes are (B, N) response columns."""

    prompts: list[str]
    responses: list[str]
    prompt_indices: np.ndarray  # (B,)
    input_ids: torch.Tensor  # (B, P + N) prompt left-padded, response right-padded
    attention_mask: torch.Tensor  # (B, P + N)
    response_start: int  # P
    response_mask: torch.Tensor  # (B, N) float, 1 on response tokens (EOS included)
    logprobs: (
        torch.Tensor
    )  # (B, N) log pi of the sampled tokens (the policy itself: temperature 1, unfiltered)
    ref_logprobs: torch.Tensor  # (B, N) teacher-forced log-probs under pi_ref (from the env)
    entropy: torch.Tensor  # (B, N) entropy of the sampling distribution at each step
    rewards: torch.Tensor  # (B,) the env's terminal reward: rm_score - beta * kl
    rm_scores: torch.Tensor  # (B,)
    kl: torch.Tensor  # (B,) the env's KL estimate per response
    gold_scores: torch.Tensor  # (B,) NaN where the task has no gold reward

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.response_start :]  # (B, N)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)  # (B,)

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum().item())


def _cache_keyword(model: PreTrainedModel) -> str:
    """transformers >= 5.24 calls the KV cache argument `cache`; older releases call it `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def rollout(
    envs: TextGenVectorEnv,
    policy: PreTrainedModel | None = None,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_new_tokens: int = 0,
    prompt_indices: np.ndarray | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Generate one batch of B complete episodes through `envs`, KV-cached.

    Args:
        envs: the vector env; its policy is used (and kept) unless `policy` is given, which is handed to it.
        temperature, top_k, top_p: the sampling distribution. The logged `logprobs` are always the
            policy's own (temperature 1, unfiltered), which the KL needs; keep the defaults for on-policy RL.
        min_new_tokens: EOS is masked out before this many tokens (for fixed-length benchmarks).
        prompt_indices: (B,) prompts to answer, e.g. `np.repeat(ids, k)` for k samples per prompt.
        seed: seeds the env's prompt draw (reset) when given.
        generator: the torch RNG for sampling, for reproducible rollouts.
    """
    if policy is not None:
        envs.set_policy(policy)
    policy = envs.policy
    device = next(policy.parameters()).device
    options = None if prompt_indices is None else {"prompt_indices": prompt_indices}
    obs, reset_info = envs.reset(seed=seed, options=options)
    p, n, num_rows = envs.response_start, envs.core.max_new_tokens, envs.num_envs
    eos_id, pad_id = envs.tokenizer.eos_token_id, envs.tokenizer.pad_token_id
    mask = torch.as_tensor(obs["attention_mask"][:, :p], device=device)  # (B, P), grows a column per step
    cache_kw = _cache_keyword(policy)
    out = policy(
        input_ids=torch.as_tensor(obs["input_ids"][:, :p], device=device),
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        use_cache=True,
        logits_to_keep=1,
    )
    logprobs = torch.zeros(num_rows, n, device=device)
    entropy = torch.zeros(num_rows, n, device=device)
    done = torch.zeros(num_rows, dtype=torch.bool, device=device)
    results = {k: np.zeros(num_rows, dtype=np.float32) for k in ("rewards", "rm_score", "kl", "gold_score")}
    ref_logprobs = np.zeros((num_rows, n), dtype=np.float32)
    responses = [""] * num_rows
    for t in range(n):
        logits = out.logits[:, -1].float()  # (B, V)
        policy_logprobs = torch.log_softmax(logits, dim=-1)
        sampling_logits = logits
        if t < min_new_tokens:
            sampling_logits = sampling_logits.clone()
            sampling_logits[:, eos_id] = float("-inf")
        if temperature != 1.0 or top_k > 0 or top_p < 1.0:
            sampling_logits = _filter_logits(sampling_logits / temperature, top_k, top_p)
        probs = sampling_logits.softmax(-1) if sampling_logits is not logits else policy_logprobs.exp()
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
        tokens = tokens.masked_fill(done, pad_id)
        logprobs[:, t] = policy_logprobs.gather(-1, tokens[:, None]).squeeze(1).masked_fill(done, 0.0)
        entropy[:, t] = entropy_from_logits(logits).masked_fill(done, 0.0)
        # One device-to-host copy per token carries the B ids and their log-probs (float64 holds any id
        # exactly); with the log-probs the env needs no policy forward to score finished rows.
        host = torch.stack([tokens.double(), logprobs[:, t].double()]).cpu().numpy()
        _, rewards, _, _, info = envs.step(host[0].astype(np.int64), logprobs=host[1].astype(np.float32))
        if info:
            rows = np.flatnonzero(info["_rm_score"])
            results["rewards"][rows] = rewards[rows]
            for key in ("rm_score", "kl", "gold_score"):
                results[key][rows] = info[key][rows]
            ref_logprobs[rows] = info["ref_logprobs"][rows]
            for r in rows:
                responses[r] = info["response"][r]
        mask = torch.cat(
            [mask, (~done).long()[:, None]], dim=1
        )  # the new token is real unless the row was done
        done = done | (tokens == eos_id) | (t + 1 >= n)
        if envs.all_done:
            break
        out = policy(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=(mask.sum(-1, keepdim=True) - 1).clamp(min=0),
            use_cache=True,
            **{cache_kw: out[cache_kw] if cache_kw in out else out.past_key_values},
        )
    # Copies, not views: the env's buffers are overwritten by its next reset.
    ids = torch.tensor(envs.episodes.input_ids, device=device)
    full_mask = torch.tensor(envs.episodes.attention_mask, device=device)
    return Rollout(
        prompts=[str(x) for x in reset_info["prompt"]],
        responses=responses,
        prompt_indices=envs.episodes.prompt_index.copy(),
        input_ids=ids,
        attention_mask=full_mask,
        response_start=p,
        response_mask=full_mask[:, p:].float(),
        logprobs=logprobs,
        ref_logprobs=torch.as_tensor(ref_logprobs, device=device),
        entropy=entropy,
        rewards=torch.as_tensor(results["rewards"], device=device),
        rm_scores=torch.as_tensor(results["rm_score"], device=device),
        kl=torch.as_tensor(results["kl"], device=device),
        gold_scores=torch.as_tensor(results["gold_score"], device=device),
    )
