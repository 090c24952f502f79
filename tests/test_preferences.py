"""Preference data and the simulated labeller: loading pairs and its errors, Bradley-Terry labels by hand,
the labels' ceiling, and the `label` command end to end."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from reward_models.data import load_pairs, write_pairs
from rlhf_base.io import DataError
from rlhf_gym.cli import add_label_command, main
from rlhf_gym.label import (
    LabelConfig,
    label_pairs,
    preference_probability,
    simulate_labels,
)
from text_env.tasks.reviews import gold_reward

PAIRS = [
    {"prompt": "the plot was", "chosen": "great .", "rejected": "bad ."},
    {"prompt": "i", "chosen": "loved the film .", "rejected": "hated the film .", "source": "hand"},
]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------
# Loading and writing pairs
# --------------------------------------------------------------------------------------------------------
def test_pairs_round_trip_through_jsonl_and_keep_extra_fields(tmp_path):
    path = write_pairs(PAIRS, tmp_path / "pairs.jsonl")
    assert load_pairs(path) == PAIRS
    assert len(path.read_text().splitlines()) == 2


def test_pairs_from_csv_and_datasets(tmp_path):
    import datasets

    csv_path = _write(tmp_path / "pairs.csv", "prompt,chosen,rejected\np,a,b\nq,c,d\n")
    assert [p["chosen"] for p in load_pairs(csv_path)] == ["a", "c"]
    dataset = datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in PAIRS])
    assert [p["rejected"] for p in load_pairs(dataset)] == ["bad .", "hated the film ."]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = _write(tmp_path / "pairs.jsonl", json.dumps(PAIRS[0]) + '\n{"prompt": "x", "chosen": \n')
    with pytest.raises(DataError, match=r"pairs\.jsonl line 2: malformed JSON"):
        load_pairs(path)


def test_missing_field_is_named(tmp_path):
    path = _write(tmp_path / "pairs.jsonl", json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match=r"line 1: .*missing required field 'rejected'"):
        load_pairs(path)


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_pairs(_write(tmp_path / "pairs.jsonl", "\n"))


def test_identical_chosen_and_rejected_is_an_error_naming_line_and_index(tmp_path):
    same = {"prompt": "p", "chosen": "same .", "rejected": "same ."}
    # A blank line before the bad record: the reported line is the file's line, not the record's index.
    path = _write(tmp_path / "pairs.jsonl", json.dumps(PAIRS[0]) + "\n\n" + json.dumps(same) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl line 3: .*identical chosen and rejected"):
        load_pairs(path)
    with pytest.raises(DataError, match=r"record 2: .*identical"):
        load_pairs([PAIRS[0], same])
    with pytest.raises(DataError, match="identical"):
        write_pairs([same], tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


# --------------------------------------------------------------------------------------------------------
# The labeller's maths
# --------------------------------------------------------------------------------------------------------
class _FixedDraws:
    """A stand-in for numpy's Generator whose uniform draws are given, so labels can be computed by hand."""

    def __init__(self, draws):
        self.draws = np.asarray(draws, dtype=np.float64)

    def random(self, n):
        assert n == len(self.draws)
        return self.draws


def test_preference_probability_is_the_bradley_terry_sigmoid():
    p = preference_probability(np.array([1.0, 0.0, 0.3]), np.array([0.0, 1.0, 0.3]), tau=0.5)
    assert p == pytest.approx([1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2)), 0.5])
    assert preference_probability(np.array([2.0, 0.0, 1.0]), np.array([1.0, 1.0, 1.0]), 0.0).tolist() == [
        1.0,
        0.0,
        0.5,
    ]
    assert preference_probability(np.array([1e4]), np.array([-1e4]), 1e-3)[0] == 1.0  # no overflow


def test_ceiling_by_hand_with_injected_gold_values():
    gold_a, gold_b = np.array([1.0, 0.0, 0.5, 0.2]), np.array([0.0, 1.0, 0.5, 0.1])
    # tau = 1: p = sigmoid([1, -1, 0, 0.1]) = [0.731, 0.269, 0.5, 0.525]; draws below p prefer a.
    a_preferred, report = simulate_labels(gold_a, gold_b, 1.0, _FixedDraws([0.1, 0.1, 0.3, 0.9]))
    assert a_preferred.tolist() == [True, True, True, False]
    # Decided pairs 0, 1, 3: pair 0 agrees with the gold order, pairs 1 and 3 do not; pair 2 is a tie.
    assert report["ceiling"] == pytest.approx(1 / 3)
    sig = 1 / (1 + math.exp(-1))
    assert report["expected_ceiling"] == pytest.approx((sig + sig + 1 / (1 + math.exp(-0.1))) / 3)
    assert report["num_ties"] == 1


