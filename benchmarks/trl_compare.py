"""Our REINFORCE/RLOO against TRL's `RLOOTrainer` and `GRPOTrainer` on the same work, in one run (issue 6).

All three start from the same pi_ref (`runs/default/sft`, the default pipeline's SFT output) and tokenizer,
learn from the same reward model (`runs/default/reward_model`) on the reviews task's prompts, with the
settings of our REINFORCE agent with the leave-one-out baseline (`ReinforceConfig`'s defaults): 16 prompts
x k=4 samples = 64 sequences per iteration, 32 new tokens, temperature 1, beta 0.05, AdamW lr 3e-4, one
on-policy gradient step per batch, fp32, one torch thread. Each side trains for the same wall-clock budget;
then every policy is saved and evaluated the same way, here, with `agents.base.evaluate_policy` on the same
held-out prompt draws and sampling seed, so the gold reward is comparable.

TRL is no dependency of the project: `setup_trl_venv` builds `benchmarks/out/venv-trl` (the same CPU torch,
transformers and accelerate as this venv, a pinned trl, and the project without its dependencies), and
`benchmarks/trl_worker.py` trains there. Where TRL's objectives necessarily differ from ours, `NOTES` says so.

    python -m benchmarks.trl_compare [--quick] [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any
from unittest import mock

from benchmarks.common import OUT, ROOT, RUN_DIR, pipeline_outputs, timed_calls
from benchmarks.trl_report import EARLY_ITERATIONS, NOTES, markdown

VENV = OUT / "venv-trl"
TRL_VERSION = "1.16.0"  # the latest trl on PyPI when this benchmark was written; bump it deliberately
TRAINERS = {"rloo": "RLOOTrainer", "grpo": "GRPOTrainer"}

__all__ = [
    "NOTES",
    "Settings",
    "evaluate_saved",
    "markdown",
    "run",
    "run_ours",
    "run_trl",
    "settings",
    "setup_trl_venv",
    "trl_config",
]


@dataclass(frozen=True)
class Settings:
    """What every side shares, read from our agent's and env's configs so that the two cannot drift."""

    policy: str  # pi_ref: an HF GPT-2 directory with its tokenizer (the default pipeline's SFT output)
    reward_model: str  # the learned reward model directory (`reward_models.load_reward_model`)
    prompts_per_batch: int  # distinct prompts per iteration
    k: int  # samples per prompt (the leave-one-out group)
    max_new_tokens: int  # response length limit
    temperature: float  # sampling temperature
    beta: float  # KL coefficient
    lr: float  # AdamW learning rate
    adam_eps: float  # AdamW epsilon
    weight_decay: float  # AdamW weight decay
    max_grad_norm: float  # gradient-norm clip
    seed: int  # torch / sampling / prompt-order seed of every side
    budget_s: float  # wall-clock training seconds per side
    warmup: int  # first iterations left out of the median s/iteration
    eval_episodes: int  # held-out episodes per evaluation
    eval_seed: int  # prompt draws and sampling seed of every evaluation
    threads: int = 1  # torch threads of every side

    @property
    def batch(self) -> int:
        return self.prompts_per_batch * self.k


def settings(
    quick: bool = False, budget_s: float | None = None, prompts_per_batch: int | None = None
) -> Settings:
    """The shared settings: our REINFORCE/RLOO agent's config and the env's defaults; a budget per side.

    `prompts_per_batch` (default: the env's 64 rows / k = 16) sets the scale, e.g. 64 for the issue's
    "64 prompts x 4 samples" reference point; both sides always get the same.
    """
    from agents.reinforce import ReinforceConfig
    from text_env.config import EnvConfig

    ours, env = ReinforceConfig(), EnvConfig()
    # TRL's trainers match this only for the on-policy sequence-sum RLOO estimator.
    expected = {"baseline": "rloo", "epochs": 1, "token_mean": False, "ent_coef": 0.0}
    actual = {key: getattr(ours, key) for key in expected}
    if actual != expected:
        raise ValueError(
            f"ReinforceConfig's defaults no longer match what TRL can run: {actual} != {expected}"
        )
    return Settings(
        policy=str(RUN_DIR / "sft"),
        reward_model=str(RUN_DIR / "reward_model"),
        prompts_per_batch=prompts_per_batch or env.num_envs // ours.samples_per_prompt,
        k=ours.samples_per_prompt,
        max_new_tokens=env.max_new_tokens,
        temperature=1.0,  # text_env.rollout's default, what the agent samples with
        beta=env.beta,
        lr=ours.learning_rate,
        adam_eps=ours.adam_eps,
        weight_decay=ours.weight_decay,
        max_grad_norm=ours.max_grad_norm,
        seed=ours.seed,
        budget_s=float(budget_s if budget_s is not None else (8.0 if quick else 60.0)),
        warmup=1 if quick else 3,
        eval_episodes=64 if quick else 256,
        eval_seed=10_000,  # the sweep's evaluation seed (rlhf_gym/sweep.py)
    )


def trl_config(s: Settings, trainer: str) -> dict[str, Any]:
    """`RLOOConfig` / `GRPOConfig` keyword arguments for the shared settings (see NOTES for what differs)."""
    config = {
        # the batch: one generation of 16 prompts x k completions per optimiser step, one step per generation
        "per_device_train_batch_size": s.batch,  # completions, not prompts
        "num_generations": s.k,
        "gradient_accumulation_steps": 1,
        "steps_per_generation": 1,
        "num_iterations": 1,  # on-policy: one gradient step per batch
        "max_completion_length": s.max_new_tokens,
        "temperature": s.temperature,
        "top_p": 1.0,
        "top_k": 0,
        "beta": s.beta,
        "learning_rate": s.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "adam_epsilon": s.adam_eps,
        "weight_decay": s.weight_decay,
        "max_grad_norm": s.max_grad_norm,
        "seed": s.seed,
        "max_steps": 1_000_000,  # the budget callback stops training
        # no handicaps: fp32, no gradient checkpointing, no vLLM, no eval or saving, default logging only
        "model_init_kwargs": {"dtype": "float32"},  # policy and reference, as ours
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "use_vllm": False,
        "use_cpu": True,
        "disable_dropout": True,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    if trainer == "rloo":
        config["normalize_advantages"] = False
    elif trainer == "grpo":
        config.update(scale_rewards="none", loss_type="dr_grpo")
    else:
        raise ValueError(f"unknown trainer {trainer!r}; valid: {list(TRAINERS)}")
    return config


def _requirements() -> list[list[str]]:
    """What the TRL venv installs, in order: torch first (this venv's CPU build), then trl and the rest."""
    same = ["transformers", "accelerate", "datasets", "gymnasium", "vaderSentiment"]
    return [
        [f"torch=={version('torch').split('+')[0]}"],
        [f"trl=={TRL_VERSION}", *(f"{name}=={version(name)}" for name in same)],
        ["--no-deps", "-e", str(ROOT)],  # the project: our tokenizer, reward model and task prompts
    ]


def setup_trl_venv(progress: bool = True) -> Path:
    """Build the TRL venv once (python -m venv + pip), recorded by a marker; return its python."""
    python, marker = VENV / "bin" / "python", VENV / ".installed.json"
    wanted = {"requirements": _requirements(), "root": str(ROOT)}
    if python.is_file() and marker.is_file() and json.loads(marker.read_text()) == wanted:
        return python
    if progress:
        print(f"[trl_compare] building {VENV} (trl=={TRL_VERSION}, CPU torch): about a minute", flush=True)
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    for requirement in wanted["requirements"]:
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirement],
            check=True,
        )
    marker.write_text(json.dumps(wanted, indent=2))
    return python


