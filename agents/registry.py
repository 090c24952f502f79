"""Agents by name: `make_agent("ppo", envs, config)`, `available()`, and third-party agents by entry point.

An agent is a class with a `Config` dataclass attribute and `__init__(self, envs, config)`. Built-in
agents are listed as import strings so that `available()` imports nothing heavy; other packages add
theirs under the entry-point group `rlhf_gym.agents` (name = agent name, value = "module:Class").
"""

from __future__ import annotations

import dataclasses
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import gymnasium as gym

from agents.base import ENV_SETTINGS
from rlhf_base.config import config_from_dict, load_config
from rlhf_base.plugins import is_import_spec, load_object
from text_env.config import EnvConfig
from text_env.env import TextGenEnv
from text_env.vector_env import TextGenVectorEnv

__all__ = [
    "CONTRACT",
    "ENTRY_POINT_GROUP",
    "available",
    "check_agent_class",
    "config_fields",
    "get_agent_class",
    "make_agent",
    "register_agent",
    "resolve_config",
]

ENTRY_POINT_GROUP = "rlhf_gym.agents"

_REGISTRY: dict[str, str | type] = {
    "ppo": "agents.ppo:PPOAgent",
    "reinforce": "agents.reinforce:ReinforceAgent",
    "grpo": "agents.grpo:GRPOAgent",
    "dr_grpo": "agents.grpo:DrGRPOAgent",
    "remax": "agents.remax:ReMaxAgent",
    "reinforce_pp": "agents.reinforce_pp:ReinforcePPAgent",
    "best_of_n": "agents.best_of_n:BestOfNAgent",
    "raft": "agents.raft:RAFTAgent",
    "dpo": "agents.dpo:DPOAgent",
    "online_dpo": "agents.online_dpo:OnlineDPOAgent",
    "sb3_ppo": "agents.sb3:SB3PPOAgent",
    "sb3_a2c": "agents.sb3:SB3A2CAgent",
}


def register_agent(name: str, agent: str | type, *, overwrite: bool = False) -> None:
    """Add an agent class (or its "module:Class" path) under `name`."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"agent {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = agent


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Every agent name `make_agent` accepts: built-in, registered, and installed entry points."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def _load(target: str | type) -> type:
    if isinstance(target, type):
        return target
    return load_object(target, "agent")


#: What a class needs to be an agent every command can run (train, sweep, pipeline): the plugin contract.
CONTRACT = (
    "an agent is a class with a `Config` dataclass (every field with a default), __init__(self, envs, "
    "config), learn(self, iterations=None, callback=None) -> metrics per iteration (METRIC_KEYS at least), "
    "evaluate(self, num_episodes, seed) -> mean metrics, and save(self, path); see the README's "
    "'Bring your own agent'"
)


def check_agent_class(name: str, agent_cls: Any) -> type:
    """`agent_cls` if it meets `CONTRACT`, else a TypeError naming what is missing and the whole contract.

    Checked when an agent is looked up, so a plugin that lacks a piece fails before any cell runs, not
    after the cells before it have trained.
    """
    problems = []
    if not isinstance(agent_cls, type):
        problems.append(f"it is a {type(agent_cls).__name__}, not a class")
    else:
        config_cls = getattr(agent_cls, "Config", None)
        if config_cls is None or not dataclasses.is_dataclass(config_cls):
            problems.append("it has no `Config` dataclass attribute")
        else:
            required = [
                f.name
                for f in dataclasses.fields(config_cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            ]
            if required:
                problems.append(f"its Config has fields without defaults: {required}")
        missing = [m for m in ("learn", "evaluate", "save") if not callable(getattr(agent_cls, m, None))]
        if missing:
            problems.append(f"it has no {', '.join(f'{m}()' for m in missing)}")
    if problems:
        raise TypeError(f"agent {name!r} cannot run: {'; '.join(problems)}. {CONTRACT}")
    return agent_cls


def config_fields(agent_cls: type) -> set[str]:
    """The field names an agent's Config declares: all a sweep or a command may set on it."""
    return {f.name for f in dataclasses.fields(agent_cls.Config)}


