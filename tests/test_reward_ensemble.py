"""Reward model ensembles (Coste et al. 2024): the combinations by hand, training k members, the safetensors
round trip, the env scoring through an ensemble's folder (its shared reference forward too), `train-rm`
building one, and `ensemble.json` errors that name the file and the key."""

from __future__ import annotations

import argparse
import json
import math

import gymnasium as gym
import pytest
import torch

import text_env
from reward_models import FunctionRewardModel, RewardTrainConfig, load_reward_model, train_reward_model
from reward_models.data import write_pairs
from reward_models.ensemble import RewardEnsemble, combine_scores
from rlhf_base.config import ConfigError, load_config
from rlhf_gym.cli import add_train_rm_command
from rlhf_gym.label import LabelConfig, label_pairs
from text_env.config import EnvConfig
from text_env.core import EnvCore
from text_env.speed import SpeedOptions

PROMPTS = ["the plot was", "i", "overall , the film", "this movie"]
RESPONSES = ["great .", "hated the film .", "was not very good .", "is about a dog . i loved it"]


# --------------------------------------------------------------------------------------------------------
# The combinations, by hand
# --------------------------------------------------------------------------------------------------------
MEMBER_SCORES = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, -1.0], [2.0, 3.0, 2.0]])  # (k=3 members, B=3)


def test_mean_and_worst_by_hand():
    torch.testing.assert_close(combine_scores(MEMBER_SCORES, "mean"), torch.tensor([2.0, 1.0, 1.0]))
    torch.testing.assert_close(combine_scores(MEMBER_SCORES, "worst"), torch.tensor([1.0, 0.0, -1.0]))


def test_uwo_is_mean_less_lambda_times_the_population_variance():
    # Column 0: 1, 3, 2 -> mean 2, squared deviations 1, 1, 0 -> variance (1/k) * 2 = 2/3.
    # Column 1: 0, 0, 3 -> mean 1, deviations^2 1, 1, 4 -> 2.  Column 2: 2, -1, 2 -> mean 1, 1, 4, 1 -> 2.
    # (The sample variance, 1/(k-1), would give 1, 3, 3.)
    expected = torch.tensor([2.0 - 0.5 * 2 / 3, 1.0 - 0.5 * 2, 1.0 - 0.5 * 2])
    torch.testing.assert_close(combine_scores(MEMBER_SCORES, "uwo", uwo_lambda=0.5), expected)
    torch.testing.assert_close(combine_scores(MEMBER_SCORES, "uwo", uwo_lambda=0.0), MEMBER_SCORES.mean(0))
    one = MEMBER_SCORES[:1]  # one member: no disagreement, nothing subtracted
    torch.testing.assert_close(combine_scores(one, "uwo", uwo_lambda=3.0), one[0])


def test_unknown_combination_or_bad_lambda_is_refused():
    with pytest.raises(ValueError, match=r"unknown combine 'median'; valid: mean, worst, uwo"):
        combine_scores(MEMBER_SCORES, "median")
    with pytest.raises(ValueError, match=r"uwo_lambda must be a finite number >= 0"):
        RewardEnsemble([FunctionRewardModel(lambda p, r: [0.0] * len(r))], "uwo", uwo_lambda=-1.0)


def test_ensemble_of_plain_rewards_combines_their_scores():
    members = [
        FunctionRewardModel(lambda p, r: [float(len(x)) for x in r], name="chars"),
        FunctionRewardModel(lambda p, r: [float(len(x.split())) for x in r], name="words"),
    ]
    ensemble = RewardEnsemble(members, "worst")
    scores = ensemble.member_scores(PROMPTS, RESPONSES)
    assert scores.shape == (2, len(RESPONSES))
    torch.testing.assert_close(scores[1], torch.tensor([2.0, 4.0, 5.0, 8.0]))
    torch.testing.assert_close(ensemble.score(PROMPTS, RESPONSES), scores.min(0).values)
    with pytest.raises(TypeError, match=r"members \[0, 1\] are not RewardModels"):
        ensemble.save("unused")


