"""SFT: labels and loss against hand computations, training changes the model, files in and out, errors."""

from __future__ import annotations

import argparse
import copy
import csv
import json
import re

import gymnasium as gym
import pytest
import torch

import agents.sft as sft
import text_env
from agents.base import NonFiniteLossError
from agents.sft import (
    IGNORE_INDEX,
    collate,
    encode_demonstrations,
    load_demonstrations,
    sft_loss,
)
from rlhf_base.config import ConfigError, load_config
from rlhf_base.io import DataError
from rlhf_base.models import trainable_copy
from rlhf_gym.cli import add_sft_command, main
from rlhf_gym.sft import SFTConfig, train_sft
from text_env.tasks.reviews import sample_demonstrations

PAIRS = [("the movie was", "great ."), ("i", "loved this film . the cast was dull ."), ("this plot", "")]


@pytest.fixture()
def model(core):
    """A trainable copy of tiny-reviews: tests never touch the session's reference or policy."""
    return trainable_copy(core.reference)


def test_labels_mask_prompt_and_padding_and_keep_eos(tokenizer):
    examples = encode_demonstrations(tokenizer, PAIRS)
    eos = tokenizer.eos_token_id
    for (prompt, response), (prompt_ids, completion) in zip(PAIRS, examples, strict=True):
        assert prompt_ids == tokenizer(prompt)["input_ids"]
        assert completion == tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
    batch = collate(examples, tokenizer.pad_token_id)
    width = max(len(p) + len(c) for p, c in examples)
    assert batch["input_ids"].shape == (3, width)
    for row, (prompt_ids, completion) in enumerate(examples):
        n_p, n = len(prompt_ids), len(prompt_ids) + len(completion)
        labels = batch["labels"][row].tolist()
        assert labels == [IGNORE_INDEX] * n_p + completion + [IGNORE_INDEX] * (width - n)  # right-padded
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
    assert examples[2][1] == [eos], "an empty response still teaches the model to stop"


