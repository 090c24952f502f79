"""DPO, IPO and online DPO: the losses by hand, their values at pi_ref, the tokens against the env's, learning on
a handful of pairs, the errors, the pipeline's `pairs`, and a sweep writing the shared metrics."""

from __future__ import annotations

import copy
import csv
import json
import math

import numpy as np
import pytest
import torch
import yaml

import agents
import text_env
from agents.dpo import DPOAgent, DPOConfig, dpo_loss, encode_pairs, sequence_logprobs
from agents.online_dpo import OnlineDPOAgent, OnlineDPOConfig, rank_pairs
from agents.registry import resolve_config
from rlhf_base.config import ConfigError, load_config
from rlhf_base.io import DataError
from rlhf_base.metrics import METRIC_KEYS
from rlhf_gym.pipeline import with_pairs
from rlhf_gym.report.schema import RESULT_METRICS
from rlhf_gym.sweep import SweepConfig, run_sweep
from tests.helpers import fresh_envs, params
from text_env.core import EnvCore

BETA = 0.1  # the env's KL coefficient here: DPO's beta, IPO's tau
#: (chosen, rejected) in the reviews language: the gold reward prefers the first of each.
RESPONSES = [
    ("the movie was great .", "bad bad bad"),
    ("i loved this film .", "the acting was terrible ."),
    ("brilliant .", "horrible ."),
    ("the score felt beautiful .", "bad bad bad"),
]


@pytest.fixture(scope="module")
def core8() -> EnvCore:
    """Our own core (responses of at most 8 tokens, beta 0.1): training here touches no other test."""
    return EnvCore(max_new_tokens=8, beta=BETA)


def write_pairs(path, prompts, responses=RESPONSES):
    pairs = [{"prompt": prompts[i], "chosen": c, "rejected": r} for i, (c, r) in enumerate(responses)]
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


@pytest.fixture()
def pairs_file(tmp_path, core8):
    return write_pairs(tmp_path / "pairs.jsonl", core8.task.prompts)


# --------------------------------------------------------------------------------------------------------
# The losses, by hand
# --------------------------------------------------------------------------------------------------------
def test_dpo_and_ipo_losses_and_gradients_by_hand():
    # Two pairs. Pair 0: the policy raised the chosen response's log-prob by 1 over pi_ref's and lowered the
    # rejected one's by 1, so h = 2. Pair 1: the policy is pi_ref on it, h = 0.
    chosen = torch.tensor([-3.0, -2.0], requires_grad=True)
    rejected = torch.tensor([-5.0, -7.0], requires_grad=True)
    ref_chosen, ref_rejected = torch.tensor([-4.0, -2.0]), torch.tensor([-4.0, -7.0])
    beta = 0.5

    loss, h = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    assert h.tolist() == [2.0, 0.0]
    # -log sigmoid(beta h) = log(1 + exp(-beta h)): log(1 + e^-1) = 0.31326, and log 2 at h = 0
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(2)) / 2, abs=1e-6)
    loss.backward()
    # d/d chosen_i = -beta * sigmoid(-beta h_i) / 2 (the mean over 2 pairs): -0.5 * 0.26894 / 2, -0.5 * 0.5 / 2
    expected = [-beta / (1 + math.exp(1)) / 2, -beta * 0.5 / 2]
    assert chosen.grad.tolist() == pytest.approx(expected, abs=1e-6)
    assert rejected.grad.tolist() == pytest.approx([-g for g in expected], abs=1e-6)
    # so a descent step raises the chosen log-probs and lowers the rejected ones

    # cDPO: labels flipped with probability 0.1
    loss, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.1)
    smoothed_0 = 0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1))  # 0.41326
    assert loss.item() == pytest.approx((smoothed_0 + math.log(2)) / 2, abs=1e-6)

    # IPO with tau = 0.1: target h = 1 / (2 tau) = 5, so (2 - 5)^2 = 9 and (0 - 5)^2 = 25
    chosen.grad = rejected.grad = None
    loss, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1, "ipo")
    assert loss.item() == pytest.approx((9 + 25) / 2)
    loss.backward()
    assert chosen.grad.tolist() == pytest.approx([2 * (2 - 5) / 2, 2 * (0 - 5) / 2])  # -3, -5: raise chosen
    # IPO with tau = 0.5: target 1, below pair 0's h = 2, so IPO pulls it back (DPO would push on)
    chosen.grad = None
    loss, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.5, "ipo")
    assert loss.item() == pytest.approx(((2 - 1) ** 2 + (0 - 1) ** 2) / 2)
    loss.backward()
    assert chosen.grad.tolist() == pytest.approx([1.0, -1.0])  # a descent step lowers pair 0's chosen