def _median_after_warmup(values: list[float], warmup: int) -> float:
    kept = values[warmup:] if len(values) > warmup else values[-1:]
    return float(statistics.median(kept)) if kept else float("nan")


def shared_envs(s: Settings) -> Any:
    """The vector env both our training and every evaluation use: pi_ref, the reward model, beta, N, B."""
    from text_env.config import EnvConfig

    cfg = EnvConfig(
        model=s.policy,
        reward_model=s.reward_model,
        beta=s.beta,
        max_new_tokens=s.max_new_tokens,
        num_envs=s.batch,
    )
    return cfg.make()


def run_ours(s: Settings, out_dir: Path) -> dict[str, Any]:
    """Train our REINFORCE/RLOO agent for the budget, timing each iteration and its parts; save the policy.

    The breakdown wraps, for this run only, `text_env.rollout` (generation, scoring included), the env's
    `score_rows` (reference forward, reward model and gold reward of finished rows) and the gold reward alone;
    the update is the rest of the iteration (teacher-forced forward, backward, optimiser step, metrics).
    """
    import torch

    import text_env
    from agents.reinforce import ReinforceAgent, ReinforceConfig

    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    envs = shared_envs(s)
    agent = ReinforceAgent(envs, ReinforceConfig())
    parts: dict[str, float] = {}
    envs.core.score_rows = timed_calls(envs.core.score_rows, parts, "scoring_s")
    if envs.core.judge.gold_fn is not None:
        envs.core.judge.gold_fn = timed_calls(envs.core.judge.gold_fn, parts, "gold_logging_s")
    steps: list[dict[str, float]] = []
    last, last_cpu = 0.0, time.process_time()

    def record(agent: Any, metrics: dict[str, float]) -> bool:
        nonlocal last, last_cpu
        seconds, cpu = metrics["wall_time"] - last, time.process_time()
        last = metrics["wall_time"]
        rollout_s = parts.pop("rollout_s", 0.0)
        scoring_s = parts.get("scoring_s", 0.0)
        steps.append(
            {
                "seconds": seconds,
                "cpu_seconds": cpu - last_cpu,
                "rollout_s": rollout_s - scoring_s,  # generation alone
                "scoring_s": scoring_s,
                "gold_logging_s": parts.get("gold_logging_s", 0.0),
                "update_s": seconds - rollout_s,
            }
        )
        parts.clear()
        last_cpu = cpu
        return metrics["wall_time"] < s.budget_s

    with mock.patch.object(text_env, "rollout", timed_calls(text_env.rollout, parts, "rollout_s")):
        agent.learn(iterations=1_000_000, callback=record)
    agent.save(out_dir / "policy")
    return {"trainer": "ReinforceAgent (rloo)", "train_seconds": last, "steps": steps}


