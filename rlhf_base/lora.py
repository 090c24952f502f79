"""LoRA for the policy (issue 15): a low-rank adapter trains, the base weights stay frozen and serve as pi_ref.

LoRA (Hu et al. 2021, arXiv:2106.09685) adds `W x + (alpha / r) * B A x` to each targeted linear layer, with
A (r x d_in) random and B (d_out x r) zero at the start, so the adapted model is the base model exactly until
the first update. In RLHF the base model is pi_ref: switching the adapter off gives pi_ref's log-probs from
the very modules the policy runs, so one copy of the weights serves both sides of the KL (`AdapterOff`),
and only the adapter (and its optimiser state) costs memory per trainable parameter.

The adapter is peft's (`pip install -e '.[lora]'`); this module is the project's one door to it: the typed
config (`LoraConfig`), wrapping a model (`add_lora`), pi_ref as the wrapped model with its adapter off
(`AdapterOff`), the adapter's state for checkpoints, and saving/loading it as safetensors (optionally
with the merged full model beside it, which any causal-LM loader reads).
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from rlhf_base.ranges import Range, check_ranges

__all__ = [
    "ADAPTER_DIR",
    "ADAPTER_WEIGHTS",
    "ALL_LINEAR",
    "INSTALL_HINT",
    "AdapterOff",
    "LoraConfig",
    "adapter_state_dict",
    "add_lora",
    "base_model",
    "has_adapter",
    "is_lora",
    "load_adapter",
    "load_adapter_state_dict",
    "lora_layers",
    "require_peft",
    "save_adapter",
]

#: Every linear layer of the transformer blocks (not the output head): peft's "all-linear".
ALL_LINEAR = "all-linear"
#: How to get peft, said by every error that needs it.
INSTALL_HINT = "LoRA needs the peft package: pip install -e '.[lora]'"
#: The adapter's files, as peft's `save_pretrained` names them.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
#: Where a merged export keeps the adapter itself (the folder's top level holds the merged model).
ADAPTER_DIR = "adapter"


@dataclass
class LoraConfig:
    """A LoRA adapter on the policy: `agent.lora: {r, alpha, target_modules}` in any training agent's config.

    None in an agent's config (its default) is full fine-tuning, unchanged. With a LoraConfig only the
    adapter trains; pi_ref is the same model with the adapter off (no second copy of the weights).
    """

    RANGES: ClassVar[dict[str, Range]] = {
        "r": Range(ge=1),
        "alpha": Range(gt=0),
        "dropout": Range(ge=0, lt=1),
    }

    r: int = 8  # rank of the update B A; trainable parameters per targeted layer: r * (d_in + d_out)
    alpha: float = 16.0  # the update is scaled by alpha / r (Hu et al.), so a new r keeps the step size
    # dropout on the adapter's input; it acts only while the policy is in train mode, which of the agents
    # only RAFT's fine-tuning uses: the others refuse a non-zero value (it would never apply)
    dropout: float = 0.0
    # "all-linear": every Linear/Conv1D of the transformer blocks, not the output head (GPT-2: c_attn,
    # c_proj, c_fc; Llama: q/k/v/o_proj, gate/up/down_proj), as QLoRA (Dettmers et al. 2023) found needed to
    # match full fine-tuning; or a list of module names, e.g. [q_proj, v_proj] (Hu et al.'s choice)
    target_modules: str | list[str] = ALL_LINEAR
    # save() writes the merged model (base + adapter, a plain Hugging Face folder any loader reads) and the
    # adapter in `adapter/`; False: the adapter alone (adapter_model.safetensors + adapter_config.json)
    save_merged: bool = False

    def __post_init__(self) -> None:
        check_ranges(self)
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != ALL_LINEAR:
                raise ValueError(
                    f"lora.target_modules must be {ALL_LINEAR!r} or a list of module names such as "
                    f"['q_proj', 'v_proj'], got {targets!r}"
                )
        elif not (
            isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets)
        ):
            raise ValueError(
                f"lora.target_modules must be {ALL_LINEAR!r} or a non-empty list of module names, got {targets!r}"
            )
        else:
            self.target_modules = list(targets)

    @property
    def scaling(self) -> float:
        """alpha / r: the factor of B A x."""
        return self.alpha / self.r


def require_peft() -> Any:
    """The peft module, or an ImportError that says how to install it."""
    if importlib.util.find_spec("peft") is None:
        raise ImportError(INSTALL_HINT)
    import peft

    return peft


def is_lora(model: Any) -> bool:
    """Whether `model` is a peft-wrapped model. Imports nothing: if peft was never imported, no model is
    one, so the check costs nothing on the full fine-tuning path."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _is_adapter_name(name: str) -> bool:
    """A parameter or buffer of the adapter (peft names them `lora_A`, `lora_B`, ...), not of the base."""
    return any(part.startswith("lora_") for part in name.split("."))


