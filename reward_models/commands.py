"""Deprecated: the `label` and `train-rm` commands moved to `rlhf_gym.cli` (the stages: `rlhf_gym.label`,
`reward_models.train`)."""

from rlhf_base.deprecation import moved_names

__getattr__ = moved_names(__name__, dict.fromkeys(
    ("add_label_command", "run_label", "add_train_rm_command", "run_train_rm"), "rlhf_gym.cli"
))  # fmt: skip
