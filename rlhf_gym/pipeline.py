"""`rlhf-gym pipeline`: pretrain -> SFT -> label pairs -> reward model -> agents -> report, in one run folder.

Every stage's output is keyed by a fingerprint of its own config and of the stage before it, recorded in
`stages.json`; a stage whose fingerprint and output are already there is skipped, so rerunning after a
change redoes exactly the stages downstream of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reward_models.train import RewardTrainConfig, train_reward_model
from rlhf_base.config import ConfigError, config_to_dict, save_config
from rlhf_base.deprecation import moved_names
from rlhf_base.io import atomic_write
from rlhf_gym.configs import CONFIGS_DIR
from rlhf_gym.label import LabelConfig, label_pairs
from rlhf_gym.sft import SFTConfig, run_sft
from rlhf_gym.sweep import SweepConfig, cell_configs, check_cells, expand_cells, run_sweep
from text_env.config import EnvConfig

__all__ = ["STAGES", "PipelineConfig", "check_env_paths", "run_pipeline", "with_pairs"]

STAGES = ("pretrain", "sft", "label", "reward_model", "agents", "report")
#: What a pipeline leaves in its run folder (runs/NAME/...) that an env config can name: pi_ref, the RM.
ENV_OUTPUTS = ("sft", "reward_model")


@dataclass
class PipelineConfig:
    """The whole RLHF run; each section is that stage's own config."""

    name: str = "default"  # runs/<name>/ holds every stage's output
    runs_root: str = "runs"  # parent folder of run folders
    device: str = "cpu"  # for every stage: "cpu", "cuda", "auto"
    sft: SFTConfig = field(default_factory=SFTConfig)  # step 1: demonstrations -> pi_ref
    label: LabelConfig = field(default_factory=LabelConfig)  # step 2a: pi_ref samples -> preference pairs
    reward_model: RewardTrainConfig = field(default_factory=RewardTrainConfig)  # step 2b: pairs -> r(x, y)
    agents: SweepConfig = field(default_factory=SweepConfig)  # step 3: agents x betas x seeds on the env


def _pipeline_command(path: str) -> str | None:
    """The command whose pipeline writes `path` (RUNS_ROOT/NAME/sft or reward_model), if it is one."""
    parts = Path(path).parts
    if len(parts) < 3 or parts[0] != PipelineConfig.runs_root or parts[2] not in ENV_OUTPUTS:
        return None
    if parts[1] == PipelineConfig.name:
        return "`rlhf-gym pipeline` (or `make demo`)"
    return f"`rlhf-gym pipeline name={parts[1]}`"


def check_env_paths(env: EnvConfig, source: str | Path | None = None) -> None:
    """Fail now, with a hint, if `env` names a local file that is not there: a sweep or a training run would
    otherwise fail later, in a worker, after building models or running the cells before it.

    Checks `env.prompts`, `env.reward_model` and `env.gold_reward` when they name a path (not a
    `module:attr` object or an `hf:` dataset), and `env.model` when it is a local path (`is_local_model`; a
    hub id or built-in name is left to the loader).

    Args:
        source: the config file the env came from, named in the hint (a built-in one as configs/NAME.yaml).

    Raises:
        ConfigError: a named path does not exist; when it is a pipeline's output (runs/NAME/sft or
            reward_model, as `configs/sweep.yaml` names), the message says to run the pipeline first.
    """
    from rlhf_base.models import is_local_model
    from rlhf_base.plugins import is_import_spec

    def local(value: str | None) -> str | None:
        """`value` if it names a file or folder; None for a Python object (`module:attr`), a hub dataset
        (`hf:NAME`) or the gold reward's words (`task`, `none`), which their loaders check."""
        if value is None or is_import_spec(value) or str(value).startswith("hf:"):
            return None
        return None if value in ("task", "none") else value

    named = {"model": env.model if env.model is not None and is_local_model(env.model) else None}
    named |= {key: local(getattr(env, key)) for key in ("reward_model", "gold_reward", "prompts")}
    missing = {key: str(path) for key, path in named.items() if path is not None and not Path(path).exists()}
    if not missing:
        return
    message = "; ".join(f"the file {path} named by env.{key} does not exist" for key, path in missing.items())
    message += f" (relative to {Path.cwd()})"
    if source is not None and Path(source).resolve().parent == CONFIGS_DIR:
        source = f"configs/{Path(source).name}"
    made_by: dict[str, list[str]] = {}
    for path in missing.values():
        if command := _pipeline_command(path):
            made_by.setdefault(command, []).append(path)
    for command, paths in made_by.items():
        if source is not None:
            message += f"; `{source}` uses the pipeline's outputs: run {command} first"
        else:
            outputs = "are the pipeline's outputs" if len(paths) > 1 else "is the pipeline's output"
            message += f"; {' and '.join(paths)} {outputs}: run {command} first"
    raise ConfigError(message)


