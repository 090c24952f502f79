"""How the agents wire the maths together (issue 12): one real iteration of PPO and of REINFORCE, and every
input their update sees, against a hand computation from the rollout and the model.

The formulas have their own tests (test_maths, test_ppo, test_reinforce); these check how an agent combines
them: which reward and which beta with which sign, which gamma and which lambda, the hidden state a value is
read from, what the critic regresses on, and the score REINFORCE optimises. The functions the update calls
are wrapped by spies that record their arguments and call through. The expected numbers never come from the
agent's own helpers: log-probs and values come from one forward per row over its real tokens alone (no
padding, no length groups, no `teacher_forced`), GAE from its defining sum, whitening from `statistics`.

The setup is chosen so that each wiring bug changes numbers: the policy is moved off pi_ref (KL != 0), beta
is nonzero, gamma != lambda, and the critic is not the zero one PPO starts with (under V = 0, a value read at
the wrong token or gamma swapped with lambda changes nothing). `tests/mutations.py` applies each bug the
issue names to a copy of the source and checks that this file then fails.
"""

from __future__ import annotations

import copy
import inspect
import statistics
from typing import Any

import pytest
import torch

import agents
import agents.ppo
import agents.reinforce
import text_env
from tests.helpers import perturbed
from text_env.core import EnvCore
from text_env.sampler import Rollout

BETA = 0.3  # the env's KL coefficient: large enough that dropping or flipping the KL term shows
GAMMA, LAMBDA = 0.9, 0.8  # different, so that swapping them changes the advantages
NUM_ENVS = 8
EPS = 1e-8  # masked_whiten's epsilon under the square root
TOL = {"atol": 1e-5, "rtol": 1e-4}  # batched, padded forwards against one unpadded forward per row


@pytest.fixture(scope="module")
def core8() -> EnvCore:
    """Our own core (responses of at most 8 tokens, k1 KL, beta 0.3): nothing here touches other tests."""
    return EnvCore(max_new_tokens=8, beta=BETA)


def moved_envs(core: EnvCore) -> text_env.TextGenVectorEnv:
    """A vector env whose policy is pi_ref plus fixed noise, so that the KL to pi_ref is far from 0."""
    envs = text_env.TextGenVectorEnv(num_envs=NUM_ENVS, core=core)
    envs.set_policy(perturbed(core.reference))
    return envs


class Spy:
    """Wraps a function: records each call's arguments by parameter name (tensors cloned) and its result."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.signature = fn, inspect.signature(fn)
        self.calls: list[dict[str, Any]] = []
        self.results: list[Any] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        copy = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in bound.arguments.items()}
        self.calls.append(copy)
        result = self.fn(*args, **kwargs)
        self.results.append(result)
        return result


def snapshot(module: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy in eval mode: the weights the iteration's rollout and update start from."""
    return copy.deepcopy(module).eval().requires_grad_(False)


