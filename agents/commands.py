"""Deprecated: the `train` stage moved to `rlhf_gym.train`, its command to `rlhf_gym.cli`."""

from rlhf_base.deprecation import moved_names

__getattr__ = moved_names(__name__, {"train": "rlhf_gym.train", "add_train_command": "rlhf_gym.cli"})