def test_pad_equal_to_eos_keeps_the_eos_label(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token  # the GPT-2 convention
    eos = tok.eos_token_id
    batch = collate(encode_demonstrations(tok, PAIRS[:2]), tok.pad_token_id)
    short = 0  # "the movie was great ." is the shorter row: its padding holds eos ids too
    n = int(batch["attention_mask"][short].sum())
    assert (batch["input_ids"][short, n:] == eos).all() and n < batch["input_ids"].shape[1]
    assert batch["labels"][short, n - 1] == eos, "the real EOS is labelled"
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all(), "padding (also eos ids) is not"


def test_sft_loss_equals_manual_cross_entropy_on_response_tokens(model, tokenizer):
    examples = encode_demonstrations(tokenizer, PAIRS[:2])
    loss = sft_loss(model, collate(examples, tokenizer.pad_token_id))
    # By hand: each sequence on its own (no padding), -log p of every response token and EOS, averaged.
    nll = []
    with torch.no_grad():
        for prompt_ids, completion in examples:
            ids = torch.tensor([prompt_ids + completion])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            for j, token in enumerate(completion):
                nll.append(-logp[len(prompt_ids) + j - 1, token])  # position t - 1 predicts token t
    torch.testing.assert_close(loss, torch.stack(nll).mean(), rtol=1e-5, atol=1e-5)


def test_prompt_tokens_do_not_enter_the_loss(model, tokenizer):
    batch = collate(encode_demonstrations(tokenizer, PAIRS[:2]), tokenizer.pad_token_id)
    predicts_label = torch.zeros_like(batch["labels"], dtype=torch.bool)  # position t predicts token t + 1
    predicts_label[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    assert (~predicts_label & (batch["attention_mask"] == 1)).any(), "the batch has prompt positions"

    class NoisyOffLabel(torch.nn.Module):
        """The model, with random junk added to every logit that does not predict a response token."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, **kwargs):
            out = self.lm(**kwargs)
            noise = 10 * torch.randn_like(out.logits) * (~predicts_label)[..., None]
            out.logits = out.logits + noise
            return out

    with torch.no_grad():
        torch.testing.assert_close(sft_loss(NoisyOffLabel(model), batch), sft_loss(model, batch))


def test_training_changes_every_parameter_and_lowers_the_loss(model, tokenizer):
    demos = sample_demonstrations(32, seed=5)
    batch = collate(encode_demonstrations(tokenizer, demos), tokenizer.pad_token_id)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        loss_before = sft_loss(model, batch).item()
    config = SFTConfig(epochs=4, batch_size=8, learning_rate=3e-3, warmup_steps=0, seed=0)
    metrics = train_sft(model, tokenizer, demos, config, progress=False)
    with torch.no_grad():
        loss_after = sft_loss(model, batch).item()
    assert metrics["steps"] == 16 and all(isinstance(v, float) for v in metrics.values())
    assert loss_after < loss_before - 0.1 and torch.isfinite(torch.tensor(metrics["final_loss"]))
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
    assert not unchanged, f"parameters not updated: {unchanged}"
    assert not model.training, "train_sft hands the model back in eval mode"


def test_save_load_round_trip_and_logs(model, tokenizer, tmp_path):
    demos = sample_demonstrations(24, seed=1)
    held_out = sample_demonstrations(16, seed=2)
    config = SFTConfig(epochs=1, batch_size=8, save_every=1)
    metrics = train_sft(
        model, tokenizer, demos, config, tmp_path, progress=False, eval_demonstrations=held_out
    )
    assert metrics["eval_nll_after"] < metrics["eval_nll_before"] + 0.05
    path = tmp_path / "sft"
    assert (path / "model.safetensors").is_file()
    assert json.loads((path / "sft_state.json").read_text())["complete"] is True
    loaded, loaded_tok = text_env.load_causal_lm(path)
    ids = torch.tensor([tokenizer("the movie was great .")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert loaded_tok.get_vocab() == tokenizer.get_vocab() and loaded_tok.eos_token == tokenizer.eos_token
    env = gym.make("text_env/TextGen-v0", model=str(path), max_new_tokens=4)
    env.reset(seed=0)
    with open(tmp_path / "sft_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and all(float(r["loss"]) > 0 for r in rows)
    assert any((tmp_path / "tensorboard" / "sft").iterdir())


def test_nan_loss_stops_and_keeps_the_last_checkpoint(model, tokenizer, tmp_path, monkeypatch):
    real_loss, calls = sft.sft_loss, []

    def nan_on_third_step(m, batch):
        calls.append(1)
        loss = real_loss(m, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(sft, "sft_loss", nan_on_third_step)
    config = SFTConfig(epochs=1, batch_size=4, save_every=1, learning_rate=1e-3)
    with pytest.raises(NonFiniteLossError, match="SFT loss is nan at step 3 of 4"):
        train_sft(model, tokenizer, sample_demonstrations(16, seed=3), config, tmp_path, progress=False)
    state = json.loads((tmp_path / "sft" / "sft_state.json").read_text())
    assert state == {"step": 2, "total_steps": 4, "complete": False}
    loaded, _ = text_env.load_causal_lm(tmp_path / "sft")
    for (name, p), q in zip(model.named_parameters(), loaded.parameters(), strict=True):
        assert torch.isfinite(q).all() and torch.equal(p.detach(), q), name  # the update never happened


def test_load_demonstrations_from_files_and_pairs(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text(
        '{"prompt": "the movie", "response": "was great ."}\n\n{"prompt": "i", "response": "."}\n'
    )
    assert load_demonstrations(path) == [("the movie", "was great ."), ("i", ".")]
    csv_path = tmp_path / "demos.csv"
    csv_path.write_text("prompt,response\nthe movie,was great .\n")
    assert load_demonstrations(csv_path) == [("the movie", "was great .")]
    assert load_demonstrations(PAIRS) == PAIRS
    with pytest.raises(DataError, match="demonstration 1"):
        load_demonstrations([("a", "b"), ("a",)])


def test_malformed_demonstration_file_names_file_and_line(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text('{"prompt": "the movie", "response": "was great ."}\n{"prompt": "i", "reply": "."}\n')
    with pytest.raises(
        DataError, match=r"demos\.jsonl line 2: demonstration is missing required field 'response'"
    ):
        load_demonstrations(path)
    path.write_text('{"prompt": "the movie", "response": "was great ."}\n{"prompt": "i", \n')
    with pytest.raises(DataError, match=r"demos\.jsonl line 2: malformed JSON"):
        load_demonstrations(path)


def test_unknown_or_renamed_config_key_is_named(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("epochs: 2\nlr: 1e-4\n")
    with pytest.raises(
        ConfigError,
        match=r"'lr' was renamed to 'learning_rate' in SFTConfig: change it in .*sft\.yaml line 2",
    ):
        load_config(SFTConfig, path)
    with pytest.raises(ConfigError, match="'warmup' was renamed to 'warmup_steps'"):
        load_config(SFTConfig, None, ["warmup=3"])
    with pytest.raises(ConfigError, match="unknown key 'bach_size'.*did you mean 'batch_size'"):
        load_config(SFTConfig, None, ["bach_size=3"])
    with pytest.raises(
        ConfigError, match=r"SFTConfig\.batch_size = 0 in override 'batch_size=0': must be >= 1"
    ):
        load_config(SFTConfig, None, ["batch_size=0"])


def test_sft_command_writes_a_loadable_reference(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="rlhf-gym")
    add_sft_command(parser.add_subparsers(dest="command"))
    run_dir, config = tmp_path / "run", tmp_path / "small.yaml"
    config.write_text("num_demonstrations: 64\nbatch_size: 16\n")
    args = parser.parse_args(
        ["sft", "--config", str(config),  "--run-dir", str(run_dir), "--device", "cpu", "--quiet",
         "num_eval_demonstrations=32", "eval_episodes=64"]
    )  # fmt: skip
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "4 steps on 64 demonstrations" in out and "grammatical reviews" in out
    metrics = json.loads((run_dir / "sft_metrics.json").read_text())
    assert 0 <= metrics["grammatical_after"] <= 1 and metrics["eval_nll_after"] > 0
    assert load_config(SFTConfig, run_dir / "sft_config.yaml").num_demonstrations == 64
    envs = gym.make_vec("text_env/TextGen-v0", num_envs=2, model=str(run_dir / "sft"), max_new_tokens=4)
    envs.reset(seed=0)
    capsys.readouterr()
    assert main(["sft", "--run-dir", str(run_dir), "epoch=2"]) == 2  # one line on stderr, no traceback
    assert re.match(
        r"rlhf-gym sft: error: unknown key 'epoch'.*did you mean 'epochs'", capsys.readouterr().err
    )
