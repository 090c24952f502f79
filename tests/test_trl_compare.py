"""The TRL comparison's own logic (benchmarks/trl_compare.py): shared settings, TRL's config, the table.

The comparison itself needs a separate TRL venv built from PyPI and a few minutes, so only its smoke run is
here, marked slow.
"""

from __future__ import annotations

import math

import pytest

from benchmarks import trl_compare
from benchmarks.trl_compare import _median_after_warmup, markdown, settings, trl_config
from rlhf_gym.pipeline import PipelineConfig, run_pipeline


def test_settings_are_our_reinforce_rloo_settings():
    s = settings()
    assert (s.prompts_per_batch, s.k, s.batch) == (16, 4, 64)
    assert (s.max_new_tokens, s.temperature, s.beta, s.lr, s.threads) == (32, 1.0, 0.05, 3e-4, 1)
    assert (
        s.budget_s == 60.0 and settings(quick=True).budget_s < 60.0 and settings(budget_s=5).budget_s == 5.0
    )


@pytest.mark.parametrize("trainer", ["rloo", "grpo"])
def test_trl_config_shares_the_settings_and_has_no_handicaps(trainer):
    s = settings()
    config = trl_config(s, trainer)
    # the same work: 64 completions = 16 prompts x k, one on-policy step per generation
    assert config["per_device_train_batch_size"] == s.batch and config["num_generations"] == s.k
    assert config["gradient_accumulation_steps"] == config["steps_per_generation"] == 1
    assert config["num_iterations"] == 1
    assert config["max_completion_length"] == s.max_new_tokens and config["temperature"] == s.temperature
    assert (config["top_p"], config["top_k"]) == (1.0, 0)
    assert config["beta"] == s.beta and config["learning_rate"] == s.lr
    assert config["lr_scheduler_type"] == "constant" and config["max_grad_norm"] == s.max_grad_norm
    # nothing that would slow TRL down for no reason
    assert not any(config[key] for key in ("bf16", "fp16", "gradient_checkpointing", "use_vllm"))
    assert config["eval_strategy"] == config["save_strategy"] == "no" and config["report_to"] == "none"
    assert config["model_init_kwargs"] == {"dtype": "float32"}
    assert config["dataloader_num_workers"] == 0


def test_trl_config_closest_objectives():
    assert trl_config(settings(), "rloo")["normalize_advantages"] is False
    grpo = trl_config(settings(), "grpo")
    assert (grpo["scale_rewards"], grpo["loss_type"]) == ("none", "dr_grpo")
    with pytest.raises(ValueError, match="unknown trainer"):
        trl_config(settings(), "ppo")


def test_median_after_warmup():
    assert _median_after_warmup([9.0, 1.0, 2.0, 3.0], warmup=1) == 2.0
    assert _median_after_warmup([9.0, 1.0], warmup=5) == 1.0  # too short: the last iteration
    assert math.isnan(_median_after_warmup([], warmup=1))


def _side(s_per_iter: float, gold: float, trainer: str = "X") -> dict:
    return {
        "trainer": trainer,
        "s_per_iter": s_per_iter,
        "cpu_s_per_iter": s_per_iter * 0.9,
        "early_s_per_iter": s_per_iter * 0.8,
        "iterations": int(60 / s_per_iter),
        "breakdown": {"rollout_s": 0.1},
        "eval": {"gold_score": gold, "rm_score": 0.5, "kl": 1.0, "length": 9.0},
    }


def test_markdown_table_from_a_result_dict():
    result = {
        "trl_version": "1.16.0",
        "settings": {**vars(settings()), "batch": 64},
        "pi_ref": {"eval": {"gold_score": 0.03, "rm_score": 0.0, "kl": 0.0, "length": 13.0}},
        "ours": _side(0.5, 0.25, "ReinforceAgent"),
        "trl_rloo": _side(1.0, 0.125, "RLOOTrainer"),
        "trl_grpo": _side(0.75, 0.1, "GRPOTrainer"),
    }
    text = markdown(result)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 5  # header, pi_ref, ours, RLOO, GRPO
    delimiter = next(line for line in text.splitlines() if line.startswith("|---"))
    cells = {line.count("|") for line in [*rows, delimiter]}
    assert len(cells) == 1, "GitHub renders a table only when every row has the header's cell count"
    assert "| pi_ref (start) | - | - | - | - | - | 0.030 |" in text
    assert "| TRL RLOOTrainer | 0.800 | 2.00x | 1.000 | 2.00x | 60 | 0.125 |" in text
    assert "| TRL GRPOTrainer | 0.600 | 1.50x | 0.750 | 1.50x |" in text
    assert "TRL 1.16.0" in text and "64 sequences" in text


def test_early_iterations_skip_the_warm_up_and_stop_at_twenty():
    seconds = [9.0, 9.0, 9.0] + [1.0] * 20 + [5.0] * 30  # warm-up, 20 early iterations, slower later ones
    assert trl_compare.early_s_per_iter(seconds, warmup=3) == 1.0
    assert _median_after_warmup(seconds, 3) == 5.0


def test_pipeline_until_rejects_unknown_stages():
    with pytest.raises(ValueError, match="until="):
        run_pipeline(PipelineConfig(), until="agents")


@pytest.mark.slow
def test_quick_comparison_end_to_end(tmp_path, monkeypatch):
    """Builds the TRL venv from PyPI (once), trains every side a few seconds and evaluates them."""
    monkeypatch.setattr(trl_compare, "OUT", tmp_path)  # keep the real benchmark's JSON; the venv is shared
    result = trl_compare.run(quick=True)
    assert (tmp_path / "trl_compare_64.json").is_file()
    for key in ("ours", "trl_rloo", "trl_grpo"):
        assert result[key]["iterations"] >= 1 and result[key]["s_per_iter"] > 0
        assert math.isfinite(result[key]["eval"]["gold_score"])
    assert result["ratio_trl_rloo_over_ours"] > 0 and result["trl_version"] == trl_compare.TRL_VERSION
