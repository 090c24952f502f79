"""Reward models: the Bradley-Terry loss by hand, training that learns, normalisation, safetensors round
trips, the env loading a saved model by path, adapters, and the `train-rm` command with its errors."""

from __future__ import annotations

import argparse
import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

import text_env
from reward_models import (
    FunctionRewardModel,
    HFSequenceClassifierRewardModel,
    RewardModel,
    RewardTrainConfig,
    bradley_terry_loss,
    build_reward_model,
    evaluate_reward_model,
    load_reward_model,
    train_reward_model,
)
from reward_models.data import write_pairs
from reward_models.model import LOGPROB_FEATURE_SCALE, sequence_logprob_stats
from rlhf_base.config import ConfigError, load_config
from rlhf_gym.cli import add_train_rm_command, main
from rlhf_gym.label import LabelConfig, label_pairs
from text_env.tasks.reviews import build_tokenizer

PROMPTS = ["the plot was", "i", "overall , the film", "this movie"]
RESPONSES = ["great .", "hated the film .", "was not very good .", "is about a dog . i loved it"]


# --------------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------------
def test_bradley_terry_loss_matches_hand_computation():
    # -log sigmoid(2 - 0.5) = log(1 + e^-1.5) = 0.2014; with margin 1: log(1 + e^-0.5) = 0.4741.
    assert bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.5])).item() == pytest.approx(
        0.201413, abs=1e-6
    )
    assert bradley_terry_loss(
        torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([1.0])
    ).item() == pytest.approx(0.474077, abs=1e-6)
    # A batch is the mean of its pairs; equal rewards cost log 2.
    both = bradley_terry_loss(torch.tensor([2.0, 1.0]), torch.tensor([0.5, 1.0]))
    assert both.item() == pytest.approx((0.201413 + math.log(2)) / 2, abs=1e-6)


def test_bradley_terry_gradient_pushes_chosen_up_and_rejected_down():
    r_w = torch.tensor([2.0, -1.0], requires_grad=True)
    r_l = torch.tensor([0.5, 0.0], requires_grad=True)
    bradley_terry_loss(r_w, r_l).backward()
    # d/dr_w of -log sigmoid(r_w - r_l) = -sigmoid(r_l - r_w), divided by the batch size.
    expected = -torch.sigmoid(torch.tensor([-1.5, 1.0])) / 2
    torch.testing.assert_close(r_w.grad, expected)
    torch.testing.assert_close(r_l.grad, -expected)
    assert (r_w.grad < 0).all() and (r_l.grad > 0).all()


