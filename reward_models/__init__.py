"""Reward models, step 2 of RLHF: learn `r(prompt, response)` from preference pairs.

* `RewardModel`: a transformer with a scalar head; `score(prompts, responses)` is what the env calls.
* `train_reward_model`: Bradley-Terry training with a held-out accuracy (`RewardTrainConfig`); its `body`
  sets the size (`BODY_SIZES`), `num_pairs` the data, `ensemble_size` the members.
* `RewardEnsemble`: k reward models combined by mean, worst case or uncertainty weighting (`combine_scores`).
* `load_pairs` / `write_pairs`: preference pairs `{prompt, chosen, rejected}` from files or datasets.
* `FunctionRewardModel`, `HFSequenceClassifierRewardModel`: other reward models behind the same `score`.
* `load_reward_model(path)` (one model or an ensemble's folder): what `gym.make("text_env/TextGen-v0", reward_model="path")` uses.
"""

from reward_models.adapters import FunctionRewardModel, HFSequenceClassifierRewardModel
from reward_models.data import load_pairs, write_pairs
from reward_models.ensemble import RewardEnsemble, combine_scores
from reward_models.loading import BODY_SIZES, build_reward_model, load_reward_model
from reward_models.model import RewardModel
from reward_models.train import (
    RewardTrainConfig,
    bradley_terry_loss,
    evaluate_reward_model,
    train_reward_model,
)
from rlhf_base.deprecation import moved_names

__all__ = [
    "BODY_SIZES",
    "FunctionRewardModel",
    "HFSequenceClassifierRewardModel",
    "RewardEnsemble",
    "RewardModel",
    "RewardTrainConfig",
    "bradley_terry_loss",
    "build_reward_model",
    "combine_scores",
    "evaluate_reward_model",
    "load_pairs",
    "load_reward_model",
    "train_reward_model",
    "write_pairs",
]

# The labeller is a pipeline stage now (rlhf_gym.label); the old names still work, with a warning.
__getattr__ = moved_names(__name__, {"LabelConfig": "rlhf_gym.label", "label_pairs": "rlhf_gym.label"})
