"""The reviews task's own model: the tiny GPT-2 that stands in for "a large pretrained LLM".

The task owns its architecture (`TinyConfig`) and its pretraining (`pretrain.py`); `rlhf_base.models`
knows it only as the name "tiny-reviews", declared in pyproject.toml's `rlhf_gym.models` entry points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from rlhf_base.models import fuse_gelu
from rlhf_base.ranges import Range, check_ranges

__all__ = ["TinyConfig", "tiny_gpt2"]


@dataclass(frozen=True)
class TinyConfig:
    """The tiny GPT-2 that stands in for "a large pretrained LLM" on the default task (~0.85M parameters)."""

    RANGES: ClassVar[dict[str, Range]] = {
        "n_layer": Range(ge=1),
        "n_head": Range(ge=1),  # and divides n_embd (__post_init__)
        "n_embd": Range(ge=1),
        "n_positions": Range(ge=1),
        "dropout": Range(ge=0, lt=1),
    }

    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # hidden size
    n_positions: int = 128  # context length: prompt + response must fit
    dropout: float = 0.0  # no dropout: RL needs the sampled and the scored policy to be the same function

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")


def tiny_gpt2(tokenizer: PreTrainedTokenizerBase, config: TinyConfig = TinyConfig()) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 sized by `config` for `tokenizer`'s vocabulary."""
    gpt2_config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(gpt2_config)
    fuse_gelu(model)
    return model
