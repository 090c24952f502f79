"""`rlhf-gym train --agent NAME`: train one agent on the env and write its metrics and policy to a run folder.

Checkpoints and resume (issue 13): every `checkpoint_every` iterations, and at the last, the run folder gets
`checkpoints/iteration-NNNNNN/` (`rlhf_base.checkpoint`: safetensors + JSON, written atomically, the older
ones deleted after): the agent's `state_dict()` (weights, optimiser, its RNGs and counters, the env's beta
and prompt RNG, the metrics so far), the process's global RNGs, and the pi_ref evaluation of the start.
`train(..., resume=True)` rebuilds the env and agent from the run's env.yaml and agent.yaml, loads the
latest checkpoint, cuts metrics.csv/metrics.jsonl back to its iteration (TensorBoard hides the later
events), and runs the remaining iterations: on the same device and threads, the result is the one an
uninterrupted run gives, to the bit (`tests/test_checkpoint.py`), except the clock columns (`wall_time`
counts from the resume, SB3's tokens/s).

Several processes (issue 15): launched by torchrun (`torchrun --nproc-per-node W -m rlhf_gym.cli train ...`),
every process runs this function as one rank of a process group (`rlhf_base.distributed.process_group`:
gloo on the CPU, NCCL on CUDA with each rank on `cuda:LOCAL_RANK`). `env.num_envs` stays the global batch:
each rank builds its env with `num_envs / W` rows (an error if W does not divide it) and the agent, one that
declares `distributed = True` (PPO, REINFORCE; the others are refused), keeps the ranks in step. Rank 0
alone writes the run folder (configs, metrics, checkpoints, policy, summary); the others compute with it and
wait for it at the end. A checkpoint also holds every rank's own RNG streams, so `--resume` works under
torchrun with the same number of processes (another number is refused: the streams would not match).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from agents.base import CHECKPOINT_METHODS, check_num_envs, supports_checkpoints, supports_distributed
from agents.registry import get_agent_class, resolve_config
from rlhf_base.checkpoint import (
    CHECKPOINTS_DIR,
    CheckpointError,
    global_rng_state,
    latest_checkpoint,
    load_state,
    set_global_rng_state,
    write_checkpoint,
)
from rlhf_base.config import ConfigError, config_to_dict, load_config, save_config
from rlhf_base.distributed import (
    barrier,
    gather_objects,
    launched_world_size,
    process_group,
    rank,
    world_size,
)
from rlhf_base.io import atomic_write
from rlhf_base.runlog import RunLog
from rlhf_gym.pipeline import check_env_paths
from text_env.config import EnvConfig

__all__ = ["DEFAULT_CHECKPOINT_EVERY", "train"]

#: Iterations between checkpoints when `train` is not told (for agents with `state_dict`/`load_state_dict`).
DEFAULT_CHECKPOINT_EVERY = 5
#: The parts of an agent's `state_dict()` that are the same on every rank (its weights, optimiser and metrics):
#: a checkpoint holds them once, from rank 0, and every other part (RNG streams, the env's state) per rank.
SHARED_STATE = ("policy", "value_head", "optimizer", "history")


def _split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """`env.beta=0.1` goes to the env config, everything else to the agent's."""
    env = [o.removeprefix("env.") for o in overrides if o.startswith("env.")]
    return env, [o for o in overrides if not o.startswith("env.")]


def _first_difference(saved: Any, now: Any, path: str = "") -> str | None:
    """The first dotted key whose value differs between two `config_to_dict` trees, with both values."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in [*saved, *(k for k in now if k not in saved)]:
            found = _first_difference(saved.get(key), now.get(key), f"{path}{key}.")
            if found:
                return found
        return None
    return None if saved == now else f"{path.rstrip('.')} is {now!r} now, {saved!r} in the run"


def _resume_configs(
    run_dir: Path,
    agent_cls: type,
    agent_config: Any,
    env_config: Any,
    env_over: list[str],
    agent_over: list[str],
) -> tuple[EnvConfig, Any]:
    """The run's saved configs; what is given now (files, overrides) must resolve to the same, or an error."""
    saved_env = load_config(EnvConfig, run_dir / "env.yaml")
    saved_agent = resolve_config(agent_cls, run_dir / "agent.yaml")
    env_cfg = load_config(EnvConfig, env_config or run_dir / "env.yaml", env_over)
    cfg = resolve_config(agent_cls, agent_config or run_dir / "agent.yaml", agent_over)
    for what, saved, now in (("env.", saved_env, env_cfg), ("", saved_agent, cfg)):
        difference = _first_difference(config_to_dict(saved), config_to_dict(now))
        if difference:
            raise ConfigError(
                f"--resume: {what}{difference} ({run_dir}/{'env' if what else 'agent'}.yaml); a resumed run "
                "keeps its config: pass the same settings, or none (--resume alone reloads them)"
            )
    return env_cfg, cfg