# --------------------------------------------------------------------------------------------------------
# Training, saving, loading
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(core):
    return label_pairs(LabelConfig(num_pairs=48, seed=0), core=core, progress=False)[0]


@pytest.fixture(scope="module")
def ensemble(labelled, tmp_path_factory):
    """Three members on 48 pairs, one epoch: each reads pi_ref's log-probs (the default head)."""
    run_dir = tmp_path_factory.mktemp("ensemble_run")
    config = RewardTrainConfig(
        epochs=1, batch_size=16, eval_fraction=0.25, normalise_samples=64, seed=0,
        ensemble_size=3, ensemble_combine="uwo", uwo_lambda=0.5,
    )  # fmt: skip
    model, metrics = train_reward_model(labelled, config, run_dir=run_dir, progress=False)
    return model, metrics, run_dir


def test_training_builds_k_members_with_different_seeds_on_one_split(ensemble):
    model, metrics, run_dir = ensemble
    assert isinstance(model, RewardEnsemble) and len(model) == 3
    assert (model.combine, model.uwo_lambda) == ("uwo", 0.5)
    heads = [m.head.weight.detach() for m in model.members]
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])
    # One frozen LM (pi_ref's weights) shared by all three, not three copies.
    assert model.members[0].reference is model.members[1].reference is model.members[2].reference
    assert metrics["num_train"] + metrics["num_eval"] == 48 and metrics["num_eval"] == 12
    assert [m["num_eval"] for m in metrics["members"]] == [12, 12, 12]  # the same held-out pairs
    assert metrics["eval_member_std"] > 0 and 0 <= metrics["eval_accuracy"] <= 1
    for i in range(3):
        assert (run_dir / f"member_{i}" / "metrics.csv").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["ensemble_size"] == 3
    # Each member is normalised (its own shift and scale) on one sample of pi_ref's responses.
    assert len({m.shift for m in model.members}) == 3 and all(m.scale > 0 for m in model.members)


def test_save_load_round_trip_gives_identical_scores(ensemble, tmp_path):
    model = ensemble[0]
    path = model.save(tmp_path / "ens")
    meta = json.loads((path / "ensemble.json").read_text())
    assert meta["members"] == ["member_0", "member_1", "member_2"]
    assert (meta["combine"], meta["uwo_lambda"]) == ("uwo", 0.5)
    files = {f.suffix for f in path.rglob("*") if f.is_file()}
    assert ".safetensors" in files and not files & {".bin", ".pt", ".pkl", ".pth"}
    loaded = load_reward_model(path)
    assert isinstance(loaded, RewardEnsemble) and (loaded.combine, loaded.uwo_lambda) == ("uwo", 0.5)
    assert torch.equal(loaded.score(PROMPTS, RESPONSES), model.score(PROMPTS, RESPONSES))
    assert torch.equal(loaded.member_scores(PROMPTS, RESPONSES), model.member_scores(PROMPTS, RESPONSES))
    expected = combine_scores(model.member_scores(PROMPTS, RESPONSES), "uwo", 0.5)
    torch.testing.assert_close(loaded.score(PROMPTS, RESPONSES), expected)


def test_env_scores_with_an_ensemble_folder(ensemble, tmp_path):
    model = ensemble[0]
    path = str(model.save(tmp_path / "ens"))
    env = gym.make("text_env/TextGen-v0", reward_model=path, max_new_tokens=6)
    env.reset(seed=0)
    env.action_space.seed(0)
    terminated = False
    while not terminated:
        _, _, terminated, _, info = env.step(env.action_space.sample())
    expected = model.score([info["prompt"]], [info["response"]]).item()
    assert info["rm_score"] == pytest.approx(expected, abs=1e-4)
    envs = text_env.TextGenVectorEnv(num_envs=8, reward_model=path, max_new_tokens=8)
    batch = text_env.rollout(envs, seed=0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        batch.rm_scores, model.score(batch.prompts, batch.responses), atol=1e-4, rtol=0
    )