# --------------------------------------------------------------------------------------------------------
# The head with log-prob features
# --------------------------------------------------------------------------------------------------------
class _BigramLM(torch.nn.Module):
    """A stand-in causal LM whose next-token logits depend on the current token only: `table[token]`."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return argparse.Namespace(logits=self.table[input_ids])  # (B, T, V)


def test_sequence_logprob_stats_match_a_hand_computation():
    # Vocabulary of 3; log p(next | current) = log_softmax(table[current]).
    table = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    logp = torch.log_softmax(table, -1)
    input_ids = torch.tensor([[1, 2, 2, 0], [2, 1, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # row 2: one scored transition (2 -> 1)
    stats = sequence_logprob_stats(_BigramLM(table), input_ids, attention_mask)
    row1 = torch.stack([logp[1, 2], logp[2, 2], logp[2, 0]])
    row2 = logp[2, 1][None]
    expected = torch.tensor(
        [[row1.mean(), row1.min(), row1.sum()], [row2.mean(), row2.min(), row2.sum()]]
    ) * torch.tensor(LOGPROB_FEATURE_SCALE)
    torch.testing.assert_close(stats, expected)
    # Padding on the left gives the same statistics: only real -> real transitions are scored.
    left = sequence_logprob_stats(
        _BigramLM(table), torch.tensor([[0, 0, 2, 1]]), torch.tensor([[0, 0, 1, 1]])
    )
    torch.testing.assert_close(left, expected[1:])


def test_head_reads_last_hidden_state_and_logprob_stats(tmp_path):
    # With a known head, the reward is w_h . h_last + w_lp . stats: check both parts on a hand-made pair.
    model = build_reward_model(logprob_features=True)
    assert model.head.in_features == model.body.config.hidden_size + 3
    sequences = model.encode(PROMPTS[:2], RESPONSES[:2])
    input_ids, attention_mask = model.collate(sequences)
    with torch.no_grad():
        hidden = model.body(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state  # right-padded: positions are 0.. already
        last = attention_mask.sum(-1) - 1
        h_last = hidden[torch.arange(2), last]
        stats = sequence_logprob_stats(model.reference, input_ids, attention_mask)
        model.head.weight.zero_()
        model.head.weight[0, -3:] = torch.tensor([1.0, -2.0, 0.5])
        torch.testing.assert_close(model(input_ids, attention_mask), stats @ torch.tensor([1.0, -2.0, 0.5]))
        model.head.weight[0, :-3] = 1.0
        model.head.weight[0, -3:] = 0.0
        torch.testing.assert_close(model(input_ids, attention_mask), h_last.sum(-1))
    # A fluent review is less surprising than the same words shuffled, to the frozen LM.
    fluent, shuffled = model.encode(["the plot"] * 2, ["was great .", "great . was"])
    stats = sequence_logprob_stats(model.reference, *model.collate([fluent, shuffled]))
    assert stats[0, 0] > stats[1, 0] and stats[0, 1] > stats[1, 1]
    # Save/load keeps the frozen LM and the head: identical raw scores.
    model.save(tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / "reward_model.json").read_text())["logprob_features"] is True
    loaded = load_reward_model(tmp_path / "rm")
    assert loaded.logprob_features
    assert torch.equal(loaded.raw_score(PROMPTS, RESPONSES), model.raw_score(PROMPTS, RESPONSES))
    # The reloaded body and frozen LM (built from config: gelu_new) both run the fused GELU kernel.
    from transformers.activations import NewGELUActivation

    assert not any(isinstance(m, NewGELUActivation) for m in loaded.modules())


def test_plain_head_without_logprob_features_round_trips(tmp_path):
    model = build_reward_model(logprob_features=False)
    assert not model.logprob_features and model.reference is None
    assert model.head.in_features == model.body.config.hidden_size
    model.save(tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm")
    assert not loaded.logprob_features
    assert torch.equal(loaded.raw_score(PROMPTS, RESPONSES), model.raw_score(PROMPTS, RESPONSES))


@pytest.mark.parametrize(
    "edit, says",
    [
        ({"scale": 0}, r"key 'scale' must be > 0, got 0: .* infinite or NaN"),
        ({"scale": -1.0}, r"key 'scale' must be > 0, got -1.0"),
        ({"shift": float("nan")}, r"key 'shift' must be a finite number, got nan"),
        ({"scale": "1"}, r"key 'scale' must be a finite number, got '1'"),
        ({"scale": None}, r"key 'scale' must be a finite number, got None"),
    ],
)
def test_a_saved_normalisation_that_would_score_nan_is_refused_at_load(tmp_path, edit, says):
    """`scale: 0` in reward_model.json would score every response inf/NaN (issue 16): refused, naming the file."""
    build_reward_model(logprob_features=False).save(tmp_path / "rm")
    meta_file = tmp_path / "rm" / "reward_model.json"
    meta_file.write_text(json.dumps(json.loads(meta_file.read_text()) | edit))
    with pytest.raises(ValueError, match=rf"{meta_file}: {says}"):
        load_reward_model(tmp_path / "rm")
    with pytest.raises(ValueError, match=r"shift and scale must be finite and scale > 0"):
        RewardModel(build_reward_model(logprob_features=False).body, build_tokenizer(), scale=0.0)


def test_a_truncated_reward_model_or_classifier_is_named_at_load(tmp_path):
    from rlhf_base.io import DataError

    build_reward_model(logprob_features=False).save(tmp_path / "rm")
    weights = tmp_path / "rm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"{weights} is not a readable safetensors file"):
        load_reward_model(tmp_path / "rm")
    tokenizer = build_tokenizer()
    _tiny_classifier("gpt2", tokenizer).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(DataError, match=rf"{weights} is not a readable safetensors file"):
        load_reward_model(tmp_path / "hf")
    weights.unlink()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError, match=r"pytorch_model.bin is a pickle weights file"):
        HFSequenceClassifierRewardModel(tmp_path / "hf")


@pytest.mark.parametrize("variant", ["plain", "bos", "truncating"])
def test_encode_tokenises_as_the_tokenizer_call(variant):
    """`encode` may read the Rust backend directly; it must give `tokenizer(...)["input_ids"]` exactly,
    with a BOS-adding post-processor (specials on prompts only) and with a backend that truncates."""
    from tokenizers.processors import TemplateProcessing

    model = build_reward_model(logprob_features=False)
    tok = model.tokenizer
    if variant == "bos":  # Llama-style: the prompt gets <unk> as a stand-in BOS, the response none
        bos = tok.convert_tokens_to_ids("<unk>")
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single="<unk> $A", special_tokens=[("<unk>", bos)]
        )
    if variant == "truncating":
        tok.backend_tokenizer.enable_truncation(max_length=2)  # the wrapper's call turns this off
    expected_prompts = tok(PROMPTS)["input_ids"]
    expected = [
        p + r + [tok.eos_token_id]
        for p, r in zip(expected_prompts, tok(RESPONSES, add_special_tokens=False)["input_ids"], strict=True)
    ]
    if variant == "truncating":
        tok.backend_tokenizer.enable_truncation(max_length=2)
    assert model.encode(PROMPTS, RESPONSES) == expected
    if variant == "bos":
        assert all(ids[0] == bos for ids in expected_prompts) and expected[0].count(bos) == 1


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_any_hf_causal_lm_takes_the_logprob_head(kind, tmp_path):
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    if kind == "gpt2":
        lm = GPT2LMHeadModel(
            GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2)
        )
    else:
        lm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
            )
        )  # fmt: skip
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    model = build_reward_model(str(tmp_path / "lm"), logprob_features=True)
    assert model.kind == "causal-lm-body" and model.logprob_features
    model.save(tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm")
    torch.testing.assert_close(loaded.score(PROMPTS, RESPONSES), model.score(PROMPTS, RESPONSES))


# --------------------------------------------------------------------------------------------------------
# Training on the default task
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(core):
    """600 pairs of pi_ref's responses on the default task, labelled by the gold reward under BT noise."""
    return label_pairs(LabelConfig(num_pairs=600, seed=0), core=core, progress=False)


