"""The pipeline's stage cache: a stage is redone when anything it is built from changes."""

from __future__ import annotations

import json

import rlhf_gym.pipeline as pipeline
from rlhf_base.config import config_from_dict


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
