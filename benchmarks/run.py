"""`make bench` / `rlhf-gym bench`: every performance figure of the README, measured side by side in one run.

Sections (each also runs alone as `python -m benchmarks.<name>`):
    rollout  tokens/s of the batched KV-cached env against the naive env and SB3's collection, batch 1-256,
             and the share of rollout time that is not a model forward (bookkeeping)
    fixes    what each speed fix buys: a REINFORCE/RLOO iteration with each one turned off alone
    scaling  seconds per PPO / REINFORCE iteration as the response length (32-256) and the batch (16-256)
             grow, and the cost per generated token
    trl      our REINFORCE/RLOO against TRL's RLOOTrainer and GRPOTrainer (in a venv of their own) on the
             same model, reward model, prompts and settings: s/iteration and gold after the same budget
    sb3      a whole SB3 PPO iteration (collection + update) against our rollout, batch 16
    cli      wall time of `rlhf-gym --help` and of each `rlhf-gym COMMAND --help` in fresh processes
             (seconds to run: the CLI must not import torch to list its options)

Writes `benchmarks/out/results.json` and `benchmarks/out/results.md` (and each section's own JSON), and
prints the machine it ran on. Figures from different runs do not compare: the machine's load changes.

    python -m benchmarks.run [--quick] [--only rollout scaling] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

# torch and the sections load when a benchmark runs, not when `rlhf-gym --help` lists `bench`'s options.

TRL_PROMPTS = (16, 64)  # prompts per batch in the trl section, k = 4 samples each
TRL_BUDGET_S = 45.0  # training seconds per side and scale
SECTIONS = ("rollout", "fixes", "scaling", "trl", "sb3", "cli")


def run_section(name: str, quick: bool, device: str) -> tuple[dict[str, Any], str]:
    """One section's result and its markdown."""
    import torch

    from benchmarks.common import OUT, pipeline_outputs

    if name == "rollout":
        from benchmarks import rollout

        policy, reward_model = pipeline_outputs()
        result = rollout.run(policy, reward_model, quick=quick, device=device)
        return result, rollout.markdown(result)
    if name == "fixes":
        from benchmarks import ablation

        result = ablation.run(quick=quick, device=device)
        return result, ablation.markdown(result)
    if name == "scaling":
        from benchmarks import scaling

        result = scaling.run(quick=quick, device=device)
        result["plot"] = str(scaling.plot(result, OUT / "scaling.png"))
        return result, scaling.markdown(result) + f"\n\n![scaling]({result['plot']})"
    if name == "trl":
        from benchmarks import trl_compare

        pipeline_outputs()
        threads, results, texts = torch.get_num_threads(), {}, []
        try:  # our default batch (16 prompts x 4) and the reference scale (64 prompts x 4)
            for prompts in TRL_PROMPTS[:1] if quick else TRL_PROMPTS:
                result = trl_compare.run(
                    quick=quick, budget_s=None if quick else TRL_BUDGET_S, prompts_per_batch=prompts
                )
                results[f"{prompts}x4"] = result
                texts.append(trl_compare.markdown(result))
        finally:
            torch.set_num_threads(threads)  # both sides ran on trl_compare's own thread count
        return results, "\n\n".join(texts)
    if name == "sb3":
        from benchmarks import sb3_speed

        result = sb3_speed.run(quick=quick)
        return result, sb3_speed.markdown(result)
    if name == "cli":
        from benchmarks import cli_help

        result = cli_help.run(quick=quick)
        return result, cli_help.markdown(result)
    raise ValueError(f"unknown section {name!r}; valid: {list(SECTIONS)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m benchmarks.run`, shared with `rlhf-gym bench`."""
    parser.add_argument("--quick", action="store_true", help="a smoke run: small sizes, few repeats")
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run (default: all)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the trl section runs on the CPU)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_all(parser.parse_args(argv))


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen sections one after another, writing the tables and the JSON as each finishes."""
    import torch

    from benchmarks.common import OUT, describe, machine_info

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"[bench] machine: {describe(info)}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": info, "quick": args.quick, "device": args.device}
    sections = [f"# rlhf-gym benchmarks\n\nMachine: {describe(info)}. Device: {args.device}."]
    for name in args.only:
        start = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        result, text = run_section(name, args.quick, args.device)
        result["seconds"] = time.perf_counter() - start
        results[name] = result
        sections.append(f"## {name} ({result['seconds']:.0f} s)\n\n{text}")
        print(text, flush=True)
        # Written after every section, so a long run that dies keeps what it measured.
        (OUT / "results.json").write_text(json.dumps(results, indent=2, default=str))
        (OUT / "results.md").write_text("\n\n".join(sections) + "\n")
    print(f"[bench] wrote {OUT / 'results.md'} and {OUT / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
