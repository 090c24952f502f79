"""The pipeline's stage cache: a stage is redone when anything it is built from changes."""

from __future__ import annotations

import json

import rlhf_gym.pipeline as pipeline
from rlhf_base.config import config_from_dict
from rlhf_gym.report import read_results


def test_sft_is_redone_when_the_built_in_model_it_starts_from_changes(tmp_path, monkeypatch):
    """The SFT stage's fingerprint covers the built-in model's cache key (its recipe), not only SFT's config:
    a rebuilt tiny model (another recipe, another thread count) must not leave a stale pi_ref in the run."""
    config = config_from_dict(
        pipeline.PipelineConfig,
        {
            "runs_root": str(tmp_path),
            "sft": {"num_demonstrations": 16, "num_eval_demonstrations": 0, "eval_episodes": 0},
        },
    )
    stages = tmp_path / "default" / "stages.json"
    pipeline.run_pipeline(config, progress=False, until="sft")
    first = json.loads(stages.read_text())["sft"]
    pipeline.run_pipeline(config, progress=False, until="sft")
    assert json.loads(stages.read_text())["sft"] == first  # nothing changed: cached
    # Another recipe's key (the model itself is not rebuilt: only the key SFT's fingerprint reads changes).
    monkeypatch.setattr(pipeline, "_base_model_key", lambda: "tiny-reviews-another-recipe")
    pipeline.run_pipeline(config, progress=False, until="sft")
    assert json.loads(stages.read_text())["sft"] != first


def _tiny_pipeline(tmp_path, rm_seed=0, **agents):
    """Every stage, each as small as it runs: 16 demonstrations, 64 pairs, 2 epochs, 2 best-of-n cells."""
    return config_from_dict(
        pipeline.PipelineConfig,
        {
            "runs_root": str(tmp_path),
            "sft": {"num_demonstrations": 16, "num_eval_demonstrations": 0, "eval_episodes": 0},
            "label": {"num_pairs": 64, "batch_size": 32, "max_new_tokens": 8},
            "reward_model": {"epochs": 1, "normalise_samples": 64, "seed": rm_seed},
            "agents": {
                "agents": ["best_of_n"],
                "seeds": [0, 1],
                "env": {"max_new_tokens": 8, "num_envs": 8},
                "overrides": ["best_of_n.iterations=1", "best_of_n.prompts_per_iteration=4"],
                "eval_episodes": 8,
                "workers": 1,
                **agents,
            },
        },
    )


def test_the_agents_stage_reruns_exactly_the_cells_a_change_touches(tmp_path, monkeypatch):
    """The sweep's cells are keyed by their settings and inputs (pi_ref's and the reward model's content):
    a rerun runs nothing; a changed agents setting or a retrained reward model runs the cells again (the
    pipeline forces its own sweep: the old records are set aside in agents/stale/), never mixing them.
    (A new seed running only the new cells is the sweep's own rule, tested in tests/test_sweep.py.)"""
    lines = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    agents = tmp_path / "default" / "agents"
    pipeline.run_pipeline(_tiny_pipeline(tmp_path), progress=True)
    first = (agents / "results.csv").read_text()
    assert "2 cells, 0 done, 2 to run" in "\n".join(lines)
    lines.clear()
    pipeline.run_pipeline(_tiny_pipeline(tmp_path), progress=True)
    assert "2 cells, 2 done, 0 to run" in "\n".join(lines) and (agents / "results.csv").read_text() == first
    lines.clear()
    pipeline.run_pipeline(_tiny_pipeline(tmp_path, eval_episodes=16), progress=True)
    assert "2 cells, 0 done, 2 to run" in "\n".join(lines), "a changed agents setting runs its cells again"
    assert len(list((agents / "stale").glob("*.json"))) == 2
    lines.clear()
    pipeline.run_pipeline(_tiny_pipeline(tmp_path, 1, eval_episodes=16), progress=True)
    said = "\n".join(lines)
    assert "reward_model: Bradley-Terry training" in said and "2 cells, 0 done, 2 to run" in said, (
        "a retrained reward model (same folder, new content) runs every cell again"
    )
    assert (
        len(read_results(agents / "results.csv")) == 2 and len(list((agents / "stale").glob("*.json"))) == 4
    )
