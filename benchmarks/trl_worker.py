"""Train with TRL's `RLOOTrainer` or `GRPOTrainer` for a wall-clock budget; runs INSIDE the TRL venv.

`benchmarks/trl_compare.py` starts this in the separate environment it builds (TRL is no dependency of the
project) with a JSON spec: which trainer, the `RLOOConfig`/`GRPOConfig` keyword arguments it derived from our
REINFORCE agent's settings, the pi_ref and reward-model directories, the budget. It writes the trained
policy (`trainer.save_model`) and a JSON of per-iteration seconds; the driver evaluates the policy in the
project's own venv, exactly as it evaluates ours.

Timing: an iteration is the interval between two `on_step_end` events (the first from `on_train_begin`), so
it holds everything TRL does per step: generation, reward model, reference and policy forwards, the update
and TRL's own default logging (`other_s`: all but generation and the reward model). Its CPU seconds
(`time.process_time`) are kept beside the wall seconds: on a shared machine they do not count the time other
jobs held the core. The budget is checked at each step end, as our agent checks it.

    python -m benchmarks.trl_worker SPEC.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from benchmarks.common import timed_calls  # the project is installed in the TRL venv too

__all__ = ["BudgetCallback", "main"]

#: The trainer arguments that decide speed, as TRL resolved them, written beside the timings for the record.
EFFECTIVE_KEYS = (
    "optim lr_scheduler_type gradient_checkpointing bf16 fp16 use_vllm generation_batch_size "
    "steps_per_generation num_generations num_iterations per_device_train_batch_size "
    "gradient_accumulation_steps logging_steps report_to"
).split()


class BudgetCallback(TrainerCallback):
    """Record the seconds of every training step and stop once `budget_s` of training has passed."""

    def __init__(self, budget_s: float, parts: dict[str, float]) -> None:
        self.budget_s, self.parts = budget_s, parts  # parts: the running step's breakdown (timed_calls)
        self.steps: list[dict[str, float]] = []
        self.start = self.last = self.last_cpu = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last = time.perf_counter()
        self.last_cpu = time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        now, cpu = time.perf_counter(), time.process_time()
        seconds = now - self.last
        other = seconds - self.parts.get("generate_s", 0.0) - self.parts.get("reward_model_s", 0.0)
        self.steps.append(
            {"seconds": seconds, "cpu_seconds": cpu - self.last_cpu, **self.parts, "other_s": other}
        )
        self.parts.clear()
        self.last, self.last_cpu = now, cpu
        if now - self.start >= self.budget_s:
            control.should_training_stop = True
        return control


def main(argv: list[str] | None = None) -> int:
    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    torch.set_num_threads(spec["threads"])  # OMP_NUM_THREADS is set by the driver as well
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer

    from reward_models import load_reward_model
    from text_env.tasks import get_task

    trainer_name, out_dir = spec["trainer"], Path(spec["out_dir"])
    tokenizer = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")
    reward_model = load_reward_model(spec["reward_model"], device="cpu")

    def reward_model_score(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        """Our learned reward model, batched, on TRL's decoded completions (as the env scores ours)."""
        scores = reward_model.score(list(prompts), list(completions))
        return [float(s) for s in (scores.tolist() if hasattr(scores, "tolist") else scores)]

    dataset = Dataset.from_dict({"prompt": list(get_task("reviews").prompts)})
    config_cls = {"rloo": trl.RLOOConfig, "grpo": trl.GRPOConfig}[trainer_name]
    trainer_cls = {"rloo": trl.RLOOTrainer, "grpo": trl.GRPOTrainer}[trainer_name]
    args = config_cls(output_dir=str(out_dir / "trainer"), **spec["config"])
    parts: dict[str, float] = {}
    callback = BudgetCallback(spec["budget_s"], parts)
    trainer = trainer_cls(
        model=spec["policy"],
        reward_funcs=reward_model_score,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    # A breakdown of each step: sampling and the reward model (instance attributes shadow the methods).
    trainer._generate = timed_calls(trainer._generate, parts, "generate_s")
    trainer._calculate_rewards = timed_calls(trainer._calculate_rewards, parts, "reward_model_s")
    trainer.train()
    trainer.save_model(str(out_dir / "policy"))
    tokenizer.save_pretrained(str(out_dir / "policy"))
    result = {
        "trainer": trainer_cls.__name__,
        "trl_version": trl.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "train_seconds": callback.last - callback.start,
        "steps": callback.steps,
        "effective_config": {key: getattr(args, key) for key in EFFECTIVE_KEYS},
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
