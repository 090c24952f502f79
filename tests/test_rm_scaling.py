"""The reward model's size (`body`) and data (`num_pairs`), and `rlhf-gym rm-scaling`, which trains a grid of
both: Spearman's rho by hand, the CSV's columns, the ceiling, the table and the plot, and resuming."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from transformers import GPT2Model, LlamaConfig, LlamaForCausalLM

from reward_models import RewardTrainConfig, build_reward_model, load_reward_model, train_reward_model
from reward_models.loading import BODY_SIZES, body_shape
from rlhf_base.config import ConfigError, load_config
from rlhf_gym.cli import main
from rlhf_gym.label import LabelConfig, label_pairs
from rlhf_gym.rm_scaling import COLUMNS, RMScalingConfig, rank_correlation
from text_env.tasks.reviews import build_tokenizer

PROMPTS = ["the plot was", "i", "overall , the film", "this movie"]
RESPONSES = ["great .", "hated the film .", "was not very good .", "is about a dog . i loved it"]


# --------------------------------------------------------------------------------------------------------
# Body sizes
# --------------------------------------------------------------------------------------------------------
def test_body_shapes_by_name_and_by_layers_x_width():
    assert body_shape(None) is None and body_shape("pretrained") is None
    assert body_shape("tiny") == BODY_SIZES["tiny"] == (2, 64, 2)
    assert body_shape("6x192") == (6, 192, 6)  # one head per 32 dimensions by default
    assert body_shape("2x64x4") == (2, 64, 4)
    for bad in ("huge", "0x64", "2x60x7", "2x"):
        with pytest.raises(ValueError, match=r"body '.*'"):
            body_shape(bad)
    with pytest.raises(ConfigError, match=r"body 'huge' is not a body size; valid: 'pretrained'.*'tiny'"):
        load_config(RewardTrainConfig, None, ["body=huge"])


def test_a_sized_body_is_fresh_reads_pi_ref_and_round_trips(core, tmp_path):
    torch.manual_seed(0)
    model = build_reward_model(body="tiny")
    assert isinstance(model.body, GPT2Model)
    assert (model.body.config.n_layer, model.body.config.n_embd, model.body.config.n_head) == (2, 64, 2)
    assert model.max_length == core.reference.config.n_positions
    assert model.reads_logprobs_of(core.reference, core.tokenizer)  # the frozen LM is still pi_ref
    sizes = [sum(p.numel() for p in build_reward_model(body=b).parameters() if p.requires_grad)
             for b in ("tiny", "small", "base")]  # fmt: skip
    assert sizes[0] < sizes[1] < sizes[2]
    model.shift, model.scale = 0.2, 1.5
    loaded = load_reward_model(model.save(tmp_path / "rm"))
    assert loaded.body.config.n_layer == 2
    assert torch.equal(loaded.score(PROMPTS, RESPONSES), model.score(PROMPTS, RESPONSES))


@pytest.mark.parametrize("features", [True, None])
def test_a_sized_body_takes_a_hugging_face_backbones_vocabulary(features, tmp_path):
    """An HF causal LM as the backbone: a fresh GPT-2 body in its vocabulary; with log-prob features its
    frozen LM is that causal LM, without them (None: an HF backbone's default) only its tokenizer is used."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        )
    )  # fmt: skip
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    model = build_reward_model(str(tmp_path / "lm"), body="1x32", logprob_features=features)
    assert isinstance(model.body, GPT2Model) and model.body.config.vocab_size == len(tokenizer)
    assert model.max_length == 64 and model.logprob_features is bool(features)
    loaded = load_reward_model(model.save(tmp_path / "rm"))
    torch.testing.assert_close(loaded.score(PROMPTS, RESPONSES), model.score(PROMPTS, RESPONSES))


# --------------------------------------------------------------------------------------------------------
# Number of pairs
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(core):
    return label_pairs(LabelConfig(num_pairs=40, seed=0), core=core, progress=False)[0]