def test_tau_to_zero_gives_ceiling_one_and_large_tau_coin_flips():
    rng = np.random.default_rng(0)
    gold_a, gold_b = rng.normal(size=2000), rng.normal(size=2000)
    for tau in (0.0, 1e-9):
        labels, report = simulate_labels(gold_a, gold_b, tau, np.random.default_rng(1))
        assert report["ceiling"] == 1.0 and report["expected_ceiling"] == 1.0
        assert (labels == (gold_a > gold_b)).all()
    _, noisy = simulate_labels(gold_a, gold_b, 1e3, np.random.default_rng(1))
    assert abs(noisy["ceiling"] - 0.5) < 0.05
    _, mid = simulate_labels(gold_a, gold_b, 0.5, np.random.default_rng(1))
    assert abs(mid["ceiling"] - mid["expected_ceiling"]) < 0.03  # measured ceiling matches its expectation


# --------------------------------------------------------------------------------------------------------
# Labelling through the env
# --------------------------------------------------------------------------------------------------------
def test_label_pairs_through_the_env(core):
    pairs, report = label_pairs(LabelConfig(num_pairs=48, batch_size=32, seed=3), core=core, progress=False)
    assert len(pairs) == 48 and report["num_pairs"] == 48
    assert all(p["chosen"] != p["rejected"] and p["prompt"] in core.task.prompts for p in pairs)
    # The stored gold values are the gold reward of the stored responses, and the reported ceiling is
    # the share of labels that agree with them.
    prompts = [p["prompt"] for p in pairs]
    np.testing.assert_allclose(
        gold_reward(prompts, [p["chosen"] for p in pairs]), [p["gold_chosen"] for p in pairs], atol=1e-6
    )
    np.testing.assert_allclose(
        gold_reward(prompts, [p["rejected"] for p in pairs]), [p["gold_rejected"] for p in pairs], atol=1e-6
    )
    d = np.array([p["gold_chosen"] - p["gold_rejected"] for p in pairs])
    assert report["ceiling"] == pytest.approx((d[d != 0] > 0).mean())
    again, _ = label_pairs(LabelConfig(num_pairs=48, batch_size=32, seed=3), core=core, progress=False)
    assert again == pairs  # seeded


def test_noiseless_labeller_always_prefers_the_gold_better_response(core):
    pairs, report = label_pairs(LabelConfig(num_pairs=32, tau=0.0, seed=1), core=core, progress=False)
    assert all(p["gold_chosen"] >= p["gold_rejected"] for p in pairs)
    assert report["ceiling"] == 1.0


def test_identical_responses_are_resampled_and_a_deterministic_policy_is_refused(core):
    # Near-greedy sampling makes both responses to a prompt the same: none can be kept, and the labeller
    # says why instead of looping for ever.
    config = LabelConfig(num_pairs=4, batch_size=4, temperature=1e-4, max_new_tokens=8)
    with pytest.raises(RuntimeError, match="deterministic"):
        label_pairs(config, core=core, progress=False)


def test_a_judge_replaces_the_gold_reward(core):
    def length(prompts, responses):
        return [len(r.split()) for r in responses]

    pairs, report = label_pairs(LabelConfig(num_pairs=16, tau=0.0), core=core, judge=length, progress=False)
    assert all(p["gold_chosen"] == len(p["chosen"].split()) for p in pairs)
    assert all(len(p["chosen"].split()) >= len(p["rejected"].split()) for p in pairs)
    assert report["judge"] == "length" and report["ceiling"] == 1.0


def _label_parser():
    parser = argparse.ArgumentParser(prog="rlhf-gym")
    add_label_command(parser.add_subparsers(dest="command"))
    return parser


def test_label_command_writes_pairs_and_report_with_a_saved_policy(tmp_path, core):
    policy_dir = tmp_path / "policy"
    core.reference.save_pretrained(policy_dir)
    core.tokenizer.save_pretrained(policy_dir)
    run_dir = tmp_path / "run"
    argv = ["label", "--run-dir", str(run_dir), "--no-progress", "num_pairs=12", "batch_size=12"]
    args = _label_parser().parse_args([*argv, "max_new_tokens=8", f"model={policy_dir}"])
    assert args.handler(args) == 0
    pairs = load_pairs(run_dir / "pairs.jsonl")
    report = json.loads((run_dir / "label_report.json").read_text())
    assert len(pairs) == 12 and report["num_pairs"] == 12 and report["policy"] == str(policy_dir)
    assert 0.0 <= report["ceiling"] <= 1.0
    assert "num_pairs: 12" in (run_dir / "label_config.yaml").read_text()


def test_label_command_rejects_an_unknown_config_key(tmp_path, capsys):
    assert main(["label", "--run-dir", str(tmp_path), "num_pair=10"]) == 2  # errors reach the user via main
    err = capsys.readouterr().err
    assert "unknown key 'num_pair'" in err and "did you mean 'num_pairs'" in err and "tau" in err
    assert not (tmp_path / "pairs.jsonl").exists()