def test_env_recombines_a_saved_ensemble_and_refuses_a_single_model(ensemble, tmp_path):
    """`reward_combine` re-reads one trained ensemble as mean, worst or uwo: the env's rm_score is that
    combination of the members' scores, by hand; a single model has no members and is refused."""
    model = ensemble[0]
    path = str(model.save(tmp_path / "ens"))
    for combine, lam in (("worst", None), ("uwo", 3.0), ("mean", None)):
        envs = text_env.TextGenVectorEnv(
            num_envs=8, reward_model=path, reward_combine=combine, reward_uwo_lambda=lam, max_new_tokens=8
        )
        assert envs.unwrapped.core.reward_model.combine == combine
        batch = text_env.rollout(envs, seed=0, generator=torch.Generator().manual_seed(0))
        members = model.member_scores(batch.prompts, batch.responses)
        expected = combine_scores(members, combine, model.uwo_lambda if lam is None else lam)
        torch.testing.assert_close(batch.rm_scores, expected, atol=1e-4, rtol=0)
    assert model.combine == "uwo"  # the saved ensemble itself is not changed
    with pytest.raises(ValueError, match="reward_combine='worst'.*need an ensemble reward_model"):
        text_env.TextGenVectorEnv(
            num_envs=2, reward_model=str(model.members[0].save(tmp_path / "one")), reward_combine="worst"
        )
    with pytest.raises(ConfigError, match="reward_combine"):
        load_config(EnvConfig, None, ["reward_combine=min"])


def test_ensemble_reading_pi_refs_logprobs_shares_the_reference_forward(core, ensemble):
    """Every member's frozen LM is pi_ref: the env's reference forward serves all of them (no member runs its
    own), with the scores of the text path; with the option off, the text path gives the same."""
    model = ensemble[0]
    shared = EnvCore(reference=core.reference, tokenizer=core.tokenizer, reward_model=model, max_new_tokens=6)
    assert shared.judge.shared_reward_model() is model
    calls = []
    hook = model.members[0].reference.register_forward_hook(lambda *_: calls.append(1))
    batch = text_env.rollout(
        text_env.TextGenVectorEnv(num_envs=12, core=shared), generator=torch.Generator().manual_seed(3)
    )
    hook.remove()
    assert calls == [], "a member's own frozen LM ran: nothing was shared"
    torch.testing.assert_close(
        batch.rm_scores, model.score(batch.prompts, batch.responses), atol=1e-4, rtol=0
    )
    text_path = EnvCore(
        reference=core.reference, tokenizer=core.tokenizer, reward_model=model, max_new_tokens=6,
        speed=SpeedOptions(share_reference_forward=False),
    )  # fmt: skip
    scores = text_path.judge.score(
        batch.input_ids.numpy(), batch.attention_mask.numpy(), batch.response_start,
        batch.prompts, batch.responses,
    )  # fmt: skip
    torch.testing.assert_close(torch.as_tensor(scores["rm_score"]), batch.rm_scores, atol=1e-4, rtol=0)


def test_a_member_with_another_frozen_lm_turns_sharing_off(core, ensemble, tmp_path):
    loaded = load_reward_model(ensemble[0].save(tmp_path / "ens"))
    loaded.members[2].reference = type(loaded.members[2].reference)(loaded.members[2].reference.config)
    env_core = EnvCore(reference=core.reference, tokenizer=core.tokenizer, reward_model=loaded)
    assert env_core.judge.shared_reward_model() is None


