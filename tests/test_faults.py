"""Issue 16, a hostile tester's findings: bad files and bad rewards fail at once, in one line that names them.

Every command given a truncated safetensors model or reward model, a pickled one, or a missing file exits 2
with one line on stderr naming the file, and no traceback (`--debug` shows it); a reward that returns NaN or
inf for some rows stops best-of-n and RAFT before they select or train, naming the reward and the rows, and
nothing is saved.
"""

from __future__ import annotations

import math
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from agents.base import check_rank_scores
from rlhf_base.best_of_n import best_of_n_kl_estimate, best_of_n_kl_exact, best_of_n_probs
from rlhf_gym import cli
from text_env.tasks.reviews import build_tokenizer

TINY_ENV = ["env.num_envs=4", "env.max_new_tokens=4"]


@pytest.fixture(autouse=True)
def _no_loading_bars():
    """transformers' own "Loading weights" bars are progress, not errors: off, so stderr is the error alone."""
    from transformers.utils import logging

    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    yield
    if was_on:
        logging.enable_progress_bar()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    """A tiny policy folder and a reward model folder, each with its weights cut in half, and a pickled one."""
    from reward_models import build_reward_model

    root = tmp_path_factory.mktemp("bad")
    tok = build_tokenizer()
    torch.manual_seed(0)
    policy = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2))
    policy.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    build_reward_model(logprob_features=False).save(root / "reward_model")
    for name in ("policy", "reward_model"):
        weights = root / name / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    pickled = shutil.copytree(root / "policy", root / "pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"PK\x03\x04")  # never opened
    return {
        "policy": root / "policy",
        "policy_weights": root / "policy" / "model.safetensors",
        "reward_model": root / "reward_model",
        "reward_model_weights": root / "reward_model" / "model.safetensors",
        "pickled": pickled,
    }


def _one_line(capsys, command: str, *named: str) -> str:
    """The command's stderr: exactly one line, `rlhf-gym COMMAND: error: ...`, naming each of `named`."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"rlhf-gym {command}: error: ") and "Traceback" not in err, err
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------------------
# Bad files: every command, one line naming the file, exit 2
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, file",
    [
        (["train", "--agent", "reinforce", "env.model={policy}"], "policy_weights"),
        (["train", "--agent", "best_of_n", "env.reward_model={reward_model}"], "reward_model_weights"),
        (["train", "--agent", "raft", "env.model={pickled}"], "pickled"),
        (["sft", "model={policy}"], "policy_weights"),
        (["rollout", "reward_model={reward_model}"], "reward_model_weights"),
        (["rollout", "model={pickled}"], "pickled"),
        (["label", "model={policy}"], "policy_weights"),
        (["sweep", "agents=[reinforce]", "seeds=[0]", "workers=1", "env.model=null",
          "env.reward_model={reward_model}"],
         "reward_model_weights"),
        (["demo", "sft.model={policy}"], "policy_weights"),
    ],
)  # fmt: skip
def test_a_truncated_or_pickled_model_is_one_line_naming_the_file(
    bad_files, tmp_path, monkeypatch, capsys, argv, file
):
    monkeypatch.chdir(tmp_path)  # whatever a command writes before it fails stays here
    argv = [a.format(**bad_files) for a in argv]
    assert cli.main([*argv, f"runs_root={tmp_path}"] if argv[0] in ("sweep", "demo") else argv) == 2
    line = _one_line(capsys, argv[0], str(bad_files[file]))
    assert ("is a pickle weights file" if file == "pickled" else "is not a readable safetensors file") in line


@pytest.mark.parametrize(
    "argv, missing",
    [
        (["train", "--agent", "ppo", "env.prompts={tmp}/prompts.jsonl"], "prompts.jsonl"),
        (["sft", "demonstrations={tmp}/demos.jsonl"], "demos.jsonl"),
        (["rollout", "prompts={tmp}/prompts.jsonl"], "prompts.jsonl"),
        (["sweep", "env.model=null", "env.reward_model={tmp}/rm", "runs_root={tmp}"], "rm"),
        (["demo", "sft.demonstrations={tmp}/demos.jsonl", "runs_root={tmp}"], "demos.jsonl"),
        (["train-rm", "pairs={tmp}/pairs.jsonl"], "pairs.jsonl"),
    ],
)
def test_a_missing_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys, argv, missing):
    monkeypatch.chdir(tmp_path)
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == 2
    _one_line(capsys, argv[0], f"{tmp_path}/{missing}")


def test_debug_shows_the_traceback_of_a_bad_file(bad_files, capsys):
    assert cli.main(["--debug", "rollout", f"reward_model={bad_files['reward_model']}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and f"DataError: {bad_files['reward_model_weights']} is not a" in err


def test_resuming_from_a_truncated_checkpoint_is_one_line_naming_the_file(tmp_path, capsys):
    run = ["train", "--agent", "reinforce", "--run-dir", str(tmp_path), "--no-progress"]
    assert cli.main([*run, "--checkpoint-every", "1", "iterations=1", *TINY_ENV]) == 0
    tensors = tmp_path / "checkpoints" / "iteration-000001" / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-7])
    capsys.readouterr()
    assert cli.main([*run, "--resume", "iterations=2"]) == 2
    _one_line(capsys, "train", f"cannot read the checkpoint in {tensors.parent}: {tensors} is not a readable")


def test_a_saved_reward_model_with_scale_0_is_refused_at_load_by_the_env(bad_files, tmp_path, capsys):
    import json

    from reward_models import build_reward_model

    build_reward_model(logprob_features=False).save(tmp_path / "rm")
    meta = tmp_path / "rm" / "reward_model.json"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"scale": 0}))
    capsys.readouterr()
    assert cli.main(["rollout", f"reward_model={tmp_path / 'rm'}", "--num-envs", "2"]) == 2
    _one_line(capsys, "rollout", f"{meta}: key 'scale' must be > 0, got 0")


# --------------------------------------------------------------------------------------------------------
# Non-finite rewards: refused before anything is selected, trained or saved
# --------------------------------------------------------------------------------------------------------
@pytest.fixture()
def nan_reward(tmp_path, monkeypatch) -> str:
    """A reward plugin returning NaN for row 1 and inf for row 2 of every batch."""
    (tmp_path / "bad_reward.py").write_text(
        textwrap.dedent(
            """
            import math

            def nan_rows(prompts, responses):
                return [math.nan if i == 1 else math.inf if i == 2 else 0.0 for i in range(len(responses))]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "bad_reward:nan_rows"


@pytest.mark.parametrize(
    "agent, settings",
    [
        ("best_of_n", ["samples_per_prompt=2", "prompts_per_iteration=2"]),
        ("raft", ["samples_per_prompt=2", "prompts_per_iteration=2", "batch_size=2"]),
    ],
)
def test_a_reward_with_nan_rows_stops_best_of_n_and_raft_naming_the_reward_and_rows(
    nan_reward, tmp_path, capsys, agent, settings
):
    run_dir = tmp_path / agent
    argv = ["train", "--agent", agent, "--run-dir", str(run_dir), "--no-progress", "iterations=1"]
    assert cli.main([*argv, *TINY_ENV, f"env.reward_model={nan_reward}", *settings]) == 2
    line = _one_line(
        capsys, "train", f"reward_model {nan_reward}", "non-finite score(s)", "row 1: nan", "row 2: inf"
    )
    assert line.endswith("a reward must be a finite number per response")
    written = {p.name for p in run_dir.iterdir()} if run_dir.exists() else set()
    assert not written & {"policy", "summary.json", "checkpoints"}, f"saved despite the NaN reward: {written}"


@pytest.mark.parametrize("agent", ["best_of_n", "raft", "online_dpo"])
def test_agents_refuse_nan_scores_even_when_the_env_lets_one_through(monkeypatch, agent):
    """The second guard (`agents.base.check_rank_scores`): were the env's check gone, best-of-n's argmax would
    pick the NaN row, RAFT would keep it and train on it, online DPO would rank a pair by it."""
    import text_env.judge
    from agents.registry import get_agent_class, resolve_config
    from text_env.config import EnvConfig

    monkeypatch.setattr(
        text_env.judge, "check_scores", lambda values, *args: np.asarray(values, dtype=np.float32)
    )
    reward = lambda prompts, responses: [math.nan if i == 1 else 0.0 for i in range(len(responses))]  # noqa: E731
    envs = EnvConfig(num_envs=4, max_new_tokens=4).make()
    envs.core.judge.reward_fn = reward
    settings = {"best_of_n": ["samples_per_prompt=2", "prompts_per_iteration=2"], "online_dpo": []}
    agent_cls = get_agent_class(agent)
    config = resolve_config(
        agent_cls,
        None,
        settings.get(agent, ["samples_per_prompt=2", "prompts_per_iteration=2", "batch_size=2"]),
    )
    learner = agent_cls(envs, config)
    before = [p.detach().clone() for p in envs.policy.parameters()]
    with pytest.raises(ValueError, match=r"non-finite score\(s\) of 4 \(row 1: nan"):
        learner.learn(iterations=1)
    assert all(torch.equal(a, b) for a, b in zip(before, envs.policy.parameters(), strict=True))


def test_check_rank_scores_names_the_reward_the_use_and_the_rows():
    with pytest.raises(
        ValueError, match=r"^the reward model \(RAFT ranks by it\) returned 2 non-finite .*row 0: nan"
    ):
        check_rank_scores(None, torch.tensor([math.nan, 1.0, math.inf]), ["a", "b", "c"], "RAFT ranks by it")
    check_rank_scores(None, torch.tensor([0.0, 1.0]), ["a", "b"], "fine")


def test_best_of_n_maths_refuses_nan_rewards_naming_rows():
    with pytest.raises(ValueError, match=r"rewards must be finite numbers; 1 of 3 are not \(row 1: nan\)"):
        best_of_n_probs([0.2, 0.3, 0.5], [1.0, math.nan, 0.0], 4)
    with pytest.raises(ValueError, match=r"rewards must be finite numbers; 1 of 2 are not \(row 0: inf\)"):
        best_of_n_kl_exact([0.5, 0.5], [math.inf, 0.0], 4)
    with pytest.raises(ValueError, match=r"rewards must be finite.*row 2: nan"):
        best_of_n_kl_estimate([-3.0, -4.0, -5.0], [0.0, 1.0, math.nan], 4)
    with pytest.raises(ValueError, match=r"logprobs .* must be finite.*row 0: nan"):
        best_of_n_kl_estimate([math.nan, -4.0], [0.0, 1.0], 4)
    assert best_of_n_kl_estimate([-math.inf, -4.0], [0.0, 1.0], 4) >= 0  # probability 0 is allowed


def test_the_labellers_judge_returning_nan_is_named_with_its_rows():
    from rlhf_gym.label import LabelConfig, label_pairs

    def judge(prompts, responses):
        return [math.nan if i == 3 else 0.0 for i in range(len(responses))]

    config = LabelConfig(num_pairs=2, batch_size=2, max_new_tokens=3)
    with pytest.raises(
        ValueError, match=r"^the labeller's judge judge returned 1 non-finite score\(s\) of 4 \(row 3: nan"
    ):
        label_pairs(config, judge=judge, progress=False)