def run_trl(s: Settings, trainer: str, python: Path, out_dir: Path) -> dict[str, Any]:
    """Train with TRL's trainer in the TRL venv (`benchmarks/trl_worker.py`); return its timings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "trainer": trainer,
        "config": trl_config(s, trainer),
        "policy": s.policy,
        "reward_model": s.reward_model,
        "budget_s": s.budget_s,
        "threads": s.threads,
        "out_dir": str(out_dir),
    }
    (out_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    env = {**os.environ, "OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads)}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="warning")
    log = out_dir / "worker.log"
    with log.open("w") as f:
        done = subprocess.run(
            [str(python), "-m", "benchmarks.trl_worker", str(out_dir / "spec.json")],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if done.returncode:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"TRL {TRAINERS[trainer]} failed (exit {done.returncode}); {log}:\n{tail}")
    return {**json.loads((out_dir / "result.json").read_text()), "config": spec["config"]}


def evaluate_saved(s: Settings, policy_dirs: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Evaluate each saved policy the same way: our env (pi_ref, reward model, beta), same prompts and seed."""
    import torch
    from transformers import AutoModelForCausalLM

    from agents.base import evaluate_policy

    torch.set_num_threads(s.threads)
    envs = shared_envs(s)
    results = {}
    for name, path in policy_dirs.items():
        envs.set_policy(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
        metrics = evaluate_policy(envs, num_episodes=s.eval_episodes, seed=s.eval_seed)
        results[name] = {
            key: metrics[key] for key in ("gold_score", "rm_score", "kl", "reward", "length", "episodes")
        }
    return results


def _summary(raw: dict[str, Any], s: Settings) -> dict[str, Any]:
    """s/iteration (median after warm-up), the median of each part, and the raw per-iteration seconds."""
    steps = raw.pop("steps")
    keys = sorted({key for step in steps for key in step} - {"seconds", "cpu_seconds"})
    seconds = [step["seconds"] for step in steps]
    return {
        **raw,
        "s_per_iter": _median_after_warmup(seconds, s.warmup),
        "cpu_s_per_iter": _median_after_warmup([step["cpu_seconds"] for step in steps], s.warmup),
        "iterations": len(steps),
        "breakdown": {
            key: _median_after_warmup([st.get(key, 0.0) for st in steps], s.warmup) for key in keys
        },
        "seconds_per_iteration": [round(x, 4) for x in seconds],
        "early_s_per_iter": early_s_per_iter(seconds, s.warmup),
    }


def early_s_per_iter(seconds: list[float], warmup: int) -> float:
    """Median s/iteration over the first `EARLY_ITERATIONS` after warm-up, while every policy still writes
    pi_ref's response lengths: the same work on each side. Later iterations cost what each policy has
    learned to write (a policy that learns faster writes longer answers sooner), so the whole-budget median
    mixes speed with learning."""
    return _median_after_warmup(seconds[: warmup + EARLY_ITERATIONS], warmup)


def run(
    quick: bool = False, budget_s: float | None = None, prompts_per_batch: int | None = None
) -> dict[str, Any]:
    """The whole comparison; returns a JSON-serialisable dict (see `markdown`) and writes
    trl_compare_<batch>.json."""
    import platform

    import torch

    s = settings(quick, budget_s, prompts_per_batch)
    torch.set_num_threads(s.threads)
    pipeline_outputs()  # on a fresh clone, trains pi_ref and the reward model first
    start = time.perf_counter()
    python = setup_trl_venv()
    setup_seconds = time.perf_counter() - start
    out = OUT / f"trl_compare_{s.batch}"
    sides: dict[str, dict[str, Any]] = {}
    print(f"[trl_compare] ours: REINFORCE/RLOO for {s.budget_s:g} s", flush=True)
    sides["ours"] = _summary(run_ours(s, out / "ours"), s)
    for trainer, name in TRAINERS.items():
        print(f"[trl_compare] TRL {name} for {s.budget_s:g} s", flush=True)
        sides[f"trl_{trainer}"] = _summary(run_trl(s, trainer, python, out / f"trl_{trainer}"), s)
    print("[trl_compare] evaluating every policy on the same held-out prompts", flush=True)
    policies = {"pi_ref": Path(s.policy), **{name: out / name / "policy" for name in sides}}
    evals = evaluate_saved(s, policies)
    for name, side in sides.items():
        side["eval"] = evals[name]
    ours, rloo = sides["ours"], sides["trl_rloo"]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {s.threads} torch thread(s) per side, "
        f"torch {torch.__version__}, python {platform.python_version()}",
        "trl_version": rloo.get("trl_version", TRL_VERSION),
        "quick": quick,
        "settings": {**dataclasses.asdict(s), "batch": s.batch},
        "setup_seconds": setup_seconds,
        "pi_ref": {"eval": evals["pi_ref"]},
        **sides,
        "ratio_trl_rloo_over_ours": rloo["s_per_iter"] / ours["s_per_iter"],
        "early_ratio_trl_rloo_over_ours": rloo["early_s_per_iter"] / ours["early_s_per_iter"],
        "ratio_trl_grpo_over_ours": sides["trl_grpo"]["s_per_iter"] / ours["s_per_iter"],
        "cpu_ratio_trl_rloo_over_ours": rloo["cpu_s_per_iter"] / ours["cpu_s_per_iter"],
        "must_hold": {
            "ours_at_least_2x_faster_than_trl_rloo": rloo["s_per_iter"] >= 2 * ours["s_per_iter"],
            "ours_gold_at_least_trl_rloo": ours["eval"]["gold_score"] >= rloo["eval"]["gold_score"],
        },
        "notes": NOTES,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"trl_compare_{s.batch}.json").write_text(json.dumps(result, indent=2, default=float))
    (OUT / f"trl_compare_{s.batch}.md").write_text(markdown(result))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (8 s each, 64 eval episodes)")
    parser.add_argument("--budget", type=float, default=None, help="training seconds per side (default 60)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per batch (default 16; x k = 4)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = run(quick=args.quick, budget_s=args.budget, prompts_per_batch=args.prompts)
    print(f"machine: {result['machine']}")
    print(markdown(result))
    batch = result["settings"]["batch"]
    print(f"written: {OUT / f'trl_compare_{batch}.json'}")
    return result


if __name__ == "__main__":
    main()