def get_agent_class(name: str) -> type:
    """The class registered (or installed as an entry point) under `name`, checked against `CONTRACT`."""
    if name in _REGISTRY:
        return check_agent_class(name, _load(_REGISTRY[name]))
    eps = _entry_points()
    if name in eps:
        try:
            agent_cls = eps[name].load()
        except Exception as e:  # the plugin's own import failed: say which entry point and why
            raise ValueError(
                f"agent {name!r}: loading its entry point {eps[name].value!r} (group {ENTRY_POINT_GROUP}) "
                f"failed: {type(e).__name__}: {e}"
            ) from e
        return check_agent_class(name, agent_cls)
    if is_import_spec(name):  # an agent class named directly, as an entry point's value
        return check_agent_class(name, load_object(name, "agent"))
    raise ValueError(
        f"unknown agent {name!r}; {_did_you_mean(name)}available agents: {available()}, or a class as "
        "'package.module:Class'"
    )


def _did_you_mean(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, available(), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def resolve_config(agent_cls: type, config: Any = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Defaults, a YAML path, a mapping or an instance of `agent_cls.Config`; then dotted overrides."""
    config_cls = getattr(agent_cls, "Config", None)
    if config_cls is None or not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"agent class {agent_cls.__name__} needs a `Config` dataclass attribute")
    # The env's settings (beta, num_envs) have one owner: naming one in any agent's config says where it lives.
    own = {f.name for f in dataclasses.fields(config_cls)}
    moved = {key: where for key, where in ENV_SETTINGS.items() if key not in own}
    if config is None or isinstance(config, (str, Path)):
        return load_config(config_cls, config, overrides, moved_keys=moved)
    if isinstance(config, dict):
        where = f"in the config given for {agent_cls.__name__}"
        cfg = config_from_dict(config_cls, config, where=where, moved_keys=moved)
    elif isinstance(config, config_cls):
        cfg = config
    else:
        raise TypeError(
            f"config for {agent_cls.__name__} must be None, a YAML path, a dict or a {config_cls.__name__}; "
            f"got {type(config).__name__}"
        )
    if overrides:
        raise ValueError(
            "dotted overrides apply to a YAML path or the defaults; put them in the dict instead"
        )
    return cfg


def make_agent(name: str, env: Any, config: Any = None, *, num_envs: int | None = None) -> Any:
    """Build agent `name` on `env` (a `TextGenVectorEnv`, or a single env whose models it shares).

    Args:
        name: one of `available()`.
        env: the vector env to act on, whose `num_envs` is the agent's batch size; a single `TextGenEnv`
            (wrapped or not) is batched into a vector env of `num_envs` rows sharing its models.
        config: None (defaults), a YAML path, a dict, or the agent's `Config` instance.
        num_envs: the rows of the vector env built around a single env; default `EnvConfig.num_envs`
            (64). The env owns the batch size: agent configs take no `num_envs`, and a vector env keeps its
            own (passing a different one here is an error).
    """
    agent_cls = get_agent_class(name)
    cfg = resolve_config(agent_cls, config)
    if isinstance(env, TextGenVectorEnv):
        if num_envs is not None and num_envs != env.num_envs:
            raise ValueError(
                f"num_envs={num_envs} given for a vector env of {env.num_envs} rows: a vector env keeps its "
                "own batch size; build it with the rows you want (EnvConfig.num_envs, gym.make_vec(num_envs=...))"
            )
    elif isinstance(env, gym.Env) and isinstance(env.unwrapped, TextGenEnv):
        env = TextGenVectorEnv.sharing(env, num_envs=EnvConfig.num_envs if num_envs is None else num_envs)
    else:
        kind = type(getattr(env, "unwrapped", env)).__name__
        raise TypeError(f"env must be a text_env TextGenVectorEnv or TextGenEnv, got {kind}")
    return agent_cls(env, cfg)