def _checkpoint_interval(agent_cls: type, agent_name: str, checkpoint_every: int | None, resume: bool) -> int:
    """Iterations between checkpoints (0: none), or an error if the agent cannot be checkpointed as asked."""
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or checkpoint_every < 0):
        raise ValueError(
            f"checkpoint_every must be an integer >= 0 (0: no checkpoints), got {checkpoint_every!r}"
        )
    if supports_checkpoints(agent_cls):
        return DEFAULT_CHECKPOINT_EVERY if checkpoint_every is None else int(checkpoint_every)
    methods = " and ".join(f"{m}()" for m in CHECKPOINT_METHODS)
    if resume or checkpoint_every:
        raise CheckpointError(
            f"agent {agent_name!r} ({agent_cls.__name__}) has no {methods}, which checkpoints and --resume "
            "need (see agents.base.Agent); add them, or train with --checkpoint-every 0 and without --resume"
        )
    if checkpoint_every is None:
        warnings.warn(
            f"agent {agent_name!r} has no {methods}: train writes no checkpoints for it and cannot resume it "
            "(pass checkpoint_every=0, --checkpoint-every 0, to say that is intended)",
            stacklevel=3,
        )
    return 0


def _check_distributed(agent_cls: type, agent_name: str, env_cfg: EnvConfig, ranks: int) -> None:
    """Under torchrun: an agent that trains over several processes and a batch that splits evenly, or an error."""
    if not supports_distributed(agent_cls):
        raise ConfigError(
            f"agent {agent_name!r} does not train over several processes (launched by torchrun with "
            f"WORLD_SIZE={ranks}): only agents declaring `distributed = True` do (ppo, reinforce); run it as one process"
        )
    if env_cfg.num_envs % ranks:
        raise ConfigError(
            f"env.num_envs={env_cfg.num_envs} (the global batch) does not split over {ranks} processes: "
            f"choose a multiple of {ranks}, or another --nproc-per-node"
        )


def _rank_state(agent: Any) -> dict[str, Any]:
    """What of a checkpoint is this rank's own: the agent's state but `SHARED_STATE`, and the global RNGs."""
    state = {k: v for k, v in agent.state_dict().items() if k not in SHARED_STATE}
    return {"agent": state, "rng": global_rng_state()}