def spy(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> Spy:
    wrapper = Spy(getattr(owner, name))
    monkeypatch.setattr(owner, name, wrapper)
    return wrapper


# ---------------------------------------------------------------------------------------------------------
# Hand computations, one response at a time
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def hand_forward(
    policy: torch.nn.Module, value_head: torch.nn.Module | None, batch: Rollout, i: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log pi and V of row i's response tokens, from one forward over its real tokens alone.

    Response token k sits at position `prompt_len + k`. It is predicted by the logits one position earlier,
    and it is the action taken in state s_k (the prompt and the k tokens before it), which ends at that same
    earlier position: V(s_k) is the value head on the last hidden state at `prompt_len + k - 1`.
    """
    real = batch.attention_mask[i].bool()
    ids = batch.input_ids[i, real]  # (L,) the prompt without its left padding, then the response
    prompt_len = int(real[: batch.response_start].sum())
    length = int(batch.response_mask[i].sum())
    assert len(ids) == prompt_len + length, "the response's attention mask must match its response mask"
    out = policy(input_ids=ids[None], output_hidden_states=True)
    before = torch.arange(prompt_len - 1, prompt_len + length - 1)  # (length,) where s_0 .. s_{length-1} end
    logprobs = out.logits[0, before].float().log_softmax(-1)[torch.arange(length), ids[before + 1]]
    if value_head is None:
        return logprobs, None
    return logprobs, value_head(out.hidden_states[-1][0, before].float()).squeeze(-1)


def hand_kl(batch: Rollout, i: int) -> list[float]:
    """k1 per token, log pi(y_t) - log pi_ref(y_t), from the log-probs the rollout recorded."""
    length = int(batch.response_mask[i].sum())
    return [float(batch.logprobs[i, t] - batch.ref_logprobs[i, t]) for t in range(length)]


def hand_score(batch: Rollout, i: int, beta: float) -> float:
    """The sequence reward RLHF maximises: rm_score - beta * sum_t kl_t."""
    return float(batch.rm_scores[i]) - beta * sum(hand_kl(batch, i))


def hand_token_rewards(batch: Rollout, i: int, beta: float, granularity: str) -> list[float]:
    """k1 in the reward. "token": -beta * kl_t on every token, rm_score added on the last; "sequence": the
    whole score rm_score - beta * sum_t kl_t on the last token."""
    kl = hand_kl(batch, i)
    if granularity == "token":
        rewards = [-beta * k for k in kl]
        rewards[-1] += float(batch.rm_scores[i])
    else:
        rewards = [0.0] * len(kl)
        rewards[-1] = hand_score(batch, i, beta)
    return rewards


def hand_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """GAE from its definition (Schulman et al. 2016, eq. 16): A_t = sum_l (gamma lam)^l delta_{t+l}, with
    delta_t = r_t + gamma V_{t+1} - V_t and V = 0 after the last token (the episode ends there)."""
    n = len(rewards)
    next_values = values[1:] + [0.0]
    deltas = [rewards[t] + gamma * next_values[t] - values[t] for t in range(n)]
    return [sum((gamma * lam) ** (s - t) * deltas[s] for s in range(t, n)) for t in range(n)]


def hand_whiten(rows: list[list[float]], shift_mean: bool = True) -> list[list[float]]:
    """(x - mean) / sqrt(var + eps) over every valid token of the batch (unbiased variance); with
    `shift_mean=False` the mean is added back (TRL's reward scaling keeps the sign)."""
    flat = [x for row in rows for x in row]
    mean, var = statistics.fmean(flat), statistics.variance(flat)
    back = 0.0 if shift_mean else mean
    return [[(x - mean) / (var + EPS) ** 0.5 + back for x in row] for row in rows]


def assert_rows(received: torch.Tensor, expected: list, rows: list[int], what: str) -> None:
    """`received` (R, N) holds batch rows `rows` in that order: compare each one's valid tokens by hand."""
    assert received.shape[0] == len(rows), what
    for j, i in enumerate(rows):
        want = torch.as_tensor(expected[i], dtype=torch.float32)
        torch.testing.assert_close(
            received[j, : len(want)].float(), want, **TOL, msg=lambda m, i=i: f"{what}, row {i}: {m}"
        )


def rows_of(minibatch_ids: torch.Tensor, batch: Rollout) -> list[int]:
    """Which batch row each minibatch row is (PPO shuffles rows); identical rows expect identical numbers."""
    ids = batch.input_ids[:, : minibatch_ids.shape[1]]
    return [int(torch.nonzero((ids == row).all(-1))[0]) for row in minibatch_ids]


# ---------------------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------------------
def nonzero_critic(value_head: torch.nn.Linear) -> None:
    """Give PPO's zero-initialised value head fixed random weights, so that values differ token by token."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w = value_head.weight
        w.copy_(torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5)
        value_head.bias.fill_(0.1)


@pytest.mark.parametrize(
    "overrides",
    [{"kl_granularity": "token"}, {"kl_granularity": "sequence", "whiten_rewards": True}],
    ids=["per_token", "sequence+whiten_rewards"],
)
def test_ppo_update_sees_hand_computed_rewards_values_returns_and_advantages(core8, monkeypatch, overrides):
    envs = moved_envs(core8)
    config = {"gamma": GAMMA, "gae_lambda": LAMBDA, "epochs": 1, "num_minibatches": 1, **overrides}
    agent = agents.make_agent("ppo", envs, config)
    cfg = agent.config
    assert cfg.whiten_advantages and envs.beta == BETA
    nonzero_critic(agent.value_head)
    policy, value_head = snapshot(envs.policy), snapshot(agent.value_head)  # before the update
    rollout = spy(monkeypatch, text_env, "rollout")
    forward = spy(monkeypatch, agent, "_forward")
    gae = spy(monkeypatch, agents.ppo, "gae")
    policy_loss = spy(monkeypatch, agents.ppo, "ppo_policy_loss")
    value_loss = spy(monkeypatch, agents.ppo, "ppo_value_loss")

    agent.learn(1)

    (batch,) = rollout.results
    assert batch.kl.abs().mean() > 0.05, "the setup needs a KL far from 0 to see the KL term's wiring"
    every = range(NUM_ENVS)
    logprobs, values = zip(*(hand_forward(policy, value_head, batch, i) for i in every), strict=True)
    values = [v.tolist() for v in values]
    rewards = [hand_token_rewards(batch, i, BETA, cfg.kl_granularity) for i in every]
    for i in every:  # the hand layout pays the env's reward: same beta, same KL
        assert sum(rewards[i]) == pytest.approx(float(batch.rewards[i]), abs=1e-5)
    if cfg.whiten_rewards:
        rewards = hand_whiten(rewards, shift_mean=False)
    advantages = [hand_gae(rewards[i], values[i], GAMMA, LAMBDA) for i in every]
    returns = [[a + v for a, v in zip(advantages[i], values[i], strict=True)] for i in every]
    advantages = hand_whiten(advantages)

    # GAE's inputs: the token rewards, the values of the states before each token, the config's gamma and lambda.
    (g,) = gae.calls
    assert (g["gamma"], g["lam"]) == (GAMMA, LAMBDA)
    n = g["mask"].shape[1]
    torch.testing.assert_close(g["mask"], batch.response_mask[:, :n])
    assert_rows(g["rewards"], rewards, list(every), "token rewards into GAE")
    assert_rows(g["values"], values, list(every), "values into GAE")

    # The update's inputs (one minibatch of all rows, in shuffled order, under the pre-update policy).
    rows = rows_of(forward.calls[-1]["ids"], batch)
    (pl,), (vl,) = policy_loss.calls, value_loss.calls
    for call in (pl, vl):
        torch.testing.assert_close(call["mask"], batch.response_mask[rows, :n])
    assert_rows(pl["advantages"], advantages, rows, "whitened advantages into the policy loss")
    assert_rows(pl["old_logprobs"], logprobs, rows, "old log-probs into the policy loss")
    assert_rows(pl["logprobs"], logprobs, rows, "log-probs into the policy loss")
    assert pl["clip_range"] == cfg.clip_range
    assert_rows(vl["returns"], returns, rows, "value target (returns, not whitened advantages)")
    assert_rows(vl["old_values"], values, rows, "old values into the value loss")
    assert_rows(vl["values"], values, rows, "values into the value loss")
    assert vl["clip_range_value"] == cfg.clip_range_value


# ---------------------------------------------------------------------------------------------------------
# REINFORCE
# ---------------------------------------------------------------------------------------------------------
def hand_advantages(scores: list[float], baseline: str, k: int, past: float | None) -> list[float]:
    """A = R - b: RLOO's b is the mean of the other k - 1 samples of the prompt; the moving average's is the
    past average (this batch's mean when there is none); "whiten" standardises R over the batch."""
    if baseline == "rloo":
        groups = [scores[g : g + k] for g in range(0, len(scores), k)]
        return [r - (sum(group) - r) / (k - 1) for group in groups for r in group]
    if baseline == "moving_average":
        b = statistics.fmean(scores) if past is None else past
        return [r - b for r in scores]
    return hand_whiten([scores])[0]


@pytest.mark.parametrize(
    "baseline, past",
    [("rloo", None), ("moving_average", None), ("moving_average", 0.25), ("whiten", None)],
    ids=["rloo", "moving_average-first", "moving_average-past", "whiten"],
)
def test_reinforce_update_sees_the_hand_computed_score_and_advantages(core8, monkeypatch, baseline, past):
    envs = moved_envs(core8)
    k = 4
    agent = agents.make_agent("reinforce", envs, {"baseline": baseline, "samples_per_prompt": k, "epochs": 1})
    cfg = agent.config
    agent.ema_state = past  # the moving average of earlier batches (None: this is the first)
    policy = snapshot(envs.policy)  # before the update
    rollout = spy(monkeypatch, text_env, "rollout")
    advantages_fn = spy(monkeypatch, agents.reinforce, "advantages")
    loss_fn = spy(monkeypatch, agents.reinforce, "reinforce_loss")

    (metrics,) = agent.learn(1)

    (batch,) = rollout.results
    assert batch.kl.abs().mean() > 0.05, "the setup needs a KL far from 0 to tell rm_score from the reward"
    every = range(NUM_ENVS)
    scores = [hand_score(batch, i, BETA) for i in every]
    if baseline == "rloo":  # k consecutive samples of each prompt, which RLOO's groups assume
        groups = batch.prompt_indices.reshape(-1, k)
        assert (groups == groups[:, :1]).all()
    want = hand_advantages(scores, baseline, k, past)
    logprobs = [hand_forward(policy, None, batch, i)[0] for i in every]

    # The sequence score the baseline sees: rm_score - beta * KL, not the reward model's score alone.
    (a,) = advantages_fn.calls
    what = "sequence score into the baseline: rm_score - beta * KL"
    torch.testing.assert_close(a["rewards"], torch.tensor(scores), **TOL, msg=lambda m: f"{what}: {m}")
    torch.testing.assert_close(a["rewards"], batch.rewards, **TOL)  # the env's reward, the same
    # The loss's inputs: the advantages per baseline, the policy's log-probs, the response mask.
    (call,) = loss_fn.calls
    torch.testing.assert_close(
        call["advantages"],
        torch.tensor(want),
        **TOL,
        msg=lambda m: f"{baseline} advantages into the loss: {m}",
    )
    torch.testing.assert_close(call["mask"], batch.response_mask)
    assert_rows(call["logprobs"], logprobs, list(every), "log-probs into the loss")
    assert call["token_mean"] is cfg.token_mean is False  # the estimator below: a mean over sequences
    # The loss itself: -mean_i(A_i * sum_t log pi_it), the score-function estimator.
    loss = -statistics.fmean(w * float(lp.sum()) for w, lp in zip(want, logprobs, strict=True))
    assert metrics["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-5)
    if baseline == "moving_average":
        b = statistics.fmean(scores) if past is None else past
        assert agent.ema_state == pytest.approx(
            cfg.ema_decay * b + (1 - cfg.ema_decay) * statistics.fmean(scores)
        )