# --------------------------------------------------------------------------------------------------------
# train-rm and the config
# --------------------------------------------------------------------------------------------------------
def _train_rm(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-gym")
    add_train_rm_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-rm", "--no-progress", *argv])
    return args.handler(args)


def test_train_rm_command_trains_and_saves_an_ensemble(labelled, tmp_path):
    pairs = write_pairs(labelled[:32], tmp_path / "pairs.jsonl")
    run_dir = tmp_path / "run"
    overrides = ["epochs=1", "normalise_samples=32", "body=tiny", "ensemble_size=2", "ensemble_combine=worst"]
    assert _train_rm(["--run-dir", str(run_dir), f"pairs={pairs}", *overrides]) == 0
    model = load_reward_model(run_dir / "reward_model")
    assert isinstance(model, RewardEnsemble) and model.combine == "worst" and len(model) == 2
    member_scores = model.member_scores(PROMPTS, RESPONSES)
    torch.testing.assert_close(model.score(PROMPTS, RESPONSES), member_scores.min(0).values)
    assert (run_dir / "member_1" / "metrics.csv").is_file() and (run_dir / "metrics.json").is_file()


def test_config_refuses_an_unknown_combination_and_a_negative_lambda():
    with pytest.raises(ConfigError, match=r"ensemble_combine.*'mean'.*'worst'.*'uwo'"):
        load_config(RewardTrainConfig, None, ["ensemble_combine=median"])
    with pytest.raises(ConfigError, match=r"RewardTrainConfig\.uwo_lambda = -1\.0 .*: must be >= 0"):
        load_config(RewardTrainConfig, None, ["uwo_lambda=-1"])
    with pytest.raises(ConfigError, match=r"RewardTrainConfig\.ensemble_size = 0 .*: must be >= 1"):
        load_config(RewardTrainConfig, None, ["ensemble_size=0"])


# --------------------------------------------------------------------------------------------------------
# ensemble.json errors: each names the file and the key
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        ("{not json", ValueError, r"ensemble\.json is not valid JSON"),
        ("[1, 2]", ValueError, r"ensemble\.json holds a list, not an object"),
        ('{"combine": "mean"}', ValueError, r"ensemble\.json: missing key 'members'"),
        ('{"members": ["a"]}', ValueError, r"ensemble\.json: missing key 'combine'"),
        ('{"members": ["a"], "combine": "median"}', ValueError, r"key 'combine' is 'median'; valid"),
        ('{"members": ["a"], "combine": "uwo"}', ValueError, r"missing key 'uwo_lambda'"),
        ('{"members": ["a"], "combine": "uwo", "uwo_lambda": -1}', ValueError, r"key 'uwo_lambda' must be"),
        ('{"members": [], "combine": "mean"}', ValueError, r"key 'members' must be a non-empty list"),
        ('{"members": ["../a"], "combine": "mean"}', ValueError, r"members\[0\] '\.\./a' must be a folder"),
        ('{"members": ["a", "gone"], "combine": "mean"}', FileNotFoundError, r"members\[1\] names .*gone"),
        ('{"members": ["a"], "combine": "mean", "format_version": 9}', ValueError, r"key 'format_version'"),
    ],
)
def test_bad_ensemble_json_names_the_file_and_the_key(tmp_path, content, error, message):
    (tmp_path / "a").mkdir()
    (tmp_path / "ensemble.json").write_text(content)
    with pytest.raises(error, match=message) as info:
        load_reward_model(tmp_path)
    assert str(tmp_path / "ensemble.json") in str(info.value)


def test_a_member_folder_without_a_model_is_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "ensemble.json").write_text('{"members": ["a"], "combine": "mean"}')
    with pytest.raises(FileNotFoundError, match=r"ensemble\.json: members\[0\] 'a': no reward model at"):
        load_reward_model(tmp_path)


def test_train_runs_an_agent_against_an_ensemble_folder(ensemble, tmp_path):
    """`env.reward_model=FOLDER` of an ensemble, as `rlhf-gym train` and every sweep cell build their env."""
    from rlhf_gym.train import train

    path = ensemble[0].save(tmp_path / "ens")
    overrides = [
        f"env.reward_model={path}", "env.num_envs=8", "env.max_new_tokens=6",
        "iterations=1", "samples_per_prompt=2", "prompts_per_iteration=4",
    ]  # fmt: skip
    history = train("best_of_n", tmp_path / "run", overrides=overrides, progress=False)
    assert history and all(math.isfinite(row["rm_score"]) for row in history)