def train(
    agent_name: str,
    run_dir: str | Path,
    agent_config: str | Path | None = None,
    env_config: str | Path | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> list[dict[str, float]]:
    """Build the env and agent from configs, learn, evaluate, save; every iteration's metrics land on disk.

    `agent_config` and `env_config` are YAML files overriding the defaults of the agent's `Config` and of
    `EnvConfig` (None: the defaults, which suit the default task); `overrides` go to the agent, or to the
    env with an `env.` prefix.

    Args:
        checkpoint_every: write `run_dir/checkpoints/iteration-NNNNNN/` every this many iterations and at
            the last (0: none). None: `DEFAULT_CHECKPOINT_EVERY` for an agent with `state_dict` and
            `load_state_dict`, none (with a warning) for one without.
        resume: continue the run in `run_dir` from its latest checkpoint (see the module docstring); the
            configs default to the run's own, and any given must resolve to them. False: start afresh,
            deleting the folder's old checkpoints.

    Returns:
        The metrics of every iteration of the run (a resumed run's restored ones included).

    Raises:
        ConfigError: a config is invalid (a bad key or value, or a local path the env config names that
            does not exist), or (resume) differs from the run's.
        CheckpointError: (resume) the folder has no checkpoint or one of another agent, or one written by
            another number of processes; or the agent has no `state_dict`/`load_state_dict` and checkpoints
            or a resume were asked for.

    Under torchrun, every rank calls this (see the module docstring); each returns the same metrics.
    """
    run_dir = Path(run_dir)
    env_over, agent_over = _split_overrides(list(overrides or []))
    agent_cls = get_agent_class(agent_name)
    every = _checkpoint_interval(agent_cls, agent_name, checkpoint_every, resume)
    checkpoints = run_dir / CHECKPOINTS_DIR
    if resume:
        found = latest_checkpoint(checkpoints)
        if found is None:
            raise CheckpointError(
                f"--resume: no checkpoint in {checkpoints}, nothing to resume; start the run again without --resume"
            )
        state = load_state(found)
        if state["train"]["agent"] != agent_name:
            raise CheckpointError(
                f"--resume: {found} is a checkpoint of agent {state['train']['agent']!r}, not {agent_name!r}"
            )
        env_cfg, cfg = _resume_configs(run_dir, agent_cls, agent_config, env_config, env_over, agent_over)
    else:
        env_cfg = load_config(EnvConfig, env_config, env_over)
        cfg = resolve_config(agent_cls, agent_config, agent_over)

    check_num_envs(agent_cls, cfg, env_cfg.num_envs)  # e.g. samples_per_prompt must divide num_envs
    ranks = launched_world_size()
    if ranks > 1:
        _check_distributed(agent_cls, agent_name, env_cfg, ranks)
    if resume and state["train"].get("world_size", 1) != ranks:
        raise CheckpointError(
            f"--resume: {found} was written by {state['train'].get('world_size', 1)} process(es), and this is "
            f"{ranks}: each process's RNG streams are in it, so resume with as many (torchrun --nproc-per-node)"
        )
    check_env_paths(env_cfg, env_config)  # a missing model or reward model fails now, saying what makes it
    resume_from = (found, state) if resume else None
    with process_group(env_cfg.device) as device:
        return _train_in_group(
            agent_name, agent_cls, run_dir, env_cfg, cfg, device, every, progress, resume_from
        )


def _train_in_group(
    agent_name: str,
    agent_cls: type,
    run_dir: Path,
    env_cfg: EnvConfig,
    cfg: Any,
    device: str | None,
    every: int,
    progress: bool,
    resume_from: tuple[Path, dict[str, Any]] | None,
) -> list[dict[str, float]]:
    """`train` from building the env on, in this rank of the process group (or as the one process).

    `resume_from` is the checkpoint to resume from, its folder and state (None: a fresh run); `device` is
    this rank's (`process_group`).
    """
    resume, checkpoints = resume_from is not None, run_dir / CHECKPOINTS_DIR
    ranks, lead = world_size(), rank() == 0  # lead: the rank that writes the run folder
    rank_env = env_cfg  # the global batch; a rank's env has its share of it, on its device
    if ranks > 1:
        rank_env = dataclasses.replace(env_cfg, num_envs=env_cfg.num_envs // ranks, device=device)
    if not lead:
        barrier()  # rank 0 loads first: it may build or download a model into a cache the others then read
    envs = rank_env.make()  # before the folder is touched: a bad model or reward loses nothing written
    if lead:
        barrier()
    agent = agent_cls(envs, cfg)
    if not resume and lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(env_cfg, run_dir / "env.yaml")
        save_config(cfg, run_dir / "agent.yaml")
        shutil.rmtree(checkpoints, ignore_errors=True)  # an earlier run's: --resume must never pick them up
    total = getattr(cfg, "iterations", None)  # the budget learn() runs by default
    done: list[dict[str, float]] = []
    if resume_from is not None:  # after building, which draws from the global RNGs: the saved replace them
        found, state = resume_from
        own = state["ranks"][rank()] if ranks > 1 else {"agent": {}, "rng": state["rng"]}
        agent.load_state_dict({**state["agent"], **own["agent"]})
        set_global_rng_state(own["rng"])
        baseline, done = state["train"]["reference"], list(agent.history)
        if total is None:
            raise CheckpointError(f"--resume needs the iteration budget, {type(cfg).__name__}.iterations")
        if progress and lead:
            print(f"[{agent_name}] resuming after iteration {len(done)} from {found}", flush=True)
    else:
        baseline = agent.evaluate(num_episodes=env_cfg.num_envs * 2, seed=10_000)
    # A row per iteration as it comes: metrics.csv, metrics.jsonl, and tensorboard/ under "AGENT/" (rank 0's).
    run_log = RunLog(
        run_dir if lead else None,
        csv="metrics.csv",
        jsonl="metrics.jsonl",
        prefix=f"{agent_name}/",
        resume=len(done) if resume else None,
        step_key="iteration",
    )
    start = time.perf_counter()

    def log(agent_, metrics: dict[str, float]) -> None:
        step = int(metrics["iteration"])
        run_log.log({"agent": agent_name, **metrics}, step)
        if every and (step % every == 0 or step == total):  # after the row: a checkpoint's rows are on disk
            own = gather_objects(_rank_state(agent_)) if ranks > 1 else None  # every rank's RNG streams
            if lead:
                run = {"agent": agent_name, "iteration": step, "reference": baseline, "world_size": ranks}
                checkpoint = {"agent": agent_.state_dict(), "rng": global_rng_state(), "train": run}
                if own is not None:
                    checkpoint["ranks"] = own
                write_checkpoint(checkpoints, step, checkpoint)
        if progress and lead:
            print(
                f"[{agent_name}] it {step:3d}  rm {metrics['rm_score']:+.3f}  gold {metrics['gold_score']:+.3f}  "
                f"kl {metrics['kl']:.3f}  len {metrics['length']:.1f}  ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )

    with run_log:
        if resume:
            history = done + agent.learn(iterations=max(0, total - len(done)), callback=log)
        else:
            history = agent.learn(callback=log)
    final = agent.evaluate(num_episodes=env_cfg.num_envs * 2, seed=10_000)
    if not lead:
        barrier()  # the run folder is rank 0's to write; the others wait for it
        return history
    agent.save(run_dir / "policy")
    summary = {
        "agent": agent_name,
        "reference": baseline,
        "final": final,
        "seconds": time.perf_counter() - start,
    }
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
    barrier()
    if progress:
        print(
            f"[{agent_name}] pi_ref: rm {baseline['rm_score']:+.3f} gold {baseline['gold_score']:+.3f} | "
            f"trained: rm {final['rm_score']:+.3f} gold {final['gold_score']:+.3f} kl {final['kl']:.3f} "
            f"-> {run_dir}"
        )
    return history