@pytest.fixture(scope="module")
def trained(labelled, tmp_path_factory):
    """One epoch on the same responses relabelled "longer is better": a preference the model can learn from
    450 pairs in one epoch. The gold labels need far more (see `test_learns_the_gold_preferences`)."""
    pairs = [
        {"prompt": p["prompt"], "chosen": a, "rejected": b} if len(a.split()) > len(b.split())
        else {"prompt": p["prompt"], "chosen": b, "rejected": a}
        for p in labelled[0]
        for a, b in [(p["chosen"], p["rejected"])]
        if len(a.split()) != len(b.split())
    ]  # fmt: skip
    torch.manual_seed(0)
    model = build_reward_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    run_dir = tmp_path_factory.mktemp("rm_run")
    config = RewardTrainConfig(epochs=1, batch_size=16, eval_fraction=0.25, seed=0)
    model, metrics = train_reward_model(pairs, config, model=model, run_dir=run_dir, progress=False)
    return model, metrics, before, run_dir


def test_training_changes_every_parameter_and_beats_chance(trained):
    model, metrics, before, _ = trained
    assert model.logprob_features  # the default task's default head
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(not name.startswith("reference.") for name, _ in trainable)
    unchanged = [name for name, p in trainable if torch.equal(p.detach(), before[name])]
    assert not unchanged, f"parameters not updated by training: {unchanged}"
    # The reference LM whose log-probs the head reads is frozen: training must leave it exactly as it was.
    frozen = [(name, p) for name, p in model.named_parameters() if name.startswith("reference.")]
    assert frozen and all(torch.equal(p.detach(), before[name]) for name, p in frozen)
    assert all(math.isfinite(metrics[k]) for k in ("train_loss", "eval_loss", "eval_accuracy", "eval_margin"))
    assert metrics["num_eval"] > 100
    # Over 100 held-out pairs chance is 0.5 with a standard error under 0.05; an untrained model fails.
    assert metrics["eval_accuracy"] > 0.8
    assert metrics["eval_margin"] > 0
    assert metrics["eval_loss"] < math.log(2)