def test_beta_must_be_positive_and_the_config_checked():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=r"DPO's beta is the env's KL coefficient.*beta > 0"):
        dpo_loss(x, x, x, x, 0.0)
    with pytest.raises(ValueError, match="loss must be one of"):
        DPOConfig(loss="hinge")
    with pytest.raises(ValueError, match="label_smoothing applies to the sigmoid"):
        OnlineDPOConfig(loss="ipo", label_smoothing=0.1)
    with pytest.raises(
        ValueError,
        match=r"DPOConfig\.label_smoothing = 0\.5: must be >= 0 and < 0\.5 \(valid range \[0, 0\.5\)\)",
    ):
        DPOConfig(label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"DPOConfig\.steps_per_iteration = 0: must be >= 1"):
        DPOConfig(steps_per_iteration=0)


@pytest.mark.parametrize("agent", [DPOAgent, OnlineDPOAgent])
def test_beta_is_the_envs_not_the_agents(agent):
    with pytest.raises(ConfigError, match=r"env owns the KL coefficient: set env\.beta"):
        resolve_config(agent, None, ["beta=0.1"])


# --------------------------------------------------------------------------------------------------------
# The data: tokens as the env sees them
# --------------------------------------------------------------------------------------------------------
def test_pairs_are_tokenised_and_scored_as_the_env_sees_them(core8):
    """Pairs made of the env's own samples give back the env's tokens, and the sequence log-probs DPO uses
    are the sums of the rollout's log q and pi_ref log-probs (the same log-ratios the env's kl sums)."""
    envs = fresh_envs(core8, 8)
    batch = text_env.rollout(
        envs, prompt_indices=np.repeat([3, 5, 7, 9], 2), generator=torch.Generator().manual_seed(1)
    )
    pairs = [
        {
            "prompt": batch.prompts[2 * i],
            "chosen": batch.responses[2 * i],
            "rejected": batch.responses[2 * i + 1],
        }
        for i in range(4)
    ]
    data = encode_pairs(envs.tokenizer, pairs, envs.max_new_tokens)
    for row in range(8):
        i, side = row // 2, row % 2
        expect = batch.response_ids[row][batch.response_mask[row].bool()].tolist()  # EOS, or cut at 8 tokens
        assert data.response_ids[side, i][data.response_mask[side, i].bool()].tolist() == expect
        prompt = batch.input_ids[row, : batch.response_start][
            batch.attention_mask[row, : batch.response_start].bool()
        ]
        assert data.prompt_ids[i][data.prompt_mask[i].bool()].tolist() == prompt.tolist()
    ids, mask, start = data.batch(torch.arange(4), envs.policy.device)  # chosen rows, then rejected rows
    order = [0, 2, 4, 6, 1, 3, 5, 7]  # the rollout's rows in that order
    with torch.no_grad():
        policy = sequence_logprobs(envs.policy, ids, mask, start, envs)
        ref = sequence_logprobs(envs.reference, ids, mask, start, envs)
    assert policy.tolist() == pytest.approx(batch.logprobs.sum(-1)[order].tolist(), abs=1e-4)
    assert ref.tolist() == pytest.approx(batch.ref_logprobs.sum(-1)[order].tolist(), abs=1e-4)


def test_long_responses_are_cut_as_the_env_cuts_an_episode(core8):
    pairs = [{"prompt": "the", "chosen": "the movie was great .", "rejected": "bad bad"}]  # 5 and 2 tokens
    with pytest.warns(UserWarning, match="1 of 2 responses are longer than the env's max_new_tokens=3"):
        data = encode_pairs(core8.tokenizer, pairs, max_new_tokens=3)
    eos = core8.tokenizer.eos_token_id
    assert data.response_mask.sum(-1).tolist() == [[3], [3]]
    assert data.response_ids[0, 0].tolist() == core8.tokenizer("the movie was")["input_ids"]  # cut, no EOS
    assert data.response_ids[1, 0].tolist()[-1] == eos  # 2 tokens + EOS: the env's episode, EOS included
    with pytest.raises(
        DataError, match=r"pair 0: the rejected response 'bad bad' ends after 2 tokens.*min_new_tokens=4"
    ):
        encode_pairs(core8.tokenizer, pairs, max_new_tokens=8, min_new_tokens=4)