def test_num_pairs_takes_the_first_n(labelled):
    config = RewardTrainConfig(body="tiny", num_pairs=24, epochs=1, eval_fraction=0.25, normalise_samples=32)
    _, metrics = train_reward_model(labelled, config, progress=False)
    assert (metrics["num_train"], metrics["num_eval"]) == (18, 6)
    # The same first 24 pairs, given as such, train the same model.
    _, same = train_reward_model(labelled[:24], RewardTrainConfig(**{**vars(config), "num_pairs": None}),
                                 progress=False)  # fmt: skip
    assert same["eval_loss"] == pytest.approx(metrics["eval_loss"])
    with pytest.raises(ValueError, match=r"num_pairs=41, but the preference pairs hold only 40"):
        train_reward_model(labelled, RewardTrainConfig(num_pairs=41), progress=False)


def test_given_eval_pairs_are_held_out_and_every_other_pair_trains(labelled):
    config = RewardTrainConfig(body="tiny", epochs=1, normalise_samples=32)
    _, metrics = train_reward_model(labelled[:30], config, eval_pairs=labelled[30:], progress=False)
    assert (metrics["num_train"], metrics["num_eval"]) == (30, 10)


# --------------------------------------------------------------------------------------------------------
# rm-scaling
# --------------------------------------------------------------------------------------------------------
def test_rank_correlation_by_hand():
    assert rank_correlation([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    # Ties share their mean rank: x ranks 0.5, 0.5, 2 against 0, 1, 2 -> 1.5 / sqrt(1.5 * 2).
    assert rank_correlation([5, 5, 7], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(3.0))
    assert rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))


def test_config_checks_the_grid_up_front():
    with pytest.raises(ConfigError, match=r"body 'huge'"):
        load_config(RMScalingConfig, None, ["bodies=[tiny,huge]"])
    with pytest.raises(ConfigError, match=r"pair_counts"):
        load_config(RMScalingConfig, None, ["pair_counts=[]"])
    assert RMScalingConfig(pair_counts=[10, 40], eval_pairs=8).pairs_needed == 48


def test_rm_scaling_writes_csv_table_and_plot_and_resumes(tmp_path, capsys):
    run_dir = tmp_path / "scaling"
    argv = [
        "rm-scaling", "--run-dir", str(run_dir), "--no-progress",
        "pair_counts=[16,32]", "bodies=[tiny]", "eval_pairs=24", "label.batch_size=64",
        "reward_model.epochs=1", "reward_model.batch_size=16", "reward_model.normalise_samples=32",
    ]  # fmt: skip
    assert main(argv) == 0
    with (run_dir / "rm_scaling.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == COLUMNS
    assert [(r["body"], int(r["num_pairs"])) for r in rows] == [("tiny", 16), ("tiny", 32)]
    ceilings = {float(r["label_ceiling"]) for r in rows}  # one held-out set: one ceiling
    assert len(ceilings) == 1 and 0.5 <= ceilings.pop() <= 1
    for r in rows:
        assert 0 <= float(r["accuracy_decided"]) <= 1 and -1 <= float(r["spearman"]) <= 1
    summary = json.loads((run_dir / "rm_scaling.json").read_text())
    assert summary["labelled_pairs"] == 32 + 24 and summary["eval_pairs"] == 24
    assert 0.5 <= summary["ceiling_all"] <= 1
    table = (run_dir / "rm_scaling.md").read_text()
    assert "labeller ceiling on them" in table and "| tiny (" in table and "Spearman" in table
    assert (run_dir / "rm_scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_reward_model(run_dir / "models" / "tiny-32").score(PROMPTS, RESPONSES).shape == (4,)
    assert "labeller ceiling" in capsys.readouterr().out

    # The same config again: the labelled pairs are reused and no cell is trained twice.
    pairs_before = (run_dir / "pairs.jsonl").stat().st_mtime_ns
    assert main(argv) == 0
    assert (run_dir / "pairs.jsonl").stat().st_mtime_ns == pairs_before
    assert len((run_dir / "rm_scaling.csv").read_text().splitlines()) == 3