@pytest.mark.slow
def test_learns_the_gold_preferences(core):
    # The default labeller's preferences (VADER sentiment + grammar + repetition, under noise) take
    # thousands of pairs: here 2,000 training pairs and 2 epochs (about a minute on 2 cores).
    pairs, report = label_pairs(LabelConfig(num_pairs=2500, seed=1), core=core, progress=False)
    config = RewardTrainConfig(epochs=2, eval_fraction=0.2, seed=0)
    _, metrics = train_reward_model(pairs, config, progress=False)
    assert metrics["num_eval"] == 500
    assert metrics["eval_accuracy"] > 0.6  # chance 0.5, standard error 0.022
    assert metrics["eval_accuracy"] <= report["ceiling"] + 0.05


def test_training_writes_metrics_csv_json_and_tensorboard(trained):
    _, metrics, _, run_dir = trained
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["eval_accuracy"] == pytest.approx(metrics["eval_accuracy"])
    header, row = (run_dir / "metrics.csv").read_text().splitlines()[:2]
    assert header.startswith("epoch,step,train_loss,train_accuracy,eval_loss,eval_accuracy,eval_margin")
    assert row.startswith("1,")
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_evaluation_reports_gold_agreement_and_label_ceiling(trained, labelled):
    # The labeller's pairs carry gold scores, so evaluation says how often the model orders a pair as the
    # gold reward does, and how often the labels themselves do (their ceiling).
    model = trained[0]
    pairs = labelled[0][:100]
    metrics = evaluate_reward_model(model, pairs)
    gold = np.array([p["gold_chosen"] - p["gold_rejected"] for p in pairs])
    prompts = [p["prompt"] for p in pairs]
    margin = model.raw_score(prompts, [p["chosen"] for p in pairs]) - model.raw_score(
        prompts, [p["rejected"] for p in pairs]
    )
    decided = gold != 0
    assert metrics["label_ceiling"] == pytest.approx((gold[decided] > 0).mean())
    # Accuracy on the ceiling's own population (gold ties excluded), so the two compare like with like.
    assert metrics["accuracy_decided"] == pytest.approx((margin.numpy()[decided] > 0).mean())
    assert metrics["gold_agreement"] == pytest.approx(
        (np.sign(margin.numpy())[decided] == np.sign(gold[decided])).mean()
    )
    assert metrics["accuracy"] == pytest.approx((margin > 0).float().mean().item())
    assert metrics["margin"] == pytest.approx(margin.mean().item(), abs=1e-5)


