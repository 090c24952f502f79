"""Roll a policy out through the vector env with the KV cache: the fast path every native agent uses.

The prompt is prefilled once; each step then feeds one token per row through the cached policy and sends the
B sampled ids (with their log-probs) to the env. Rows end at their own EOS; the env holds them pending and
scores the whole batch at the end, in one reference and one reward-model forward. Nothing re-runs the prefix,
and the only host round trip per token is one small copy of the ids and log-probs.

It reads the env only through its public surface: the prompts of `reset`'s info, the row flags and
observations `step` returns, and the `Scores` of `score_pending()`; its speed fixes are `SpeedOptions`.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from rlhf_base.deprecation import REMOVED_IN
from rlhf_base.lm import position_ids_from_mask
from rlhf_base.lora import base_model
from text_env.kv_cache import preallocated_cache
from text_env.sampling import SamplingOptions
from text_env.speed import SpeedOptions
from text_env.vector_env import TextGenVectorEnv

__all__ = ["Rollout", "rollout", "sample_categorical", "sample_multinomial"]


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
    logprobs: torch.Tensor  # (B, N) log q of the sampled tokens: q, the distribution they were drawn from
    ref_logprobs: torch.Tensor  # (B, N) teacher-forced log-probs under pi_ref, by the env's sampling options
    entropy: torch.Tensor  # (B, N) entropy of q at each step
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
    """transformers >= 5.24 calls the KV cache argument `cache`; older releases call it `past_key_values`.

    Read off the transformers model itself: a LoRA policy's peft wrapper passes keywords through unnamed.
    """
    model = base_model(model)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# The speed switches that were module globals (patched by the ablation) live in `SpeedOptions` now.
_MOVED_SWITCHES = {
    "COMPACT_BELOW": "compact_below",
    "COMPACT_MIN_ROWS": "compact_min_rows",
    "SHARE_PREFILL_BELOW": "share_prefill_below",
    "PREALLOCATE": "preallocate_cache",
}


def __getattr__(name: str) -> Any:
    """The old globals still read (their default), with a warning: setting them no longer does anything."""
    if name not in _MOVED_SWITCHES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    field = _MOVED_SWITCHES[name]
    warnings.warn(
        f"text_env.sampler.{name} is no longer read: pass SpeedOptions({field}=...) to the env (speed=...) "
        f"or to rollout(..., speed=...); the name will be removed in rlhf-gym {REMOVED_IN}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(SpeedOptions(), field)


def _cache_of(out: Any, cache_kw: str) -> Any:
    return out[cache_kw] if cache_kw in out else out.past_key_values


def _prefill(
    policy: PreTrainedModel,
    obs: dict,
    prompt_index: np.ndarray,
    p: int,
    n: int,
    cache_kw: str,
    device: torch.device,
    speed: SpeedOptions,
) -> tuple[Any, Any]:
    """Run the prompts through the policy into a KV cache preallocated for the P + N positions of a rollout
    (`text_env.kv_cache`). When prompts repeat (RLOO's k copies), each distinct prompt runs once and its
    cache is copied to its rows; when they are (nearly) all distinct, every row runs.

    Returns:
        `(out, cache)`: the policy output with one row per env row (logits of the last prompt position), and
        its KV cache when it can drop and repeat rows (`batch_select_indices`), else None (legacy tuples:
        the sampler then keeps every row to the end).
    """
    _, first, inverse = np.unique(prompt_index, return_index=True, return_inverse=True)
    shared = len(first) <= speed.share_prefill_below * len(prompt_index)
    if not shared:  # (nearly) all prompts distinct: copying the cache to the repeats would cost more
        first = np.arange(len(prompt_index))
    ids = torch.as_tensor(obs["input_ids"][first, :p], device=device)
    mask = torch.as_tensor(obs["attention_mask"][first, :p], device=device)
    kwargs = dict(position_ids=position_ids_from_mask(mask), use_cache=True, logits_to_keep=1)
    cache = preallocated_cache(policy, p + n) if speed.preallocate_cache else None
    out = policy(
        input_ids=ids, attention_mask=mask, **kwargs, **({cache_kw: cache} if cache is not None else {})
    )
    cache = _cache_of(out, cache_kw)
    can_select = hasattr(cache, "batch_select_indices")
    if not shared:
        return out, cache if can_select else None
    if not can_select:  # no row surgery: prefill every row
        full_mask = torch.as_tensor(obs["attention_mask"][:, :p], device=device)
        ids = torch.as_tensor(obs["input_ids"][:, :p], device=device)
        kwargs["position_ids"] = position_ids_from_mask(full_mask)
        return policy(input_ids=ids, attention_mask=full_mask, **kwargs), None
    rows_of = torch.as_tensor(inverse.reshape(-1), device=device)  # (B,) each row's index into `first`
    cache.batch_select_indices(rows_of)
    out.logits = out.logits[rows_of]
    return out, cache


def _scatter_steps(
    steps: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]], num_rows: int, n: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-step values of the live rows, placed at (env row, step) in (B, N) tables; 0 elsewhere."""
    rows = torch.as_tensor(np.concatenate([r for r, _, _ in steps]), device=device)
    cols = torch.cat([torch.full((len(r),), t, device=device) for t, (r, _, _) in enumerate(steps)])
    logprobs = torch.zeros(num_rows, n, device=device)
    entropy = torch.zeros(num_rows, n, device=device)
    logprobs[rows, cols] = torch.cat([lp for _, lp, _ in steps])
    entropy[rows, cols] = torch.cat([e for _, _, e in steps])
    return logprobs, entropy


#: Vocabularies up to this size draw from a float32 CDF (the fast path; its rounding misplaces at most
#: ~V * 2**-24 < 1e-4 of the mass); larger ones accumulate the CDF and draw the uniform in float64, exact to
#: ~1e-16: at V = 49k a float32 CDF never draws ~8,600 low-probability tokens (issue 12).
FLOAT32_CDF_MAX_VOCAB = 1024


def sample_categorical(
    probs: torch.Tensor, generator: torch.Generator | None = None, num_samples: int | None = None
) -> torch.Tensor:
    """Tokens from `probs` (b, V) by inverting the CDF: one uniform number per draw.

    `torch.multinomial` draws V random numbers per row (~340 us for 64 x 221 on one CPU core, a third of a
    decode step); a `searchsorted` of one uniform into the row's cumulative sum is ~10x faster.
    `right=True` returns the first index whose CDF exceeds u, so a token of probability 0 is never drawn.
    The CDF and the uniform are float64 past `FLOAT32_CDF_MAX_VOCAB` tokens: a float32 sum near 1 moves in
    steps of 6e-8, so every token less likely than that is rounded into its neighbours.

    Returns:
        (b,) one token per row; with `num_samples`: (b, num_samples) independent draws per row.
    """
    dtype = torch.float32 if probs.shape[-1] <= FLOAT32_CDF_MAX_VOCAB else torch.float64
    return _inverse_cdf(probs, generator, num_samples, dtype)


def _inverse_cdf(
    probs: torch.Tensor, generator: torch.Generator | None, num_samples: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """`sample_categorical` with the CDF and the uniforms in `dtype`."""
    cdf = probs.to(dtype).cumsum(-1)  # (b, V)
    shape = (probs.shape[0], 1 if num_samples is None else num_samples)
    u = torch.rand(shape, device=probs.device, generator=generator, dtype=dtype) * cdf[:, -1:]  # (b, k)
    tokens = torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[-1] - 1)  # (b, k)
    return tokens.squeeze(1) if num_samples is None else tokens


def sample_multinomial(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from `probs` (b, V) with `torch.multinomial` (`SpeedOptions(sampler="multinomial")`)."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


_SAMPLERS = {"inverse_cdf": sample_categorical, "multinomial": sample_multinomial}


def rollout(
    envs: TextGenVectorEnv,
    policy: PreTrainedModel | None = None,
    *,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_new_tokens: int | None = None,
    prompt_indices: np.ndarray | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    speed: SpeedOptions | None = None,
) -> Rollout:
    """Generate one batch of B complete episodes through `envs`, KV-cached.

    Args:
        envs: the vector env; its policy is used (and kept) unless `policy` is given, which is handed to it.
        temperature, top_k, top_p, min_new_tokens: the sampling distribution q (`text_env.sampling`); each
            left unset is the env's (`envs.sampling`: its temperature and min_new_tokens, no filter), which
            defines the task's policy. A value set here is this rollout's own tweak: the logged `logprobs`
            and `entropy` are always q's, so the env's KL is that of q against the env's reference (sampling
            pi_ref at temperature 0.7 reports the real KL(q || pi_ref), not 0). `min_new_tokens` may only
            raise the env's: an EOS the task forbids is not a valid action.
        prompt_indices: (B,) prompts to answer, e.g. `np.repeat(ids, k)` for k samples per prompt.
        seed: seeds the env's prompt draw (reset) when given.
        generator: the torch RNG for sampling, for reproducible rollouts.
        speed: the sampler's speed fixes (`SpeedOptions`: compact_below, compact_min_rows,
            share_prefill_below, preallocate_cache, sampler); default: the env's `envs.speed`. The env's
            scoring always follows the env's own.
    """
    speed = envs.speed if speed is None else speed
    options = envs.sampling.replace(
        temperature=temperature, top_k=top_k, top_p=top_p, min_new_tokens=min_new_tokens
    )
    if options.min_new_tokens < envs.min_new_tokens:
        raise ValueError(
            f"min_new_tokens={options.min_new_tokens} is below the env's {envs.min_new_tokens}: the env's "
            "task forbids EOS before that many tokens (set EnvConfig.min_new_tokens to change it)"
        )
    # Inference mode skips autograd's view and version tracking on every small op of the decode loop (an
    # iteration of 16 x 4 rollouts measured ~6-14% faster than under no_grad). Its tensors cannot enter a
    # graph later, so the batch leaves as ordinary copies: agents train on it.
    with torch.inference_mode():
        batch = _rollout(envs, policy, options, prompt_indices, seed, generator, speed)
    return dataclasses.replace(
        batch, **{f.name: getattr(batch, f.name).clone() for f in dataclasses.fields(batch)
                  if isinstance(getattr(batch, f.name), torch.Tensor)}
    )  # fmt: skip


def _rollout(
    envs: TextGenVectorEnv,
    policy: PreTrainedModel | None,
    options: SamplingOptions,
    prompt_indices: np.ndarray | None,
    seed: int | None,
    generator: torch.Generator | None,
    speed: SpeedOptions,
) -> Rollout:
    if policy is not None:
        envs.set_policy(policy)
    policy = envs.policy
    device = next(policy.parameters()).device
    reset_options = None if prompt_indices is None else {"prompt_indices": prompt_indices}
    obs, reset_info = envs.reset(seed=seed, options=reset_options)
    p, n, num_rows = envs.response_start, envs.max_new_tokens, envs.num_envs
    pad_id = envs.tokenizer.pad_token_id
    cache_kw = _cache_keyword(policy)
    out, cache = _prefill(policy, obs, reset_info["prompt_index"], p, n, cache_kw, device, speed)
    sample = _SAMPLERS[speed.sampler]
    logits = out.logits[:, -1].float()  # (b, V): b live rows, all B at first
    mask = torch.as_tensor(obs["attention_mask"][:, :p], device=device)  # (b, P), grows a column per step
    position = mask.sum(-1, keepdim=True) - 1  # (b, 1) each row's last real token (a prompt has one)
    rows = np.arange(num_rows)  # the env row of each live row
    steps: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = []  # per step: rows, log q, entropy
    # Reused every step; the env ignores the entries of rows that have ended (pad, 0).
    actions, action_logprobs = np.full(num_rows, pad_id, dtype=np.int64), np.zeros(num_rows, np.float32)
    done = np.zeros(num_rows, dtype=bool)  # (B,) rows ended so far (`envs.done`): all start together
    for t in range(n):
        ended = done[rows]  # (b,) host-side: ended, not yet dropped from the batch
        q_logprobs = options.logprobs(logits, step=t)  # (b, V) log q: the distribution sampled from
        probs = q_logprobs.exp()
        tokens = sample(probs, generator)  # (b,)
        step_logprobs = q_logprobs.gather(-1, tokens[:, None]).squeeze(1)  # (b,)
        # (b,) -sum q log q; -inf log-probs clamped so q = 0 gives 0 * finite (as `entropy_from_logits`),
        # ~6x faster than torch.special.entr's where-based kernel
        step_entropy = -(probs * q_logprobs.clamp(min=torch.finfo(logits.dtype).min)).sum(-1)
        # Rows that had ended get junk here: the env ignores their actions, their new attention column is
        # 0, and after the loop the final response mask zeroes their log-probs and entropy.
        steps.append((rows, step_logprobs, step_entropy))
        # With the log-probs the env needs no policy forward to score finished rows. On a GPU one copy per
        # token carries the ids and log-probs (float64 holds any id exactly); on the CPU views suffice.
        if device.type == "cpu":
            actions[rows], action_logprobs[rows] = tokens.numpy(), step_logprobs.numpy()
        else:
            host = torch.stack([tokens.double(), step_logprobs.double()]).cpu().numpy()
            actions[rows], action_logprobs[rows] = host[0], host[1]
        obs, _, terminated, _, _ = envs.step(actions, logprobs=action_logprobs, defer_scoring=True)
        done |= terminated  # `terminated` marks only the step a row ends on
        if done.all():
            break
        # (b, 1) the new token is real unless its row had ended
        real = (
            torch.as_tensor(~ended, device=device)[:, None].long()
            if ended.any()
            else torch.ones_like(mask[:, :1])
        )
        mask = torch.cat([mask, real], dim=1)  # (b, L + 1)
        position = position + real  # (b, 1) the new token's position; an ended row's stays where it was
        live = ~done[rows]  # (b,) host-side: no sync
        ended_rows = len(rows) - int(live.sum())
        if cache is not None and ended_rows >= max(
            speed.compact_min_rows, (1 - speed.compact_below) * len(rows)
        ):
            # Drop ended rows from the batch: the rest of the rollout stops paying for them.
            keep = torch.as_tensor(np.flatnonzero(live), device=device)
            cache.batch_select_indices(keep)
            rows, mask, tokens, position = rows[live], mask[keep], tokens[keep], position[keep]
        out = policy(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=position,
            use_cache=True,
            **{cache_kw: cache if cache is not None else _cache_of(out, cache_kw)},
        )
        cache = _cache_of(out, cache_kw) if cache is not None else None
        logits = out.logits[:, -1].float()
    # The last observation holds every row's whole episode (it is a copy: the next reset cannot touch it).
    ids = torch.as_tensor(obs["input_ids"], device=device)
    full_mask = torch.as_tensor(obs["attention_mask"], device=device)
    response_mask = full_mask[:, p:].float()  # (B, N)
    logprobs, entropy = _scatter_steps(steps, num_rows, n, device)
    logprobs, entropy = logprobs * response_mask, entropy * response_mask  # 0 after each row's end
    # Every row scored at once: one reference and one reward-model forward per batch, not per finishing step.
    scores = (
        envs.score_pending()
    )  # every row has ended (EOS or max_new_tokens), so rows are 0 .. B-1 in order
    if not np.array_equal(scores.rows, np.arange(num_rows)):
        raise RuntimeError(f"rollout expected all {num_rows} rows pending, got rows {scores.rows.tolist()}")
    return Rollout(
        prompts=[str(x) for x in reset_info["prompt"]],
        responses=list(scores.response),
        prompt_indices=reset_info["prompt_index"],
        input_ids=ids,
        attention_mask=full_mask,
        response_start=p,
        response_mask=response_mask,
        logprobs=logprobs,
        ref_logprobs=torch.as_tensor(scores.ref_logprobs, device=device),
        entropy=entropy,
        rewards=torch.as_tensor(scores.reward, device=device),
        rm_scores=torch.as_tensor(scores.rm_score, device=device),
        kl=torch.as_tensor(scores.kl, device=device),
        gold_scores=torch.as_tensor(scores.gold_score, device=device),
    )
