"""Deprecated: the `label` and `train-rm` commands moved to `rlhf_gym.label` and `rlhf_gym.train_rm`."""

from rlhf_base.deprecation import moved_names

__getattr__ = moved_names(
    __name__,
    {"add_label_command": "rlhf_gym.label", "run_label": "rlhf_gym.label",
     "add_train_rm_command": "rlhf_gym.train_rm", "run_train_rm": "rlhf_gym.train_rm"},
)  # fmt: skip