def test_normalised_scores_have_mean_zero_std_one_on_their_sample(trained, labelled):
    model, metrics, _, _ = trained
    pairs = labelled[0][:200]
    prompts = [p["prompt"] for p in pairs] * 2
    responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    raw = model.raw_score(prompts, responses)
    assert (metrics["shift"], metrics["scale"]) != (0.0, 1.0)  # training normalised the model
    stats = model.normalise(prompts, responses)
    scores = model.score(prompts, responses)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert scores.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert stats["shift"] == pytest.approx(raw.double().mean().item(), abs=1e-6)
    torch.testing.assert_close(scores, (raw - stats["shift"]) / stats["scale"])


def test_scores_do_not_depend_on_batching(trained):
    model = trained[0]
    together = model.score(PROMPTS, RESPONSES, batch_size=256)
    alone = torch.cat([model.score([p], [r]) for p, r in zip(PROMPTS, RESPONSES, strict=True)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_gives_identical_scores(trained, tmp_path):
    model = trained[0]
    model.save(tmp_path / "rm")
    assert {"model.safetensors", "reward_model.json", "config.json", "tokenizer.json"} <= {
        f.name for f in (tmp_path / "rm").iterdir()
    }
    loaded = load_reward_model(tmp_path / "rm")
    assert isinstance(loaded, RewardModel) and (loaded.shift, loaded.scale) == (model.shift, model.scale)
    assert torch.equal(loaded.score(PROMPTS, RESPONSES), model.score(PROMPTS, RESPONSES))


def test_env_loads_a_reward_model_by_path_and_reports_its_score(trained, tmp_path):
    model = trained[0]
    path = model.save(tmp_path / "rm")
    env = gym.make("text_env/TextGen-v0", reward_model=str(path), max_new_tokens=6)
    env.action_space.seed(0)
    env.reset(seed=0)
    terminated = False
    while not terminated:
        _, reward, terminated, _, info = env.step(env.action_space.sample())
    expected = model.score([info["prompt"]], [info["response"]]).item()
    assert info["rm_score"] == pytest.approx(expected, abs=1e-5)
    assert reward == pytest.approx(info["rm_score"] - env.unwrapped.core.judge.beta * info["kl"], abs=1e-5)
    # The batched path: a vector env scoring 16 rows at once agrees with the model row by row.
    envs = text_env.TextGenVectorEnv(num_envs=16, reward_model=str(path), max_new_tokens=8)
    batch = text_env.rollout(envs, seed=0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        batch.rm_scores, model.score(batch.prompts, batch.responses), atol=1e-5, rtol=1e-5
    )


def test_nan_loss_is_refused_with_a_clear_error(labelled):
    model = build_reward_model()
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"loss became nan at epoch 1, step 1.*learning rate"):
        train_reward_model(labelled[0][:40], RewardTrainConfig(epochs=1), model=model, progress=False)


def test_margin_field_enters_the_loss(labelled):
    pairs = [{**p, "margin": 0.5} for p in labelled[0][:64]]
    model = build_reward_model()
    config = RewardTrainConfig(epochs=1, margin_field="margin", eval_fraction=0.5, batch_size=32)
    _, metrics = train_reward_model(pairs, config, model=model, progress=False)
    assert math.isfinite(metrics["train_loss"])
    with pytest.raises(ValueError, match="margin_field 'margin'"):
        train_reward_model(labelled[0][:8], RewardTrainConfig(margin_field="margin"), progress=False)


# --------------------------------------------------------------------------------------------------------
# Hugging Face sequence classifiers and plain functions
# --------------------------------------------------------------------------------------------------------
def _tiny_classifier(kind: str, tokenizer):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2, num_labels=1
        )
        model = GPT2ForSequenceClassification(config)
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, num_labels=1,
        )  # fmt: skip
        model = LlamaForSequenceClassification(config)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_sequence_classifier_adapter_scores_like_the_model(kind, tmp_path):
    tokenizer = build_tokenizer()
    model = _tiny_classifier(kind, tokenizer)
    model.save_pretrained(tmp_path / kind)
    tokenizer.save_pretrained(tmp_path / kind)
    rm = HFSequenceClassifierRewardModel(tmp_path / kind)
    scores = rm.score(PROMPTS, RESPONSES)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    with torch.no_grad():  # the same pair alone, unpadded: padding in the batch must not change it
        ids = tokenizer(PROMPTS[3], RESPONSES[3], return_tensors="pt")["input_ids"]
        assert scores[3].item() == pytest.approx(model(input_ids=ids).logits[0, 0].item(), abs=1e-5)
    # A plain HF directory given to load_reward_model (or to the env as a path) goes through the adapter.
    via_loader = load_reward_model(tmp_path / kind)
    assert isinstance(via_loader, HFSequenceClassifierRewardModel)
    torch.testing.assert_close(via_loader.score(PROMPTS, RESPONSES), scores)
    assert HFSequenceClassifierRewardModel(model, tokenizer).score(PROMPTS, RESPONSES).shape == (4,)