def _base_name(name: str) -> str:
    """The base model's own name of a wrapped parameter: peft keeps a wrapped layer's weights in `base_layer`."""
    return name.replace(".base_layer.", ".")


def _has_conv1d(model: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in model.modules())


def add_lora(model: nn.Module, config: LoraConfig, seed: int = 0) -> Any:
    """`model` wrapped in place with a LoRA adapter (a peft `PeftModel`); only the adapter requires grad.

    A is drawn from torch's RNG seeded with `seed` (the global RNG is left as it was), B is zero: the
    wrapped model computes exactly what `model` did until B moves.

    Raises:
        ImportError: peft is not installed (the message says how to install it).
        ValueError: `model` already carries an adapter, or no module matches `config.target_modules`.
    """
    peft = require_peft()
    if is_lora(model):
        raise ValueError(
            "the policy already carries a LoRA adapter (was an agent built on this env before?): build the "
            "agent on a fresh env"
        )
    targets = config.target_modules
    peft_config = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        # GPT-2 keeps its linear layers as Conv1D, whose weight is stored (d_in, d_out)
        fan_in_fan_out=_has_conv1d(model),
        bias="none",
        task_type="CAUSAL_LM",
    )
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        torch.manual_seed(seed)
        # transformers' deprecation chatter from inside peft, not ours to fix
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
        try:
            wrapped = peft.get_peft_model(model, peft_config)
        except ValueError as err:
            linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)})
            raise ValueError(
                f"lora.target_modules={targets!r} matches no layer of {type(model).__name__} ({err}); its "
                f"linear layers are named {linear}"
            ) from err
    return wrapped


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def base_model(model: Any) -> nn.Module:
    """The transformers model inside a peft wrapper (with the adapter's layers in it); `model` itself if
    it is none."""
    return model.get_base_model() if is_lora(model) else model


def lora_layers(model: Any) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every layer that carries an adapter, in module order."""
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in base_model(model).named_modules() if isinstance(m, LoraLayer)]


class AdapterOff(nn.Module):
    """pi_ref as a LoRA policy with its adapter off: the same modules and weights, no second copy.

    It stands where the env keeps a frozen reference model (`envs.set_reference`): calling it runs the
    policy with every adapter layer switched off and in eval mode (pi_ref has no dropout); `config`,
    `dtype` and `device` are the policy's; `parameters()` and `state_dict()` are the base model's own
    weights under their own names (frozen, the adapter's left out), so a parameter count is the base
    model's and a reward model that reads pi_ref's log-probs recognises the same LM (`reads_logprobs_of`).
    The policy is held as a plain attribute, not a submodule, so nothing here registers the adapter as part
    of pi_ref.

    The switch is what peft's `with policy.disable_adapter():` does, layer by layer through each adapted
    layer's public `enable_adapters`, on a list of those layers made once: the context manager walks every
    module and checks the model's status on each call, ~4x the cost (tens of ms per call on SmolLM2-135M's
    210 adapted layers), and the env switches on every scored batch.
    """

    def __init__(self, policy: Any) -> None:
        super().__init__()
        if not is_lora(policy):
            raise TypeError(f"AdapterOff needs a peft-wrapped policy (add_lora), got {type(policy).__name__}")
        from peft.tuners.tuners_utils import BaseTunerLayer

        object.__setattr__(self, "policy", policy)  # not registered as a submodule (see the docstring)
        layers = [m for m in policy.modules() if isinstance(m, BaseTunerLayer)]
        object.__setattr__(self, "_adapter_layers", layers)
        self.eval()
        self.requires_grad_(False)

    @property
    def config(self) -> Any:
        return self.policy.config

    @property
    def dtype(self) -> torch.dtype:
        return self.policy.dtype

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        policy = self.policy
        was_training = policy.training
        if was_training:
            policy.eval()
        enabled = [layer for layer in self._adapter_layers if not layer.disable_adapters]
        try:
            for layer in enabled:
                layer.enable_adapters(False)
            return policy(*args, **kwargs)
        finally:
            for layer in enabled:
                layer.enable_adapters(True)  # also gives the adapter's weights back requires_grad
            if was_training:
                policy.train()

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.policy.get_base_model().named_parameters(remove_duplicate=remove_duplicate):
            if not _is_adapter_name(name):
                yield prefix + _base_name(name), p

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The base model's state dict, as the unwrapped model's `state_dict()` names it."""
        state = self.policy.get_base_model().state_dict(*args, **kwargs)
        return {_base_name(k): v for k, v in state.items() if not _is_adapter_name(k)}

    def __deepcopy__(self, memo: dict[int, Any]) -> nn.Module:
        """A deep copy is a real frozen model: the base weights alone, unwrapped from the adapter."""
        copied = copy.deepcopy(self.policy, memo).unload()
        copied.requires_grad_(False)
        return copied.eval()