def test_missing_or_malformed_pairs_are_clear_errors(core8, tmp_path):
    envs = fresh_envs(core8, 4)
    with pytest.raises(
        ValueError,
        match=r"set dpo\.pairs.*`pairs=\.\.\.` with `rlhf-gym train --agent dpo`.*runs/default/pairs\.jsonl",
    ):
        DPOAgent(envs, DPOConfig())
    with pytest.raises(DataError, match=r"dpo\.pairs='.*nowhere\.jsonl': preference pair file not found"):
        DPOAgent(envs, DPOConfig(pairs=str(tmp_path / "nowhere.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "the", "chosen": "great ."}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl.*line 1.*'rejected'"):
        DPOAgent(envs, DPOConfig(pairs=str(bad)))


# --------------------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("loss", "at_init"), [("sigmoid", math.log(2)), ("ipo", (1 / (2 * BETA)) ** 2)])
def test_at_pi_ref_the_loss_is_log_2_or_ipos_target_squared(core8, pairs_file, loss, at_init):
    envs = fresh_envs(core8, 4)
    config = DPOConfig(pairs=str(pairs_file), loss=loss, batch_size=4, steps_per_iteration=1, seed=0)
    agent = DPOAgent(envs, config)
    start = agent.evaluate_pairs()
    assert start["loss"] == pytest.approx(at_init, rel=1e-6)
    assert start["implied_margin"] == start["chosen_logratio"] == start["rejected_logratio"] == 0.0
    (metrics,) = agent.learn(1)
    assert metrics["loss"] == pytest.approx(at_init, rel=1e-6)  # the one step's loss, taken at pi_ref


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_an_iteration_raises_the_margin_and_changes_the_parameters(core8, pairs_file, loss):
    envs = fresh_envs(core8, 4)
    config = DPOConfig(
        pairs=str(pairs_file), loss=loss, batch_size=2, steps_per_iteration=3, learning_rate=1e-3
    )
    agent = agents.make_agent("dpo", envs, config)
    before, start = params(envs.policy), agent.evaluate_pairs()
    history = agent.learn(iterations=1)
    after = agent.evaluate_pairs()
    assert after["implied_margin"] > start["implied_margin"] + 0.01
    assert after["chosen_logratio"] > after["rejected_logratio"]
    assert after["loss"] < start["loss"]
    assert all(not torch.equal(b, a) for b, a in zip(before, params(envs.policy), strict=True))
    assert all(
        not torch.equal(p, r)
        for p, r in zip(envs.policy.parameters(), envs.reference.parameters(), strict=True)
    )
    (metrics,) = history
    assert set(METRIC_KEYS) <= set(metrics)  # the env's, from a fresh rollout after the update
    assert abs(metrics["kl"]) > 1e-3 and metrics["tokens"] > 0 and metrics["epochs"] == pytest.approx(1.5)
    assert all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm", "implied_accuracy", "implied_margin"))


def test_the_losss_beta_is_the_envs_at_every_step(core8, pairs_file):
    envs = fresh_envs(core8, 4)
    agent = DPOAgent(
        envs, DPOConfig(pairs=str(pairs_file), batch_size=4, steps_per_iteration=2, learning_rate=1e-3)
    )
    agent.learn(1)
    at_01 = agent.evaluate_pairs()
    envs.beta = 0.2
    try:
        at_02 = agent.evaluate_pairs()
    finally:
        envs.beta = BETA
    assert at_02["implied_margin"] == pytest.approx(2 * at_01["implied_margin"], rel=1e-5)
    assert at_02["chosen_logratio"] == pytest.approx(at_01["chosen_logratio"], rel=1e-5)


# --------------------------------------------------------------------------------------------------------
# Online DPO
# --------------------------------------------------------------------------------------------------------
def word_count_rm(prompts, responses):
    """A reward model unlike the gold one (which scores sentiment): longer responses score higher."""
    return [float(len(r.split())) for r in responses]


def test_rank_pairs_by_hand():
    scores = torch.tensor([0.1, 0.9, 2.0, -1.0, 0.5, 0.5, 3.0, 3.5])  # pair 2 is a tie: left out
    chosen, rejected = rank_pairs(scores)
    assert chosen.tolist() == [1, 2, 7]
    assert rejected.tolist() == [0, 3, 6]


def test_online_dpo_ranks_by_the_reward_model_and_learns(core8):
    core = EnvCore(
        reference=core8.reference,
        tokenizer=core8.tokenizer,
        reward_model=word_count_rm,
        max_new_tokens=8,
        beta=BETA,
    )
    envs = fresh_envs(core, 8)
    agent = agents.make_agent("online_dpo", envs, OnlineDPOConfig(learning_rate=1e-3, seed=2))
    seen = {}
    loss_fn = agents.online_dpo.dpo_loss

    def spy(*args, **kwargs):
        seen["args"] = args
        return loss_fn(*args, **kwargs)

    rollout = text_env.rollout

    def spy_rollout(*args, **kwargs):
        seen["batch"] = rollout(*args, **kwargs)
        return seen["batch"]

    before = params(envs.policy)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(agents.online_dpo, "dpo_loss", spy)
        mp.setattr(agents.online_dpo.text_env, "rollout", spy_rollout)
        (metrics,) = agent.learn(1)
    batch = seen["batch"]
    assert (batch.prompt_indices[0::2] == batch.prompt_indices[1::2]).all(), "two samples per prompt"
    rm = torch.tensor(word_count_rm(batch.prompts, batch.responses))
    assert torch.equal(batch.rm_scores, rm) and not torch.allclose(batch.rm_scores, batch.gold_scores)
    chosen, rejected = rank_pairs(rm)
    assert metrics["num_pairs"] == len(chosen) > 0
    assert metrics["rm_margin"] == pytest.approx((rm[chosen] - rm[rejected]).mean().item())
    # the rollout's own ref log-probs, summed, are the loss's pi_ref side; at pi_ref the loss is log 2
    ref = batch.ref_logprobs.sum(-1)
    assert seen["args"][2].tolist() == pytest.approx(ref[chosen].tolist())
    assert seen["args"][3].tolist() == pytest.approx(ref[rejected].tolist())
    assert seen["args"][4] == BETA
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert set(METRIC_KEYS) <= set(metrics)
    assert any(not torch.equal(b, a) for b, a in zip(before, params(envs.policy), strict=True))


def test_online_dpo_needs_an_even_batch(core8):
    with pytest.raises(ValueError, match="num_envs must be even, got 5"):
        OnlineDPOAgent(fresh_envs(core8, 5), OnlineDPOConfig())


# --------------------------------------------------------------------------------------------------------
# The pipeline's pairs, and a sweep
# --------------------------------------------------------------------------------------------------------
def test_the_pipeline_sets_pairs_only_where_left_unset(tmp_path):
    sweep = SweepConfig(agents=["dpo", "online_dpo", "reinforce"], seeds=[0])
    assert with_pairs(sweep, tmp_path / "pairs.jsonl").overrides == [f"dpo.pairs={tmp_path / 'pairs.jsonl'}"]
    mine = SweepConfig(agents=["dpo"], seeds=[0], overrides=["dpo.pairs=mine.jsonl"])
    assert with_pairs(mine, tmp_path / "pairs.jsonl") == mine
    yaml_file = tmp_path / "dpo.yaml"
    yaml_file.write_text(yaml.safe_dump({"pairs": "mine.jsonl"}))
    in_file = SweepConfig(agents=["dpo"], seeds=[0], agent_configs={"dpo": str(yaml_file)})
    assert with_pairs(in_file, tmp_path / "pairs.jsonl") == in_file
    assert with_pairs(SweepConfig(agents=["reinforce"]), tmp_path / "p.jsonl") == SweepConfig(
        agents=["reinforce"]
    )


def test_a_sweep_runs_dpo_and_online_dpo_and_writes_the_shared_metrics(tmp_path, core8):
    pairs = write_pairs(tmp_path / "pairs.jsonl", core8.task.prompts)
    config = load_config(
        SweepConfig,
        None,
        [
            "agents=[dpo, online_dpo]",
            "seeds=[0]",
            "betas=[0.1]",
            "env.max_new_tokens=6",
            "env.num_envs=4",
            "eval_episodes=4",
            "workers=1",
            f"runs_root={tmp_path / 'runs'}",
            "name=dpo",
            "overrides=[dpo.iterations=2, dpo.batch_size=2, dpo.steps_per_iteration=1, online_dpo.iterations=2]",
        ],
    )
    run_dir = run_sweep(with_pairs(config, pairs), progress=False)  # dpo.pairs set as the pipeline sets it
    with open(run_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["agent"] for r in rows) == ["dpo", "online_dpo"]
    for row in rows:
        assert row["learns"] == "True" and row["iterations"] == "2" and row["beta"] == "0.1"
        assert all(k in row for k in RESULT_METRICS)
        assert all(math.isfinite(float(row[k])) for k in ("rm_score", "gold_score", "kl", "reward", "tokens"))


def test_a_dpo_agent_restored_from_its_state_goes_on_exactly(core8, pairs_file):
    """Its place in the pairs (order, cursor) is part of its checkpoint, with the shared state."""
    config = DPOConfig(pairs=str(pairs_file), batch_size=2, steps_per_iteration=3, learning_rate=1e-3)
    saved = agents.make_agent("dpo", fresh_envs(core8, 4), config)
    saved.learn(iterations=1)
    state = saved.state_dict()
    weights = {k: v.clone() for k, v in state["policy"].items()}
    state = {**state, "policy": weights, "optimizer": copy.deepcopy(state["optimizer"])}
    want = saved.learn(iterations=2)
    restored = agents.make_agent("dpo", fresh_envs(core8, 4), config)
    restored.load_state_dict(state)
    got = restored.learn(iterations=2)
    assert [{k: v for k, v in r.items() if k != "wall_time"} for r in got] == [
        {k: v for k, v in r.items() if k != "wall_time"} for r in want
    ]
    assert all(
        torch.equal(a, b)
        for a, b in zip(params(saved.envs.policy), params(restored.envs.policy), strict=True)
    )
