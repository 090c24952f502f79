"""What every agent shares: the `Agent` protocol, the per-iteration metrics, and small policy helpers.

No base class holds control flow: each algorithm reads top to bottom in its own file (cleanrl-style) and
meets this protocol structurally. Shared here are only the things that must be identical across agents
for a comparison to be fair: the metric names (`METRIC_KEYS`, defined once in `rlhf_base.metrics`) and
how they are computed, how a policy acts on an observation, and how it is saved. The bookkeeping around
an agent's iterations (budget, numbering, clock, tokens, metrics stream, callback) is one function,
`agents.loop.run_iterations`, that each built-in agent's `learn` calls with its own iteration.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from transformers import PreTrainedModel

import text_env
from rlhf_base.distributed import is_distributed, mean_over_ranks, rank_seed, sum_over_ranks, world_size
from rlhf_base.io import atomic_dir, check_weights_folder
from rlhf_base.lm import position_ids_from_mask
from rlhf_base.lora import (
    AdapterOff,
    LoraConfig,
    adapter_state_dict,
    add_lora,
    has_adapter,
    is_lora,
    load_adapter,
    load_adapter_state_dict,
    save_adapter,
)
from rlhf_base.maths import KL_ESTIMATORS, KL_GRANULARITIES, KL_PLACEMENTS
from rlhf_base.metrics import METRIC_KEYS  # the one vocabulary, shared with the report (floor 1)
from rlhf_base.optim import adam
from text_env.judge import check_scores
from text_env.sampler import Rollout

__all__ = [
    "CHECKPOINT_METHODS",
    "ENV_SETTINGS",
    "METRIC_KEYS",
    "Agent",
    "NonFiniteLossError",
    "PolicyAgentMixin",
    "Callback",
    "act_with_policy",
    "agent_learns",
    "check_finite",
    "check_kl_settings",
    "check_rank_scores",
    "check_num_envs",
    "env_state",
    "evaluate_policy",
    "load_env_state",
    "load_policy",
    "load_policy_state",
    "policy_state",
    "prepare_policy",
    "rollout_metrics",
    "save_policy",
    "supports_checkpoints",
    "supports_distributed",
    "take_rows",
]

#: Settings the env owns, one owner each (issue 11): an agent config that names one is an error that says
#: where it lives (a config dataclass lists these as `MOVED_KEYS`, which `rlhf_base.config` reads).
ENV_SETTINGS = {
    "beta": "the env owns the KL coefficient: set env.beta (EnvConfig.beta), or envs.beta on a built env",
    "num_envs": "the env owns the batch size: set env.num_envs (EnvConfig.num_envs), or pass "
    "make_agent(name, env, config, num_envs=B) when batching a single env",
}

#: The methods `rlhf-gym train` needs for checkpoints and `--resume` (issue 13); see `Agent`'s docstring.
CHECKPOINT_METHODS = ("state_dict", "load_state_dict")

#: Called after every iteration with the agent and that iteration's metrics; return False to stop early.
Callback = Callable[[Any, dict[str, float]], bool | None]


@runtime_checkable
class Agent(Protocol):
    """The small interface every agent meets (native, SB3-backed, or a user's own).

    An agent class may also declare `learns = False` (read with `agent_learns`; agents that lack the
    attribute learn). It says the agent trains nothing and only selects among samples of a fixed policy,
    as best-of-n does: its iterations are repeated draws rather than a learning curve, and its KL is that
    of the selection (`log n - (n-1)/n` for best-of-n). A sweep writes the declaration into results.csv's
    `learns` column, and the report then labels the agent's points with its `n` and fits Gao et al.'s
    best-of-n form to them, whatever the agent is called. It is not a protocol member, so agents written
    before it still pass `isinstance(agent, Agent)`.
    `learn` semantics every built-in agent shares (through `agents.loop.run_iterations`, which a user's
    agent may call too): iterations are numbered from 1 and continue across calls; each iteration's
    metrics (at least `METRIC_KEYS`) are appended to `history` and then passed to `callback(agent,
    metrics)`, and a callback returning False stops after that iteration; a NaN/inf loss raises
    `NonFiniteLossError` before the update, with nothing of that iteration recorded.

    Several processes (issue 15): an agent class that declares `distributed = True` (read with
    `supports_distributed`) trains one policy over the ranks of a torchrun launch (`rlhf_base.distributed`):
    built in each rank on an env of that rank's share of the batch, it keeps the ranks' parameters equal
    (the same start, gradients averaged over ranks), takes batch statistics over all ranks' rows, and
    reports metrics of the global batch, the same on every rank. `rlhf-gym train` refuses the others under
    torchrun. PPO and REINFORCE declare it.

    Checkpoints (optional, not protocol members either; `supports_checkpoints`): `state_dict()` returns
    everything later iterations depend on, as nested dicts/lists of tensors, numpy arrays and JSON values
    (weights, optimiser state, the agent's own RNGs, counters such as a moving-average baseline, the env's
    state via `env_state`, and `history`), and `load_state_dict(state)` puts it back into an agent built
    with the same env and config, so that its next iterations are those the saved agent would have run.
    As with torch's, the tensors returned are the live ones: write them out (`rlhf_base.checkpoint`) before
    training on. The process's global RNGs are the trainer's to save (`rlhf_base.checkpoint.global_rng_state`).

    Config checks (optional too): the `Config` dataclass may declare each number's valid range
    (`RANGES`, `rlhf_base.ranges`), and the class a static `check_num_envs(config, num_envs)` for what
    depends on the env's batch size; `train` and `sweep` run both before any model loads.
    """

    name: str  # registry name, e.g. "ppo"
    envs: text_env.TextGenVectorEnv  # the env it acts on; `envs.policy` is the model it trains
    history: list[dict[str, float]]  # metrics of every iteration so far (the metrics stream)

    def learn(
        self, iterations: int | None = None, callback: Callback | None = None
    ) -> list[dict[str, float]]:
        """Train for `iterations` (default: the config's budget, an int >= 0); return this call's metrics
        per iteration."""
        ...

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Next-token ids (B,) for a batch of env observations."""
        ...

    def evaluate(self, num_episodes: int = 256, seed: int = 0) -> dict[str, float]:
        """Mean metrics over fresh episodes, without learning."""
        ...

    def save(self, path: str | Path) -> None: ...

    def load(self, path: str | Path) -> None: ...


def supports_checkpoints(agent: Any) -> bool:
    """True if `agent` (or its class) has `state_dict` and `load_state_dict` (`CHECKPOINT_METHODS`)."""
    return all(callable(getattr(agent, name, None)) for name in CHECKPOINT_METHODS)


def env_state(envs: Any) -> dict[str, Any]:
    """The env's part of an agent's checkpoint: its one `beta` (which PPO's adaptive controller writes) and
    the state of its prompt RNG (`np_random`, drawn from when a rollout is given no prompts)."""
    return {"beta": float(envs.beta), "np_random": envs.np_random.bit_generator.state}


def load_env_state(envs: Any, state: dict[str, Any]) -> None:
    """Put back what `env_state` returned."""
    envs.beta = state["beta"]
    envs.np_random.bit_generator.state = state["np_random"]


def prepare_policy(
    envs: Any, lora: LoraConfig | None, seed: int, agent: str, train_mode: bool = False
) -> list[torch.nn.Parameter]:
    """Ready `envs.policy` for an agent's training and return the parameters its optimiser takes.

    `lora` None (full fine-tuning): nothing changes; every policy parameter that requires grad. With a
    `LoraConfig` (issue 15): the policy is wrapped with a LoRA adapter (`rlhf_base.lora.add_lora`, A drawn
    from `seed`, B zero) whose parameters alone are returned; and pi_ref becomes that same model with its
    adapter off (`AdapterOff`, through `envs.set_reference`), so the env's frozen copy of the weights is
    released and the process holds the base weights once. That is only pi_ref if the policy's weights are
    pi_ref's when the adapter is added: a policy trained or swapped before is refused.

    Args:
        envs: the agent's env; its `policy` and `reference` are replaced when `lora` is given.
        lora: the agent config's `lora`.
        seed: seeds the adapter's A (torch's global RNG is left as it was).
        agent: the agent's name, for messages.
        train_mode: whether the agent ever trains the policy in train mode (RAFT's fine-tuning); the others
            keep it in eval mode, where LoRA's dropout never acts, so they refuse a non-zero `lora.dropout`.
    """
    if lora is not None:
        if lora.dropout and not train_mode:
            raise ValueError(
                f"lora.dropout={lora.dropout} would never act: {agent} keeps the policy in eval mode (the "
                "sampled and the trained policy must be one function); set lora.dropout=0"
            )
        reference = envs.reference
        policy = add_lora(envs.policy, lora, seed=seed)
        base = AdapterOff(policy)
        mine, ref = base.state_dict(), reference.state_dict()
        if mine.keys() != ref.keys() or not all(torch.equal(mine[k], ref[k].to(mine[k].device)) for k in ref):
            raise ValueError(
                f"{agent} with lora: the env's policy is not pi_ref (it was trained or replaced before the "
                "adapter was added), so turning the adapter off would not give pi_ref; build the agent on a "
                "fresh env, whose policy starts as a copy of the reference"
            )
        del mine, ref, reference
        envs.set_policy(policy)
        envs.set_reference(base)  # the env's own frozen copy is released here
    return [p for p in envs.policy.parameters() if p.requires_grad]


def policy_state(policy: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The policy's part of a checkpoint: its `state_dict()`, or with LoRA the adapter's weights alone (the
    frozen base is the env's model, rebuilt from the same config on resume)."""
    return adapter_state_dict(policy) if is_lora(policy) else policy.state_dict()


def load_policy_state(policy: PreTrainedModel, state: dict[str, torch.Tensor]) -> None:
    """Put back what `policy_state` returned, in place."""
    if is_lora(policy):
        load_adapter_state_dict(policy, state)
    else:
        policy.load_state_dict(state)


class PolicyAgentMixin:
    """`act`, `evaluate`, `save`, `load` and checkpoints for an agent that trains `envs.policy` with
    `self.optimizer`: the part every policy-gradient or preference agent would otherwise repeat.

    `state_dict()` holds the policy, the optimiser, whichever of the RNGs `RNG_ATTRIBUTES` names the agent
    has (torch generators and numpy generators), the env's state, the metrics so far, and `_extra_state()`
    (an agent's own learning state, e.g. DPO's place in its pairs). An algorithm file keeps only its
    algorithm; PPO, REINFORCE and RAFT predate it and keep their own.
    """

    RNG_ATTRIBUTES = ("generator", "shuffle_generator", "rng")

    def _start_training(self, envs: Any, config: Any, *, shuffle: bool = True) -> None:
        """The set-up a policy-gradient agent's `__init__` shares: torch seeded from `config.seed`, the policy
        prepared (`prepare_policy`: LoRA's adapter, or every weight), the sampling generator, the minibatch
        shuffle's (when `shuffle`), the prompt draws' numpy generator, and AdamW from the config's
        `learning_rate`, `weight_decay` and `adam_eps`, in that order (the order fixes the random streams)."""
        self.envs, self.config = envs, config
        self.history: list[dict[str, float]] = []
        torch.manual_seed(config.seed)
        params = prepare_policy(envs, config.lora, config.seed, self.name)  # LoRA: the adapter's alone
        device = next(envs.policy.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(config.seed)  # token sampling
        if shuffle:
            self.shuffle_generator = torch.Generator().manual_seed(config.seed)  # minibatch order
        self.rng = np.random.default_rng(config.seed)  # prompt draws
        self.optimizer = adam(
            params, lr=config.learning_rate, weight_decay=config.weight_decay, eps=config.adam_eps
        )

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return act_with_policy(self.envs.policy, obs, envs=self.envs)

    def evaluate(self, num_episodes: int = 256, seed: int = 0) -> dict[str, float]:
        return evaluate_policy(self.envs, num_episodes=num_episodes, seed=seed)

    def save(self, path: str | Path) -> None:
        save_policy(self.envs.policy, self.envs.tokenizer, path, getattr(self.config, "lora", None))

    def load(self, path: str | Path) -> None:
        """Load policy weights saved by `save` (safetensors via `from_pretrained`, never a pickle)."""
        load_policy(self.envs.policy, path)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """What the next iterations depend on, for a checkpoint (see the class docstring)."""
        rngs = {}
        for name in self.RNG_ATTRIBUTES:
            rng = getattr(self, name, None)
            if isinstance(rng, torch.Generator):
                rngs[name] = rng.get_state()
            elif isinstance(rng, np.random.Generator):
                rngs[name] = rng.bit_generator.state
        return {
            "policy": policy_state(self.envs.policy),
            "optimizer": self.optimizer.state_dict(),
            "rngs": rngs,
            "env": env_state(self.envs),
            "history": [dict(row) for row in self.history],
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a `state_dict()` into this agent (same env and config), in place."""
        load_policy_state(self.envs.policy, state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        for name, rng_state in state["rngs"].items():
            rng = getattr(self, name)
            if isinstance(rng, torch.Generator):
                rng.set_state(rng_state)
            else:
                rng.bit_generator.state = rng_state
        load_env_state(self.envs, state["env"])
        self.history = [dict(row) for row in state["history"]]
        self._load_extra_state(state["extra"])


def supports_distributed(agent: Any) -> bool:
    """An agent's (or agent class's) `distributed` declaration: True if it trains over several processes."""
    return bool(getattr(agent, "distributed", False))


def agent_learns(agent: Any) -> bool:
    """An agent's (or agent class's) `learns` declaration; True for agents that do not declare it."""
    return bool(getattr(agent, "learns", True))


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the last good checkpoint is left as it was."""


def check_kl_settings(kl_estimator: str, kl_in: str, kl_granularity: str) -> None:
    """The KL settings of an agent that optimises the KL (PPO, REINFORCE), or an error naming the key.

    The three axes and what each combination optimises are `rlhf_base.maths.kl_penalty`'s docstring.
    """
    old = {"per_token": "token", "terminal": "sequence"}  # PPO's kl_placement, renamed kl_granularity
    for key, value, valid in (
        ("kl_estimator", kl_estimator, KL_ESTIMATORS),
        ("kl_in", kl_in, KL_PLACEMENTS),
        ("kl_granularity", kl_granularity, KL_GRANULARITIES),
    ):
        if value not in valid:
            hint = f" (the old kl_placement's {value!r} is {old[value]!r})" if value in old else ""
            raise ValueError(f"{key} must be one of {list(valid)}, got {value!r}{hint}")


def check_num_envs(agent_cls: type, config: Any, num_envs: int) -> None:
    """The agent's own check that the env's batch size suits its config, if its class has one.

    A setting that depends on the env (GRPO's and RLOO's `samples_per_prompt` must divide `num_envs`;
    online DPO's pairs need an even `num_envs`) cannot be checked by the config alone. An agent class
    checks it in a static method `check_num_envs(config, num_envs)` that raises a ValueError, and calls it
    from its constructor; `rlhf-gym train` and the sweep's planner call it through this function on the
    env's config, so a bad pair fails before any model loads or any cell runs. A user's agent may define
    it too; one without it is not checked.
    """
    check = getattr(agent_cls, "check_num_envs", None)
    if callable(check):
        check(config, num_envs)


def check_finite(loss: torch.Tensor, what: str, iteration: int) -> None:
    """Stop before a NaN/inf loss reaches the optimiser (and so the weights or a checkpoint)."""
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(
            f"{what} is {loss.item()} at iteration {iteration}: training stopped before the update, so the "
            "weights and the last checkpoint are intact; lower the learning rate or check the reward model"
        )


def check_rank_scores(envs: Any, scores: torch.Tensor, responses: list[str], use: str) -> None:
    """Refuse NaN/inf scores before an agent selects or ranks responses by them, naming the reward and rows.

    The env's judge refuses them where it scores (`text_env.judge.check_scores`), so a rollout of this env
    never holds one; this second guard covers rollouts from anywhere else (a hand-made `Rollout`, another
    env), where best-of-n's argmax would pick the NaN row and RAFT's sort would keep it and train on it.

    Args:
        scores: (B,) what the agent ranks by; `responses` their texts, for the message.
        use: what ranks by them, for the message (e.g. "best-of-n selects by it").
    """
    name = getattr(envs, "reward_name", "the reward model")  # the env's surface names it
    check_scores(scores, len(responses), f"{name} ({use})", responses)


def rollout_metrics(batch: Rollout, iteration: int, wall_time: float, tokens: int) -> dict[str, float]:
    """The shared metrics of one batch of episodes (see METRIC_KEYS).

    Under torchrun (`rlhf_base.distributed`) `batch` is this rank's shard, and the means are those of the
    global batch: each rank's, weighted by its rows (by its tokens for the entropy), all-reduced. `tokens`
    and `wall_time` are the caller's as given.
    """
    mask = batch.response_mask
    gold = batch.gold_scores
    metrics = {
        "iteration": float(iteration),
        "rm_score": batch.rm_scores.mean().item(),
        "gold_score": gold.mean().item() if torch.isfinite(gold).all() else math.nan,
        "kl": batch.kl.mean().item(),
        "reward": batch.rewards.mean().item(),
        "length": batch.lengths.mean().item(),
        "entropy": ((batch.entropy * mask).sum() / mask.sum().clamp(min=1)).item(),
        "wall_time": float(wall_time),
        "tokens": float(tokens),
    }
    if is_distributed():
        row_means = {k: metrics[k] for k in ("rm_score", "gold_score", "kl", "reward", "length")}
        metrics.update(mean_over_ranks(row_means, weight=len(batch.rm_scores)))
        metrics.update(mean_over_ranks({"entropy": metrics["entropy"]}, weight=mask.sum().item()))
    return metrics


def take_rows(batch: Rollout, rows: torch.Tensor) -> Rollout:
    """Rows `rows` (a 1-D index tensor) of a rollout, e.g. a minibatch: every per-row field indexed alike."""
    index = rows.cpu().numpy()
    tensors = {
        f.name: getattr(batch, f.name)[rows.to(getattr(batch, f.name).device)]
        for f in dataclasses.fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    return dataclasses.replace(
        batch,
        prompts=[batch.prompts[i] for i in index],
        responses=[batch.responses[i] for i in index],
        prompt_indices=batch.prompt_indices[index],
        **tensors,
    )


@torch.no_grad()
def act_with_policy(
    policy: PreTrainedModel,
    obs: dict[str, np.ndarray],
    generator: torch.Generator | None = None,
    envs: Any = None,
) -> np.ndarray:
    """Sample the next token for each observation: one full forward (no cache), for generic RL loops.

    With `envs` (the env the observations come from), the token is drawn as the env's sampler draws it:
    through `envs.sampling` (its temperature, EOS banned before min_new_tokens) at each row's response step.
    Without it, from the policy's own distribution.
    """
    device = next(policy.parameters()).device
    ids = torch.as_tensor(np.asarray(obs["input_ids"]), device=device)
    mask = torch.as_tensor(np.asarray(obs["attention_mask"]), device=device)
    if ids.ndim == 1:
        ids, mask = ids[None], mask[None]
    logits = policy(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    # The next token is predicted at the last real position of each row (prompt or response so far).
    width = mask.shape[1]
    last = width - 1 - torch.argmax(mask.flip(-1), dim=-1)  # (B,)
    next_logits = logits[torch.arange(len(ids), device=device), last].float()
    if envs is not None:
        steps = mask[:, envs.response_start :].sum(-1)  # (B,) response tokens so far
        next_logits = envs.sampling.logits(next_logits, step=steps)
    tokens = torch.multinomial(next_logits.softmax(-1), 1, generator=generator).squeeze(1)
    return tokens.cpu().numpy()


def evaluate_policy(
    envs: text_env.TextGenVectorEnv, num_episodes: int = 256, seed: int = 0
) -> dict[str, float]:
    """Mean shared metrics of `envs.policy` over fresh KV-cached rollouts (no learning).

    Under torchrun (`rlhf_base.distributed`) every rank rolls out its `envs.num_envs` rows of each batch of
    `num_envs * world_size` episodes, with its own prompt and sampling streams (`rank_seed`), and the means
    are over all ranks' episodes, the same on every rank.
    """
    start, rows, tokens = time.perf_counter(), [], 0
    was_training = envs.policy.training
    envs.policy.eval()  # no dropout while measuring
    generator = torch.Generator(device=next(envs.policy.parameters()).device).manual_seed(rank_seed(seed))
    batch_size = envs.num_envs * world_size()  # under torchrun each rank rolls out its shard of each batch
    for i in range(max(1, math.ceil(num_episodes / batch_size))):
        batch = text_env.rollout(envs, seed=rank_seed(seed + i), generator=generator)
        tokens += int(sum_over_ranks({"tokens": batch.num_tokens})["tokens"])
        rows.append(rollout_metrics(batch, 0, time.perf_counter() - start, tokens))
    envs.policy.train(was_training)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in METRIC_KEYS}
    mean.update(
        wall_time=time.perf_counter() - start, tokens=float(tokens), episodes=float(len(rows) * batch_size)
    )
    return mean


def load_policy(policy: PreTrainedModel, path: str | Path) -> None:
    """Load weights saved by `save_policy` into `policy` in place (safetensors only, never a pickle), so an
    optimiser and the env keep pointing at the same parameters. A LoRA policy loads the adapter alone."""
    path = Path(path)
    if is_lora(policy):
        load_adapter(policy, path)
        return
    if has_adapter(path) and not (path / "config.json").is_file():
        raise ValueError(
            f"{path} holds a LoRA adapter, not a whole model: load it into an agent built with the same "
            "lora settings, or save with lora.save_merged=true for a folder any loader reads"
        )
    check_weights_folder(path)  # a truncated file or pickled weights: named, before transformers reads them
    loaded = type(policy).from_pretrained(path, use_safetensors=True, dtype=policy.dtype)
    policy.load_state_dict(loaded.state_dict())


def save_policy(
    policy: PreTrainedModel, tokenizer: Any, path: str | Path, lora: LoraConfig | None = None
) -> None:
    """A Hugging Face directory (safetensors + tokenizer), written atomically: a crash keeps the old one.

    A LoRA policy writes its adapter (`adapter_model.safetensors` + `adapter_config.json`), or, with
    `lora.save_merged`, the merged model with the adapter in `adapter/` (`rlhf_base.lora.save_adapter`).
    """
    with atomic_dir(Path(path)) as tmp:
        if is_lora(policy):
            save_adapter(policy, tmp, merged=lora is not None and lora.save_merged)
        else:
            policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