def adapter_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's weights (peft's names, without the adapter's name): what a LoRA checkpoint holds."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def load_adapter_state_dict(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Put adapter weights (`adapter_state_dict`) back into `model`, in place; a ValueError if they are
    not this adapter's (other layers, or another rank)."""
    from peft import set_peft_model_state_dict

    mine = adapter_state_dict(model)
    if mine.keys() != state.keys():
        missing, extra = sorted(mine.keys() - state.keys()), sorted(state.keys() - mine.keys())
        raise ValueError(
            f"the saved adapter does not fit this policy's: missing {missing[:3]}, unexpected {extra[:3]} "
            "(another model or lora.target_modules?)"
        )
    wrong = [k for k in mine if mine[k].shape != state[k].shape]
    if wrong:
        raise ValueError(
            f"the saved adapter's {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, this policy's "
            f"{tuple(mine[wrong[0]].shape)} (another lora.r?)"
        )
    set_peft_model_state_dict(model, state)


def has_adapter(path: str | Path) -> bool:
    """Whether a saved policy folder holds a LoRA adapter (at its top level, or beside a merged model)."""
    path = Path(path)
    return (path / ADAPTER_WEIGHTS).is_file() or (path / ADAPTER_DIR / ADAPTER_WEIGHTS).is_file()


def save_adapter(model: Any, path: str | Path, merged: bool = False) -> None:
    """Write the adapter as safetensors with its config (peft's `save_pretrained`) into the folder `path`.

    With `merged`, `path` gets the merged model instead (`W + (alpha / r) B A` folded into each layer: a plain
    Hugging Face folder, as full fine-tuning saves), and the adapter goes to `path/adapter/`. The merge runs
    on a copy, so the live policy keeps its base weights exactly (merging in place and back would round them).
    """
    path = Path(path)
    if merged:
        full = copy.deepcopy(model).merge_and_unload()
        full.save_pretrained(path, safe_serialization=True)
        del full
        path = path / ADAPTER_DIR
    model.save_pretrained(path, safe_serialization=True)


def load_adapter(model: Any, path: str | Path) -> None:
    """Load the adapter weights `save_adapter` wrote into `model`'s adapter, in place (safetensors only)."""
    from rlhf_base.io import load_tensors  # a truncated file: a DataError naming it

    path = Path(path)
    folder = path if (path / ADAPTER_WEIGHTS).is_file() else path / ADAPTER_DIR
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise ValueError(
            f"{path} holds no LoRA adapter ({ADAPTER_WEIGHTS}): it was saved by full fine-tuning; load it "
            "with an agent without lora, or use it as the env's model"
        )
    device = next(model.parameters()).device
    load_adapter_state_dict(model, load_tensors(folder / ADAPTER_WEIGHTS, device=device))
