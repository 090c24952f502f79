"""`rlhf-gym train --agent NAME`: train one agent on the env and write its metrics and policy to a run folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

from agents.registry import get_agent_class, resolve_config
from rlhf_base.config import load_config, save_config
from rlhf_base.io import atomic_write
from rlhf_base.runlog import RunLog
from rlhf_gym.pipeline import check_env_paths
from text_env.config import EnvConfig

__all__ = ["train"]


def _split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """`env.beta=0.1` goes to the env config, everything else to the agent's."""
    env = [o.removeprefix("env.") for o in overrides if o.startswith("env.")]
    return env, [o for o in overrides if not o.startswith("env.")]


def train(
    agent_name: str,
    run_dir: str | Path,
    agent_config: str | Path | None = None,
    env_config: str | Path | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Build the env and agent from configs, learn, evaluate, save; every iteration's metrics land on disk.

    `agent_config` and `env_config` are YAML files overriding the defaults of the agent's `Config` and of
    `EnvConfig` (None: the defaults, which suit the default task); `overrides` go to the agent, or to the
    env with an `env.` prefix.

    Raises:
        ConfigError: a bad key or value, or a local path the env config names that does not exist.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env_over, agent_over = _split_overrides(list(overrides or []))
    env_cfg = load_config(EnvConfig, env_config, env_over)
    check_env_paths(env_cfg, env_config)  # a missing model or reward model fails now, saying what makes it
    agent_cls = get_agent_class(agent_name)
    cfg = resolve_config(agent_cls, agent_config, agent_over)
    save_config(env_cfg, run_dir / "env.yaml")
    save_config(cfg, run_dir / "agent.yaml")

    envs = env_cfg.make()
    agent = agent_cls(envs, cfg)
    baseline = agent.evaluate(num_episodes=envs.num_envs * 2, seed=10_000)
    # A row per iteration as it comes: metrics.csv, metrics.jsonl, and tensorboard/ under "AGENT/".
    run_log = RunLog(run_dir, csv="metrics.csv", jsonl="metrics.jsonl", prefix=f"{agent_name}/")
    start = time.perf_counter()

    def log(agent_, metrics: dict[str, float]) -> None:
        step = int(metrics["iteration"])
        run_log.log({"agent": agent_name, **metrics}, step)
        if progress:
            print(
                f"[{agent_name}] it {step:3d}  rm {metrics['rm_score']:+.3f}  gold {metrics['gold_score']:+.3f}  "
                f"kl {metrics['kl']:.3f}  len {metrics['length']:.1f}  ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )

    with run_log:
        history = agent.learn(callback=log)
    final = agent.evaluate(num_episodes=envs.num_envs * 2, seed=10_000)
    agent.save(run_dir / "policy")
    summary = {
        "agent": agent_name,
        "reference": baseline,
        "final": final,
        "seconds": time.perf_counter() - start,
    }
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
    if progress:
        print(
            f"[{agent_name}] pi_ref: rm {baseline['rm_score']:+.3f} gold {baseline['gold_score']:+.3f} | "
            f"trained: rm {final['rm_score']:+.3f} gold {final['gold_score']:+.3f} kl {final['kl']:.3f} "
            f"-> {run_dir}"
        )
    return history