class _Stages:
    """The fingerprints of finished stages, persisted after each one (a crash keeps the finished ones)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "stages.json"
        self.done: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def fresh(self, stage: str, fingerprint: str, output: Path) -> bool:
        return self.done.get(stage) == fingerprint and output.exists()

    def finish(self, stage: str, fingerprint: str) -> None:
        self.done[stage] = fingerprint
        atomic_write(self.path, json.dumps(self.done, indent=2))


def _base_model_key() -> str:
    """The built-in model's cache key: SFT's fingerprint covers it, so a rebuilt model redoes SFT."""
    from text_env.tasks.reviews.pretrain import cache_key

    return cache_key()


def _fingerprint(*parts: Any) -> str:
    blob = json.dumps(
        [config_to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def with_pairs(sweep: SweepConfig, pairs: Path) -> SweepConfig:
    """`sweep` with `AGENT.pairs=<pairs>` added for each agent whose Config declares a `pairs` field that no
    cell sets (DPO trains on the very preference pairs the reward model was trained on).

    A value the user gave (an override, a grid axis, the agent's file in `agent_configs`) is kept. The pairs
    file then enters the cells' identity (its path and content), as every input file does.
    """
    from agents.registry import config_fields, get_agent_class

    cells, added = expand_cells(sweep), []
    for agent in sweep.agents:
        if "pairs" not in config_fields(get_agent_class(agent)):
            continue
        if all(cell_configs(cell, sweep)[2].pairs is None for cell in cells if cell.agent == agent):
            added.append(f"{agent}.pairs={pairs}")
    return dataclasses.replace(sweep, overrides=[*sweep.overrides, *added]) if added else sweep


def run_pipeline(config: PipelineConfig, progress: bool = True, until: str = "report") -> dict[str, Any]:
    """Run every stage that is not already done; return the paths of what it produced.

    Args:
        until: the last stage to run: "sft", "label", "reward_model" or "report" (all). "reward_model" gives
            pi_ref and the reward model without the long agents sweep, as benchmarks need (trl_compare.py).
    """
    if until not in ("sft", "label", "reward_model", "report"):
        raise ValueError(f"until={until!r}; valid: 'sft', 'label', 'reward_model', 'report'")
    if until == "report":
        check_cells(expand_cells(config.agents), config.agents)  # a bad agent key fails now, not after SFT
    run_dir = Path(config.runs_root) / config.name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "pipeline.yaml")
    stages, start = _Stages(run_dir), time.perf_counter()

    def say(stage: str, text: str) -> None:
        if progress:
            print(f"[pipeline {time.perf_counter() - start:6.0f}s] {stage}: {text}", flush=True)

    # 1. Pretrain (the default task only): the built-in model is cached outside the run folder.
    base = None  # what SFT starts from, when the pipeline knows its identity (the built-in model's cache key)
    if config.sft.model is None:
        from text_env.tasks.reviews.pretrain import pretrained_tiny_reviews

        say("pretrain", "tiny-reviews GPT-2 (built once, then cached)")
        pretrained_tiny_reviews()
        base = _base_model_key()

    # 2. SFT -> pi_ref (rebuilt when its config or the built-in model it starts from changes).
    sft_cfg = dataclasses.replace(config.sft, device=config.device)
    fp_sft = _fingerprint("sft", sft_cfg, base)
    sft_dir = run_dir / "sft"
    if stages.fresh("sft", fp_sft, sft_dir / "config.json"):
        say("sft", f"cached ({sft_dir})")
    else:
        say("sft", "fine-tuning on demonstrations")
        run_sft(sft_cfg, run_dir, progress=progress)
        stages.finish("sft", fp_sft)
    if until == "sft":
        return {"run_dir": run_dir, "sft": sft_dir}

    # 3. Label preference pairs sampled from pi_ref.
    label_cfg = dataclasses.replace(config.label, model=str(sft_dir))
    fp_label = _fingerprint("label", label_cfg, fp_sft)
    pairs_path = run_dir / "pairs.jsonl"
    if stages.fresh("label", fp_label, pairs_path):
        say("label", f"cached ({pairs_path})")
    else:
        from reward_models.data import write_pairs

        say("label", f"{label_cfg.num_pairs} pairs from pi_ref, tau={label_cfg.tau}")
        pairs, report = label_pairs(label_cfg, device=config.device, progress=progress)
        write_pairs(pairs, pairs_path)
        atomic_write(run_dir / "label_report.json", json.dumps(report, indent=2, default=float))
        say("label", f"labeller ceiling {report['ceiling']:.3f}")
        stages.finish("label", fp_label)
    if until == "label":
        return {"run_dir": run_dir, "sft": sft_dir, "pairs": pairs_path}

    # 4. Reward model (Bradley-Terry), normalised on pi_ref's samples.
    rm_cfg = dataclasses.replace(config.reward_model, pairs=str(pairs_path))
    if rm_cfg.logprob_features is not False and rm_cfg.logprob_model is None:
        # The head reads pi_ref's log-probs: the env's reference forward (for the KL) then gives them too.
        rm_cfg = dataclasses.replace(rm_cfg, logprob_model=str(sft_dir))
    fp_rm = _fingerprint("reward_model", rm_cfg, fp_label)
    rm_dir = run_dir / "reward_model"
    if stages.fresh("reward_model", fp_rm, rm_dir):
        say("reward_model", f"cached ({rm_dir})")
    else:
        say("reward_model", "Bradley-Terry training")
        rm, metrics = train_reward_model(
            str(pairs_path), rm_cfg, run_dir=run_dir / "rm_logs", device=config.device, progress=progress
        )
        rm.save(rm_dir)
        atomic_write(run_dir / "reward_model_metrics.json", json.dumps(metrics, indent=2, default=float))
        say("reward_model", f"held-out accuracy {metrics.get('eval_accuracy', float('nan')):.3f}")
        stages.finish("reward_model", fp_rm)
    if until == "reward_model":
        return {"run_dir": run_dir, "sft": sft_dir, "pairs": pairs_path, "reward_model": rm_dir}

    # 5. Agents: a sweep from pi_ref against the learned reward model.
    env = dataclasses.replace(
        config.agents.env, model=str(sft_dir), reward_model=str(rm_dir), device=config.device
    )
    sweep_cfg = dataclasses.replace(config.agents, env=env, runs_root=str(run_dir), name="agents")
    sweep_cfg = with_pairs(sweep_cfg, pairs_path)  # e.g. dpo.pairs: the pairs the reward model learnt from
    fp_agents = _fingerprint("agents", sweep_cfg, fp_rm)
    agents_dir = run_dir / "agents"
    say("agents", f"{', '.join(sweep_cfg.agents)} x beta {sweep_cfg.betas} x seeds {sweep_cfg.seeds}")
    # Resumes: a cell whose every setting and input (pi_ref's and the reward model's files included) is
    # unchanged keeps its record. `force`: the pipeline owns this folder and its config is the truth, so
    # the records of a changed stage or setting are set aside (agents/stale/) and those cells run again.
    run_sweep(sweep_cfg, progress=progress, force=True)
    stages.finish("agents", fp_agents)

    # 6. Report.
    from rlhf_gym.report import make_report

    paths = make_report(agents_dir)
    say("report", f"{paths['report']}")
    return {"run_dir": run_dir, **paths}


# The command line moved to rlhf_gym.cli (one CLI module); the old names work, with a warning.
__getattr__ = moved_names(__name__, {"add_pipeline_command": "rlhf_gym.cli", "print_summary": "rlhf_gym.cli"})
