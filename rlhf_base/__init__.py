"""Floor 1 of rlhf-gym: the shared pieces every other package builds on, and that import none of them.

- `maths`: GAE, whitening, KL estimators, log-probs from logits, the Bradley-Terry loss.
- `best_of_n`: best-of-n's distribution on a finite space and its KL, exact and estimated from samples.
- `metrics`: the metric names (`METRIC_KEYS`, `OPTIONAL_METRIC_KEYS`) from the env's info through the agents to the sweep's CSVs.
- `lm`: forward-pass helpers for any causal LM (position ids, teacher forcing, length groups).
- `models`: loading a causal LM and its tokenizer (built-in names, local dirs, hub ids, GGUF), devices.
- `lora`: LoRA adapters through peft (the config, wrapping, pi_ref as the policy with its adapter off,
  adapter save/load).
- `config`: typed config dataclasses from YAML and dotted overrides, with errors that say where.
- `ranges`: each numeric config field's valid range (`RANGES`), checked at load and in `__post_init__`.
- `io`: atomic writes, safetensors, record files (JSONL/JSON/CSV/Parquet).
- `optim`: the one Adam every trainer uses.
- `runlog`: the one run logger: a run's scalars to CSV (flushed row by row), JSON lines and TensorBoard.
- `checkpoint`: training state (weights, optimiser, RNGs, counters) as safetensors + JSON, written atomically.
- `fingerprint`: content hashes of input files and folders, cached by size and times.
- `processes`: child processes that exit when their parent dies (a sweep's pool workers).
- `deprecation`: aliases that keep moved public names working, with a warning that names the new place.

See `docs/architecture.md` for the floors above it.
"""
