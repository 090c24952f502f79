"""What every benchmark shares: the machine it ran on, timing of model forwards, and where results go.

Every figure is a rate or a ratio measured side by side in one run (the machine's load changes between
runs, so only figures from the same run compare). Results go to `benchmarks/out/` (git-ignored).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

OUT = Path(__file__).parent / "out"
ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / "runs" / "default"  # where the default pipeline (configs/default.yaml) leaves its stages


def pipeline_outputs() -> tuple[str, str]:
    """pi_ref and the learned reward model of the default pipeline; on a fresh clone, trained first (the
    pipeline up to the reward model, ~3 min, not its long agents sweep)."""
    policy, reward_model = RUN_DIR / "sft", RUN_DIR / "reward_model"
    if not ((policy / "config.json").is_file() and (reward_model / "reward_model.json").is_file()):
        from rlhf_base.config import load_config
        from rlhf_gym.configs import config_file
        from rlhf_gym.pipeline import PipelineConfig, run_pipeline

        print("[bench] no pi_ref / reward model yet: running the default pipeline up to the reward model")
        previous = os.getcwd()
        os.chdir(ROOT)  # the run folders, and the label stage's fingerprint, use paths relative to it
        try:
            run_pipeline(load_config(PipelineConfig, config_file("default")), until="reward_model")
        finally:
            os.chdir(previous)
    return str(policy), str(reward_model)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """The machine and software a run measured, printed and stored beside every result."""
    info = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a project dependency
        pass
    return info


def describe(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return (
        f"{info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads){gpu}; "
        f"torch {info['torch']}, transformers {info.get('transformers', '?')}, Python {info['python']}"
    )


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _no_wait() -> None:
    """Nothing is queued off CUDA: the CPU's kernels have run when a call returns."""


class ForwardTimer:
    """Wall time spent inside the forward calls of some top-level modules (policy, reference, reward model).

    Pre- and post-forward hooks time each call of the named modules; everything a rollout spends outside
    them (sampling, the env's buffers, host copies, tokenising, the gold reward) is its bookkeeping. On a
    GPU each hook synchronises, so a call's time is its kernels' time, not their launch.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.seconds = dict.fromkeys(modules, 0.0)
        self.calls = dict.fromkeys(modules, 0)
        self._handles: list[Any] = []
        self._modules = modules

    def __enter__(self) -> ForwardTimer:
        for name, module in self._modules.items():
            device = next(module.parameters()).device
            started: list[float] = []
            # Lean hooks: their own cost lands in the bookkeeping they measure (no sync off CUDA).
            wait = torch.cuda.synchronize if device.type == "cuda" else _no_wait

            def pre(_module, _args, _started=started, _wait=wait) -> None:
                _wait()
                _started.append(time.perf_counter())

            def post(_module, _args, _output, _name=name, _started=started, _wait=wait) -> None:
                _wait()
                self.seconds[_name] += time.perf_counter() - _started.pop()
                self.calls[_name] += 1

            self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def timed_calls(fn: Callable[..., Any], totals: dict[str, float], key: str) -> Callable[..., Any]:
    """`fn`, adding the wall time of each call to `totals[key]`; patch it in where a call is to be timed
    (e.g. `mock.patch.object(text_env, "rollout", timed_calls(text_env.rollout, totals, "rollout"))`)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - start

    return wrapper


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
