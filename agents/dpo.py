"""DPO and IPO: the KL-regularised RLHF objective solved offline, on the reward model's preference pairs.

RLHF climbs `J = E[r] - beta * KL(pi || pi_ref)`, whose optimum is `pi* = pi_ref * exp(r / beta) / Z`.
Turned around, `r(x, y) = beta * log(pi*(y|x) / pi_ref(y|x)) + beta * log Z(x)`, and under the
Bradley-Terry model the preference data were labelled by, `log Z` cancels in `r(chosen) - r(rejected)`.
DPO (Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290) therefore fits the policy
itself by the reward model's own loss, with the reward replaced by that implied one:

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]     (log-ratio difference)
    sigmoid:  loss = -log sigmoid(beta * h)                          (Rafailov et al., eq. 7)
    ipo:      loss = (h - 1 / (2 * tau))^2                           (Azar et al. 2023, arXiv:2310.12036)

IPO regresses h onto a fixed margin instead of pushing it to infinity on pairs that are always preferred
(deterministic preferences make DPO's optimum ignore beta). `label_smoothing` eps gives the "conservative
DPO" of Mitchell (2023, "A note on DPO with noisy preferences"): the labels are taken to be flipped with
probability eps, `loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)` (TRL's `sigmoid` with
`label_smoothing`); the default pipeline's labeller is noisy (`LabelConfig.tau`), so it is a real option.

**beta is the env's.** DPO optimises exactly the objective the env pays, `E[rm_score] - beta * KL`, with
the preference labels standing in for the reward model. The env owns that one coefficient (`envs.beta`,
`EnvConfig.beta`, a sweep's `betas`), so DPO's beta, and IPO's tau, are `envs.beta`, read at every step;
the agent's config has no `beta` (naming one is an error that says where it lives). A sweep over `betas`
thus compares DPO with PPO or REINFORCE at the same point of the same trade-off.

**Tokens as the env sees them.** Each response is tokenised as the env would hold it: the prompt's ids as
the env tokenises prompts, then the response's ids and EOS (SFT's `encode_demonstrations`: the labeller
decodes the env's tokens to text, and this gives them back), cut at the env's `max_new_tokens` as the env
cuts an episode (a response that filled the limit has no EOS there either). Log-probabilities are those of
the env's sampling distribution q (`envs.sampling`: its temperature, EOS banned before `min_new_tokens`),
for the policy and pi_ref alike, as the env scores both sides of its KL, so `h`'s log-ratios are the ones the
env's `kl` sums.

**An iteration** is `steps_per_iteration` Adam steps, each on `batch_size` pairs drawn without replacement
from a reshuffled pass over the file (passes continue across iterations), then one fresh rollout of the env
(`text_env.rollout`) with the updated policy: its `rm_score`, `gold_score` and `kl` are the env's, measured
as every other agent's are. pi_ref's log-probs of a pair are computed once (no grad, `envs.reference`) and
kept. The policy starts as the env's policy, a trainable copy of pi_ref in a fresh env, and runs without
dropout, so that at the start pi == pi_ref and the loss is exactly `log 2` (DPO) or `(1 / (2 tau))^2` (IPO).

    envs = EnvConfig(model="runs/default/sft", reward_model="runs/default/reward_model").make()
    agent = DPOAgent(envs, DPOConfig(pairs="runs/default/pairs.jsonl"))
    history = agent.learn()          # one metrics dict per iteration
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import text_env
from agents.base import (
    Callback,
    PolicyAgentMixin,
    check_finite,
    load_policy,
    prepare_policy,
)
from agents.loop import Iteration, run_iterations
from agents.sft import encode_demonstrations
from reward_models.data import load_pairs
from rlhf_base.io import DataError
from rlhf_base.lm import context_length, response_logprobs
from rlhf_base.lora import LoraConfig
from rlhf_base.maths import masked_sum
from rlhf_base.optim import adam
from rlhf_base.ranges import SEED, Range, check_ranges

__all__ = [
    "LOSSES",
    "DPOAgent",
    "DPOConfig",
    "PairData",
    "check_loss_settings",
    "dpo_loss",
    "encode_pairs",
    "pair_metrics",
    "read_pairs",
    "sequence_logprobs",
]

LOSSES: tuple[str, ...] = ("sigmoid", "ipo")
Loss = Literal["sigmoid", "ipo"]


@dataclass
class DPOConfig:
    """Offline DPO / IPO; beta (IPO's tau) is the env's (`envs.beta`), see the module docstring."""

    RENAMED: ClassVar[dict[str, str]] = {"lr": "learning_rate"}
    RANGES: ClassVar[dict[str, Range]] = {
        "iterations": Range(ge=1),
        "label_smoothing": Range(ge=0, lt=0.5),
        "batch_size": Range(ge=1),
        "steps_per_iteration": Range(ge=1),
        "learning_rate": Range(gt=0),
        "max_grad_norm": Range(gt=0),
        "seed": SEED,
    }

    iterations: int = 20  # learn()'s budget: each is steps_per_iteration updates, then one measuring rollout
    # The preference pairs (JSONL/JSON/CSV/Parquet, string fields prompt, chosen, rejected), e.g. the
    # pipeline's runs/<name>/pairs.jsonl, which `rlhf-gym pipeline` sets here itself when left None
    pairs: str | None = None
    loss: Loss = "sigmoid"  # sigmoid (DPO) | ipo (IPO, with tau = envs.beta)
    label_smoothing: float = 0.0  # cDPO: assumed label-flip probability in [0, 0.5); sigmoid loss only
    batch_size: int = 64  # pairs per gradient step
    steps_per_iteration: int = 10  # gradient steps per iteration
    learning_rate: float = 1e-4  # AdamW learning rate (constant)
    max_grad_norm: float = 1.0  # global gradient-norm clip
    seed: int = 0  # the pair order, the measuring rollouts' prompts and sampling
    # None: full fine-tuning; {r, alpha, target_modules}: a LoRA adapter trains and pi_ref is the policy
    # with the adapter off (`agents.base.prepare_policy`, `rlhf_base.lora.LoraConfig`)
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        check_ranges(self)
        check_loss_settings(self.loss, self.label_smoothing)


def check_loss_settings(loss: str, label_smoothing: float) -> None:
    """The loss and its label smoothing, or an error naming the key (shared with `agents.online_dpo`)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the sigmoid (DPO) loss only; IPO's target is a margin")


# --------------------------------------------------------------------------------------------------------
# Pieces: the loss, the data, the log-probs
# --------------------------------------------------------------------------------------------------------
def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DPO or IPO loss of a batch of pairs, from the responses' summed log-probs.

    Args:
        chosen_logps, rejected_logps: (B,) log pi(y|x) of the chosen and rejected responses, with grad.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under pi_ref (no grad).
        beta: DPO's beta, IPO's tau: the env's KL coefficient, > 0.
        loss: "sigmoid" (DPO) or "ipo".
        label_smoothing: cDPO's label-flip probability (sigmoid only).

    Returns:
        `(loss, h)`: the mean loss, and the (B,) log-ratio differences h (with grad), whose `beta * h` is the
        margin of the implied rewards `beta * log(pi / pi_ref)`.
    """
    if not beta > 0:
        raise ValueError(
            f"DPO's beta is the env's KL coefficient (envs.beta, env.beta), and it needs beta > 0, got {beta}: "
            "at 0 the DPO loss is a constant and IPO's target 1 / (2 tau) is infinite"
        )
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)  # (B,)
    if loss == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    return losses.mean(), h


def pair_metrics(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float
) -> dict[str, float]:
    """What DPO trainers log about a batch of pairs (TRL's `rewards/*`), from (B,) log pi - log pi_ref.

    `implied_accuracy`: the share of pairs whose implied reward `beta * log(pi / pi_ref)` ranks the chosen
    response first; `implied_margin`: the mean implied-reward margin `beta * h`; `chosen_logratio`,
    `rejected_logratio`: the mean log-ratio of each side (DPO often lowers both, the rejected faster).
    """
    h = chosen_logratios - rejected_logratios
    return {
        "implied_accuracy": (h > 0).float().mean().item(),
        "implied_margin": beta * h.mean().item(),
        "chosen_logratio": chosen_logratios.mean().item(),
        "rejected_logratio": rejected_logratios.mean().item(),
    }


@dataclass
class PairData:
    """Tokenised pairs, padded once: prompts left-padded (as the env's), responses right-padded after them."""

    prompt_ids: torch.Tensor  # (M, P)
    prompt_mask: torch.Tensor  # (M, P)
    response_ids: torch.Tensor  # (2, M, N): [0] chosen, [1] rejected, each response tokens + EOS
    response_mask: torch.Tensor  # (2, M, N)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def batch(self, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """`(input_ids, attention_mask, response_start)` of `rows`' chosen then rejected sequences: (2b, P + N).

        `by_response_length` (in `sequence_logprobs`) drops the columns that are padding for a whole group.
        """
        prompt = self.prompt_ids[rows].repeat(2, 1), self.prompt_mask[rows].repeat(2, 1)  # (2b, P)
        response = self.response_ids[:, rows].flatten(0, 1), self.response_mask[:, rows].flatten(0, 1)
        ids = torch.cat([prompt[0], response[0]], dim=1).to(device)
        mask = torch.cat([prompt[1], response[1]], dim=1).to(device)
        return ids, mask, self.prompt_ids.shape[1]


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[dict[str, Any]],
    max_new_tokens: int,
    min_new_tokens: int = 0,
    context: int | None = None,
) -> PairData:
    """Tokenise pairs as the env would see them (see the module docstring) and pad them once.

    Raises:
        DataError: a prompt tokenises to nothing; a response ends (EOS) before `min_new_tokens` tokens, which
            the env forbids (its probability is 0, so its log-prob is -inf); a sequence exceeds the model's
            `context`.
    """
    encoded = [
        encode_demonstrations(tokenizer, [(p["prompt"], p[side]) for p in pairs])
        for side in ("chosen", "rejected")
    ]  # per side: (prompt ids, response ids + EOS) of each pair
    eos, pad, too_long = tokenizer.eos_token_id, tokenizer.pad_token_id, 0
    for side, examples in zip(("chosen", "rejected"), encoded, strict=True):
        for i, (prompt, completion) in enumerate(examples):
            too_long += len(completion) > max_new_tokens + 1  # response tokens alone beyond the limit
            completion = completion[:max_new_tokens]  # the env ends an episode at max_new_tokens tokens
            if eos in completion[:min_new_tokens]:
                raise DataError(
                    f"preference pair {i}: the {side} response {pairs[i][side][:60]!r} ends after "
                    f"{completion.index(eos)} tokens, but the env's min_new_tokens={min_new_tokens} forbids EOS "
                    "before that (the env gives it probability 0); drop such pairs or lower min_new_tokens"
                )
            if context is not None and len(prompt) + len(completion) > context:
                raise DataError(
                    f"preference pair {i}: prompt and {side} response take {len(prompt) + len(completion)} "
                    f"tokens, more than the model's context of {context}"
                )
            examples[i] = (prompt, completion)
    if too_long:
        warnings.warn(
            f"{too_long} of {2 * len(pairs)} responses are longer than the env's max_new_tokens="
            f"{max_new_tokens} and were cut there, as the env would end them",
            stacklevel=2,
        )
    m, p = len(pairs), max(len(prompt) for prompt, _ in encoded[0])
    n = max(len(c) for examples in encoded for _, c in examples)
    prompt_ids, prompt_mask = torch.full((m, p), pad), torch.zeros((m, p), dtype=torch.long)
    response_ids, response_mask = torch.full((2, m, n), pad), torch.zeros((2, m, n), dtype=torch.long)
    for i, (prompt, _) in enumerate(encoded[0]):  # once per data set
        prompt_ids[i, p - len(prompt) :], prompt_mask[i, p - len(prompt) :] = torch.tensor(prompt), 1
        for side in (0, 1):
            completion = encoded[side][i][1]
            response_ids[side, i, : len(completion)] = torch.tensor(completion)
            response_mask[side, i, : len(completion)] = 1
    return PairData(prompt_ids, prompt_mask, response_ids, response_mask)


def sequence_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    envs: text_env.TextGenVectorEnv,
) -> torch.Tensor:
    """(B,) log q(response | prompt) summed over the response tokens, through the env's sampling options.

    One teacher-forced forward in length groups; gradients flow when `model` has them enabled.
    """
    logprobs = response_logprobs(
        model,
        input_ids,
        attention_mask,
        response_start,
        group_by_length=True,
        overhead_tokens=envs.speed.overhead_tokens,
        logits_fn=envs.sampling.logits,
    )  # (B, N)
    return masked_sum(logprobs, attention_mask[:, response_start:], dim=-1)


def read_pairs(pairs: str | None, agent: str = "dpo") -> list[dict[str, Any]]:
    """The pairs of `<agent>.pairs`, or an error that says what to set."""
    if pairs is None:
        raise ValueError(
            f"{agent} trains on preference pairs and none were given: set {agent}.pairs (in a sweep; "
            f"`pairs=...` with `rlhf-gym train --agent {agent}`) to a JSONL/JSON/CSV/Parquet file with fields "
            "prompt, chosen, rejected, e.g. runs/default/pairs.jsonl, which `rlhf-gym pipeline` (or `label`) "
            "writes; the pipeline's agents stage sets it to its own pairs itself"
        )
    try:
        return load_pairs(pairs)
    except DataError as e:
        raise DataError(f"{agent}.pairs={str(pairs)!r}: {e}") from e


# --------------------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------------------
class DPOAgent(PolicyAgentMixin):
    """DPO / IPO on `envs.policy` against `envs.reference`, from a preference-pairs file; measured by the env.

    Metrics per iteration: the shared `METRIC_KEYS` of a fresh rollout after the iteration's updates, plus,
    averaged over its steps, `loss`, `grad_norm` and `pair_metrics`' `implied_accuracy`, `implied_margin`,
    `chosen_logratio`, `rejected_logratio` (on the pairs trained on, before each step), and `epochs`
    (passes over the pairs so far).
    """

    name = "dpo"
    Config = DPOConfig

    def __init__(self, envs: text_env.TextGenVectorEnv, config: DPOConfig | None = None) -> None:
        self.envs = envs
        self.config = config if config is not None else DPOConfig()
        self.history: list[dict[str, float]] = []
        policy = envs.policy
        if not any(p.requires_grad for p in policy.parameters()):
            raise ValueError("envs.policy has no trainable parameters; hand the env a trainable policy")
        pairs = read_pairs(self.config.pairs, self.name)
        self.data = encode_pairs(
            envs.tokenizer, pairs, envs.max_new_tokens, envs.min_new_tokens, context_length(envs.reference)
        )
        prepare_policy(envs, self.config.lora, self.config.seed, self.name)
        self.device = next(policy.parameters()).device
        self.rng = np.random.default_rng(self.config.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        self.optimizer = self._make_optimizer()
        self._order, self._cursor, self.pairs_seen = self.rng.permutation(len(self.data)), 0, 0
        # pi_ref's summed log-probs of each pair's (chosen, rejected), computed the first time it is drawn
        self._ref_logps = torch.zeros((len(self.data), 2), device=self.device)
        self._ref_known = torch.zeros(len(self.data), dtype=torch.bool)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.envs.policy.parameters() if p.requires_grad]
        return adam(params, lr=self.config.learning_rate)

    def _next_rows(self) -> torch.Tensor:
        """The next `batch_size` pairs of the shuffled passes over the data (a new shuffle per pass)."""
        rows: list[int] = []
        while len(rows) < self.config.batch_size:
            if self._cursor == len(self._order):
                self._order, self._cursor = self.rng.permutation(len(self.data)), 0
            take = self._order[self._cursor : self._cursor + self.config.batch_size - len(rows)]
            rows += take.tolist()
            self._cursor += len(take)
        return torch.tensor(rows)

    def _logratios(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(b,) chosen and rejected log pi (with grad), and (b, 2) log pi_ref of `rows` (cached)."""
        ids, mask, start = self.data.batch(rows, self.device)  # (2b, P + N)
        todo = rows[~self._ref_known[rows]].unique()
        if len(todo):
            with torch.no_grad():
                t_ids, t_mask, _ = self.data.batch(todo, self.device)
                ref = sequence_logprobs(self.envs.reference, t_ids, t_mask, start, self.envs)  # (2t,)
            self._ref_logps[todo.to(self.device)] = ref.view(2, -1).T
            self._ref_known[todo] = True
        logps = sequence_logprobs(self.envs.policy, ids, mask, start, self.envs)  # (2b,)
        chosen, rejected = logps.view(2, -1)
        return chosen, rejected, self._ref_logps[rows.to(self.device)]

    @torch.no_grad()
    def evaluate_pairs(self, rows: np.ndarray | None = None) -> dict[str, float]:
        """The loss and `pair_metrics` over `rows` of the pairs (default all), without learning."""
        rows_t = torch.arange(len(self.data)) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        was_training = self.envs.policy.training
        self.envs.policy.eval()
        parts = [self._logratios(r) for r in rows_t.split(self.config.batch_size)]
        self.envs.policy.train(was_training)
        chosen, rejected = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        ref = torch.cat([p[2] for p in parts])
        cfg, beta = self.config, self.envs.beta
        loss, _ = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta, cfg.loss, cfg.label_smoothing)
        return {"loss": loss.item(), **pair_metrics(chosen - ref[:, 0], rejected - ref[:, 1], beta)}

    def learn(
        self, iterations: int | None = None, callback: Callback | None = None
    ) -> list[dict[str, float]]:
        """Run `iterations` iterations (default `config.iterations`); return this call's metrics."""
        return run_iterations(self, self._iteration, iterations, callback)

    def _iteration(self, iteration: int) -> Iteration:
        """`steps_per_iteration` DPO/IPO steps on minibatches of pairs, then one fresh rollout to measure."""
        cfg, policy, steps = self.config, self.envs.policy, []
        policy.eval()  # no dropout: pi starts equal to pi_ref (loss log 2), as TRL's disable_dropout
        for _ in range(cfg.steps_per_iteration):
            beta = self.envs.beta  # the env's, read at each step (see the module docstring)
            chosen, rejected, ref = self._logratios(self._next_rows())
            loss, _ = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta, cfg.loss, cfg.label_smoothing)
            check_finite(loss, f"{cfg.loss} DPO loss", iteration)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            check_finite(grad_norm, "DPO gradient norm", iteration)
            self.optimizer.step()
            self.pairs_seen += len(chosen)
            stats = pair_metrics(chosen.detach() - ref[:, 0], rejected.detach() - ref[:, 1], beta)
            steps.append({"loss": loss.item(), "grad_norm": grad_norm.item(), **stats})
        prompts = self.rng.integers(len(self.envs.prompts), size=self.envs.num_envs)
        batch = text_env.rollout(self.envs, prompt_indices=prompts, generator=self.generator)
        metrics = {key: float(np.mean([s[key] for s in steps])) for key in steps[0]}
        metrics["epochs"] = self.pairs_seen / len(self.data)
        return Iteration(batch, batch.num_tokens, metrics)

    def load(self, path: str | Path) -> None:
        """Load policy weights saved by `save` into `envs.policy`; resets the optimiser."""
        load_policy(self.envs.policy, path)
        self.optimizer = self._make_optimizer()

    def _extra_state(self) -> dict[str, Any]:
        """Its place in the pairs (the shuffled order, the cursor, pairs seen) and pi_ref's cached log-probs."""
        return {
            "order": self._order,
            "cursor": self._cursor,
            "pairs_seen": self.pairs_seen,
            "ref_logps": self._ref_logps,
            "ref_known": self._ref_known,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._order, self._cursor, self.pairs_seen = state["order"], state["cursor"], state["pairs_seen"]
        self._ref_logps.copy_(state["ref_logps"])
        self._ref_known.copy_(state["ref_known"])