def test_reward_model_from_a_pretrained_classifier_trains_and_round_trips(labelled, tmp_path):
    tokenizer = build_tokenizer()
    _tiny_classifier("gpt2", tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model = build_reward_model(str(tmp_path / "base"))
    assert model.kind == "sequence-classifier"
    config = RewardTrainConfig(epochs=1, eval_fraction=0.25, batch_size=32, normalise_samples=64)
    model, metrics = train_reward_model(labelled[0][:96], config, model=model, progress=False)
    assert math.isfinite(metrics["train_loss"])
    model.save(tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm")
    assert isinstance(loaded, RewardModel) and loaded.kind == "sequence-classifier"
    torch.testing.assert_close(loaded.score(PROMPTS, RESPONSES), model.score(PROMPTS, RESPONSES))


def test_function_reward_model_wraps_a_plain_function_and_the_env_accepts_it(core):
    rm = FunctionRewardModel(lambda prompts, responses: [len(r.split()) for r in responses], name="length")
    torch.testing.assert_close(rm.score(["a", "b"], ["one", "two words"]), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="'length' returned shape"):
        FunctionRewardModel(lambda p, r: [1.0], name="length").score(["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="returned nan"):
        FunctionRewardModel(lambda p, r: [float("nan")]).score(["a"], ["x"])
    env = text_env.TextGenEnv(
        reference=core.reference, tokenizer=core.tokenizer, reward_model=rm, max_new_tokens=4
    )
    env.reset(seed=0)
    terminated = False
    while not terminated:
        _, _, terminated, _, info = env.step(env.action_space.sample())
    assert info["rm_score"] == len(info["response"].split())


# --------------------------------------------------------------------------------------------------------
# Config and command
# --------------------------------------------------------------------------------------------------------
def _train_rm_parser():
    parser = argparse.ArgumentParser(prog="rlhf-gym")
    add_train_rm_command(parser.add_subparsers(dest="command"))
    return parser


def test_train_rm_command_trains_saves_and_writes_metrics(labelled, tmp_path):
    pairs_path = write_pairs(labelled[0][:96], tmp_path / "pairs.jsonl")
    run_dir = tmp_path / "run"
    argv = ["train-rm", "--run-dir", str(run_dir), "--no-progress", f"pairs={pairs_path}", "epochs=1"]
    args = _train_rm_parser().parse_args([*argv, "normalise_samples=64"])
    assert args.handler(args) == 0
    model = load_reward_model(run_dir / "reward_model")
    assert model.score(PROMPTS, RESPONSES).shape == (4,)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_train"] + metrics["num_eval"] == 96
    assert (run_dir / "metrics.csv").is_file() and (run_dir / "train_rm_config.yaml").is_file()


def test_unknown_or_renamed_config_key_names_the_valid_or_new_key(tmp_path, capsys):
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'learning_rte'.*valid keys for RewardTrainConfig: .*\blearning_rate\b",
    ):
        load_config(RewardTrainConfig, None, ["learning_rte=1e-3"])
    with pytest.raises(ConfigError, match=r"'lr' was renamed to 'learning_rate' in RewardTrainConfig"):
        load_config(RewardTrainConfig, None, ["lr=1e-3"])
    assert main(["train-rm", "--run-dir", str(tmp_path), "epoch=2"]) == 2  # errors reach the user via main
    assert "did you mean 'epochs'" in capsys.readouterr().err


def test_train_rm_command_reports_a_missing_pairs_file(tmp_path, capsys):
    assert main(["train-rm", "--run-dir", str(tmp_path), f"pairs={tmp_path}/none.jsonl"]) == 2
    assert "none.jsonl" in capsys.readouterr().err


def test_reward_model_reading_pi_refs_logprobs_shares_the_reference_forward(core, tmp_path):
    """A reward model whose frozen LM is pi_ref scores from the env's reference forward (one forward less):
    the same scores as its text path, cut-off rows included (EOS appended), its own frozen LM never run."""
    from rlhf_base.lm import response_logprobs
    from text_env.core import EnvCore

    torch.manual_seed(0)
    rm = build_reward_model(logprob_features=True)  # frozen LM: a copy of the tiny model, i.e. pi_ref here
    rm.shift, rm.scale = 0.3, 1.7
    rm.save(tmp_path / "rm")
    rm = load_reward_model(tmp_path / "rm")  # reloaded: the frozen LM's weights still equal pi_ref's
    env_core = EnvCore(reference=core.reference, tokenizer=core.tokenizer, reward_model=rm, max_new_tokens=6)
    assert env_core.judge.shared_reward_model() is rm
    calls = []
    hook = rm.reference.register_forward_hook(lambda *_: calls.append(1))
    envs = text_env.TextGenVectorEnv(num_envs=16, core=env_core)
    batch = text_env.rollout(envs, generator=torch.Generator().manual_seed(3))
    hook.remove()
    assert calls == [], "the reward model's own frozen LM ran: nothing was shared"
    assert (batch.lengths == 6).any() and (batch.lengths < 6).any(), "want cut-off and ended rows"
    torch.testing.assert_close(batch.rm_scores, rm.score(batch.prompts, batch.responses), atol=1e-4, rtol=0)
    forced = response_logprobs(core.reference, batch.input_ids, batch.attention_mask, batch.response_start)
    mask = batch.response_mask
    torch.testing.assert_close(batch.ref_logprobs * mask, forced * mask, atol=1e-5, rtol=0)

    # A special token inside a response is dropped by the decoded text: such a row is scored as text.
    unk = core.tokenizer.unk_token_id
    ids, attn = batch.input_ids.numpy().copy(), batch.attention_mask.numpy()
    ids[0, batch.response_start] = unk
    text = core.tokenizer.decode(ids[0, batch.response_start :][attn[0, batch.response_start :] == 1],
                                 skip_special_tokens=True)  # fmt: skip
    scores = env_core.judge.score(ids[:1], attn[:1], batch.response_start, batch.prompts[:1], [text])
    assert scores["rm_score"][0] == pytest.approx(float(rm.score(batch.prompts[:1], [text])[0]), abs=1e-5)

    # Too long for the reward model: a clear error that says how to score it instead.
    long_ids = torch.zeros((1, rm.max_length + 1), dtype=torch.long)
    with pytest.raises(
        ValueError, match=rf"{rm.max_length + 1} tokens .* max_length {rm.max_length}: .*score\(\)"
    ):
        rm.score_tokens(long_ids, torch.ones_like(long_ids), torch.zeros(1, rm.max_length))

    # A frozen LM with other weights than pi_ref's: no sharing, the text path as before.
    with torch.no_grad():
        rm.reference.lm_head.weight.add_(0.01)  # tied to the embeddings: a different LM
    other = EnvCore(reference=core.reference, tokenizer=core.tokenizer, reward_model=rm, max_new_tokens=6)
    assert other.judge.shared_reward_model() is None
