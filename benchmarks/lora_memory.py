"""Memory per trainable parameter: full fine-tuning against LoRA (r = 8, 16), on the tiny model and SmolLM2-135M's shape.

For each model and variant the benchmark builds the policy as an agent does (`agents.base.prepare_policy`
on an env whose reference is the model), takes one Adam step on a small batch (so gradients and the
optimiser's state exist, as in training), and counts tensor bytes, exactly:

* **weights**: every parameter the process holds for pi and pi_ref together. Full fine-tuning keeps a
  frozen copy of the base as pi_ref; LoRA holds the base once (pi_ref is the policy with its adapter off)
  plus the adapter.
* **gradients** and **optimiser state** (Adam's two moments and its step counters): what training adds
  per trainable parameter, reported in bytes per trainable parameter and in total.

Activations are not counted: they scale with batch and length, not with the trainable parameters, and on
the CPU there is no peak-memory counter to read them by (the GPU recipe, `benchmarks/gpu_recipe.py`, reports
`torch.cuda.max_memory_allocated`). The SmolLM2-135M model is a random `LlamaForCausalLM` built from its
config (no download): byte counts depend on shapes and dtypes, not on the weights' values.

    python -m benchmarks.lora_memory [--models tiny smollm2-shape] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import describe, machine_info, markdown_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("tiny", "smollm2-shape")
VARIANTS: tuple[tuple[str, int | None], ...] = (
    ("full fine-tuning", None),
    ("LoRA r=8", 8),
    ("LoRA r=16", 16),
)

#: SmolLM2-135M's architecture (its config.json on the hub), for a random model of the same shape.
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
)  # fmt: skip


def _build(model: str) -> tuple[torch.nn.Module, int]:
    """A fresh model and its vocabulary size; the tiny one from its cache, the other random from config."""
    if model == "tiny":
        from rlhf_base.models import load_causal_lm

        lm, _ = load_causal_lm(None)
        return lm, int(lm.config.vocab_size)
    if model == "smollm2-shape":
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval(), SMOLLM2_135M["vocab_size"]
    raise ValueError(f"unknown model {model!r}; valid: {list(MODELS)}")


class _Env:
    """The two handles `prepare_policy` uses (policy, reference) and the setter it calls, without an env:
    the tiny task's prompts do not tokenise with SmolLM2's vocabulary, and memory needs no rollout."""

    def __init__(self, reference: torch.nn.Module, policy: torch.nn.Module) -> None:
        self.reference, self.policy = reference, policy

    def set_policy(self, policy: torch.nn.Module) -> None:
        self.policy = policy

    def set_reference(self, reference: torch.nn.Module) -> None:
        self.reference = reference


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(model: str, r: int | None, batch: int = 2, length: int = 16) -> dict[str, Any]:
    """One model and variant: parameter counts and bytes after one Adam step (see the module docstring)."""
    from agents.base import prepare_policy
    from rlhf_base.lora import LoraConfig
    from rlhf_base.models import frozen_copy, trainable_copy
    from rlhf_base.optim import adam

    base, vocab = _build(model)
    env = _Env(frozen_copy(base), trainable_copy(base))
    del base
    params = prepare_policy(env, None if r is None else LoraConfig(r=r), seed=0, agent="bench")
    optimizer = adam(params, lr=1e-4)
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    loss = env.policy(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    step_seconds = time.perf_counter() - start

    # Every distinct parameter tensor the process holds for pi and pi_ref (a shared one counted once).
    held = {id(p): p for module in (env.policy, env.reference) for p in module.parameters()}
    trainable = [p for p in params if p.requires_grad]
    grads = [p.grad for p in trainable if p.grad is not None]
    states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    n_trainable = sum(p.numel() for p in trainable)
    grad_bytes, state_bytes = _nbytes(grads), _nbytes(states)
    return {
        "model": model,
        "variant": "full fine-tuning" if r is None else f"LoRA r={r}",
        "r": r,
        "base_parameters": sum(p.numel() for p in env.reference.parameters()),
        "trainable_parameters": n_trainable,
        "trainable_share": n_trainable / sum(p.numel() for p in env.reference.parameters()),
        "weight_bytes": _nbytes(held.values()),
        "gradient_bytes": grad_bytes,
        "optimizer_state_bytes": state_bytes,
        "bytes_per_trainable_parameter": (grad_bytes + state_bytes) / n_trainable,
        "training_bytes": _nbytes(held.values()) + grad_bytes + state_bytes,
        "step_seconds": step_seconds,
    }


def run(models: tuple[str, ...] = MODELS) -> dict[str, Any]:
    rows = []
    for model in models:
        for _, r in VARIANTS:
            rows.append(measure(model, r))
            print(
                f"[lora-memory] {model} {rows[-1]['variant']}: {_mb(rows[-1]['training_bytes'])}", flush=True
            )
    return {"machine": machine_info(), "dtype": "float32", "optimizer": "AdamW (fused)", "rows": rows}


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def markdown(result: dict[str, Any]) -> str:
    rows = [
        [
            r["model"], r["variant"], f"{r['trainable_parameters']:,}", f"{r['trainable_share']:.2%}",
            _mb(r["weight_bytes"]), _mb(r["gradient_bytes"]), _mb(r["optimizer_state_bytes"]),
            f"{r['bytes_per_trainable_parameter']:.2f}", _mb(r["training_bytes"]),
            f"{r['training_bytes'] / r['trainable_parameters']:.1f}",
        ]
        for r in result["rows"]
    ]  # fmt: skip
    header = ["model", "variant", "trainable params", "of base", "weights (pi + pi_ref)", "gradients",
              "Adam state", "grad + Adam bytes / trainable param", "total", "total / trainable param"]  # fmt: skip
    return (
        "Memory of training state after one AdamW step, fp32, counted tensor by tensor (activations not "
        "included). Weights: pi and pi_ref together, a shared tensor once (full fine-tuning holds a frozen "
        "copy as pi_ref; LoRA holds the base once, pi_ref being the policy with its adapter off, "
        "target_modules all-linear, alpha 16).\n\n" + markdown_table(header, rows)
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for lora_memory.json / .md")
    args = parser.parse_args(argv)
    result = run(tuple(args.models))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_memory.json").write_text(json.dumps(result, indent=2))
    text = f"# LoRA: memory per trainable parameter\n\nMachine: {describe(result['machine'])}.\n\n{markdown(result)}\n"
    (args.out / "lora_memory.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
