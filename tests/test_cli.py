"""The one command line (`rlhf_gym/cli.py`): every subcommand defined there, described, cheap to list, with
help examples that run, and errors in one line."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_base.io import DataError
from rlhf_gym import cli

ROOT = Path(__file__).resolve().parent.parent


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_stage_has_its_subcommand():
    names = set(_subparsers(cli.build_parser()))
    assert names == {
        "demo",
        "pipeline",
        "sft",
        "label",
        "train-rm",
        "train",
        "sweep",
        "report",
        "rollout",
        "bench",
        "rm-scaling",
    }


@pytest.mark.parametrize("name", sorted(_subparsers(cli.build_parser())))
def test_every_subcommand_and_option_is_described(name):
    parser = _subparsers(cli.build_parser())[name]
    assert parser.description and len(parser.description) > 20, name
    undocumented = [
        a.dest
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()
    ]
    assert undocumented == [], f"{name}: options without help: {undocumented}"


def test_the_command_list_describes_every_command_and_option():
    parser = cli.build_parser()
    assert parser.description and "--debug" in parser.format_help()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    listed = {a.dest: a.help for a in sub._choices_actions}
    assert set(listed) == set(sub.choices) and all((h or "").strip() for h in listed.values()), listed
    assert all((a.help or "").strip() for a in parser._actions if a is not sub)


# --------------------------------------------------------------------------------------------------------
# Every example the help shows is valid for its command's config
# --------------------------------------------------------------------------------------------------------
def _help_examples() -> list[list[str]]:
    """Every command line the help shows: the module docstring's (the top-level epilog), each command's
    backticked `rlhf-gym ...` in its description or epilog, and each KEY=VALUE example of the overrides."""
    examples = [shlex.split(line, comments=True)[1:] for line in cli.EXAMPLES]
    for name, parser in _subparsers(cli.build_parser()).items():
        for text in (parser.description or "", parser.epilog or ""):
            examples += [shlex.split(m)[1:] for m in re.findall(r"`(rlhf-gym [^`]+)`", text)]
        for action in parser._actions:
            if action.dest == "overrides":
                words = shlex.split(action.help.split("e.g. ", 1)[1])
                keys = [w for w in words[: next((i for i, w in enumerate(words) if "=" not in w), None)]]
                assert keys, f"{name}: the overrides' help shows no KEY=VALUE example"
                examples.append([name, *(["--agent", "ppo"] if name == "train" else []), *keys])
    return examples


def _check_example(argv: list[str]) -> None:
    """Parse `rlhf-gym ARGV` and build its command's config from it, as the handler would, without running."""
    from agents.registry import get_agent_class, resolve_config
    from reward_models.train import RewardTrainConfig
    from rlhf_base.config import load_config
    from rlhf_gym.label import LabelConfig
    from rlhf_gym.pipeline import PipelineConfig
    from rlhf_gym.sft import SFTConfig
    from rlhf_gym.sweep import SweepConfig, check_cells, expand_cells
    from rlhf_gym.train import _split_overrides
    from text_env.config import EnvConfig

    args = cli.build_parser().parse_args(argv)
    overrides = getattr(args, "overrides", [])
    stage = {"sft": SFTConfig, "label": LabelConfig, "train-rm": RewardTrainConfig}
    if args.command in stage:
        load_config(stage[args.command], args.config, overrides)
    elif args.command == "train":
        env_over, agent_over = _split_overrides(overrides)
        load_config(EnvConfig, args.env_config, env_over)
        resolve_config(get_agent_class(args.agent), args.config, agent_over)
    elif args.command == "rollout":
        load_config(EnvConfig, args.config, overrides)
    elif args.command == "rm-scaling":
        from rlhf_gym.rm_scaling import RMScalingConfig

        load_config(RMScalingConfig, args.config, overrides)
    elif args.command in ("sweep", "pipeline", "demo"):
        config = load_config(
            SweepConfig if args.command == "sweep" else PipelineConfig, args.config, overrides
        )
        grid = config if args.command == "sweep" else config.agents
        check_cells(expand_cells(grid), grid)
    else:
        assert not overrides, argv


def test_every_example_in_the_help_is_valid_for_its_command():
    examples = _help_examples()
    assert len(examples) >= len(cli.EXAMPLES) + 7 and {e[0] for e in examples} >= {
        "train-rm",
        "sweep",
        "demo",
    }
    for argv in examples:
        _check_example(argv)


def test_the_example_check_catches_another_commands_keys():
    from rlhf_base.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'tau'"):
        _check_example(["train-rm", "tau=0.1"])  # a label key shown as train-rm's example
    with pytest.raises(ConfigError, match="unknown key 'nosuch'"):
        _check_example(["sweep", "overrides=[ppo.nosuch=1]"])


def test_listing_the_commands_loads_no_model_library():
    """`rlhf-gym --help` builds every subparser; the stages (torch, transformers) load only when one runs."""
    code = (
        "import sys\nfrom rlhf_gym.cli import build_parser\nbuild_parser().format_help()\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'gymnasium', 'pandas', 'matplotlib') if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_a_bad_config_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: 1\nno_such_key: 1\n")
    assert cli.main(["sweep", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf-gym sweep: error: unknown key 'no_such_key' in ") and "line 2" in err
    assert "Traceback" not in err


def test_train_names_the_agents_when_one_is_unknown(capsys):
    assert cli.main(["train", "--agent", "ppoo"]) == 2
    err = capsys.readouterr().err
    assert "unknown agent 'ppoo'" in err and "'ppo'" in err


@pytest.mark.parametrize(
    "override, says",
    [
        ("overrides=[ppo.nosuch=1]", "unknown key 'nosuch'"),
        ("env.beta=0.3", "would be ignored: each cell's beta comes from `betas`"),
        ("grid={reinforce.lr: [1e-3]}", "'lr' was renamed to 'learning_rate'"),
    ],
)
def test_a_bad_sweep_grid_is_one_line_and_exit_2_before_any_cell_runs(tmp_path, capsys, override, says):
    assert cli.main(["sweep", f"runs_root={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf-gym sweep: error: ") and says in err and "Traceback" not in err
    assert not any(tmp_path.iterdir()), "nothing may run (or be written) before the grid is checked"


# --------------------------------------------------------------------------------------------------------
# Any error: one line, exit 2; --debug for the traceback; Ctrl-C: 130
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "error, says",
    [
        (ValueError("learning_rate must be > 0"), "learning_rate must be > 0"),
        (TypeError("expected a str"), "expected a str"),
        (FileNotFoundError("no such file: x.jsonl"), "no such file: x.jsonl"),
        (DataError("pairs.jsonl line 3: no 'chosen'"), "pairs.jsonl line 3: no 'chosen'"),
        (ImportError("pip install stable-baselines3"), "pip install stable-baselines3"),
        (KeyError("cell"), "KeyError: 'cell' (rerun with --debug for the traceback)"),
    ],
)
def test_any_error_in_a_stage_is_one_line_and_exit_2(monkeypatch, capsys, error, says):
    from rlhf_gym import train

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(train, "train", fails)
    assert cli.main(["train", "--agent", "ppo"]) == 2
    err = capsys.readouterr().err
    assert err == f"rlhf-gym train: error: {says}\n"


@pytest.mark.parametrize(
    "argv", [["--debug", "train", "--agent", "ppo"], ["train", "--agent", "ppo", "--debug"]]
)
def test_debug_before_or_after_the_command_prints_the_traceback(monkeypatch, capsys, argv):
    from rlhf_gym import train

    def fails(*args, **kwargs):
        raise ValueError("a bad value")

    monkeypatch.setattr(train, "train", fails)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "in fails" in err and err.endswith("ValueError: a bad value\n")


def test_ctrl_c_exits_130_quietly(monkeypatch, capsys):
    from rlhf_gym import train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", interrupted)
    assert cli.main(["train", "--agent", "ppo"]) == 130
    assert capsys.readouterr().err == ""


def test_a_missing_pairs_file_is_one_line_from_the_shell(tmp_path):
    """The real process: its whole stderr is the one line, and the exit status is 2."""
    done = subprocess.run(
        [sys.executable, "-m", "rlhf_gym.cli", "train-rm", f"pairs={tmp_path}/none.jsonl"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"rlhf-gym train-rm: error: preference pair file not found: {tmp_path}/none.jsonl"
    ]


def test_report_on_a_folder_without_results_keeps_exit_1(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("rlhf-gym report: error: ")


# --------------------------------------------------------------------------------------------------------
# A config naming the pipeline's outputs before the pipeline ran
# --------------------------------------------------------------------------------------------------------
def test_the_sweep_config_before_the_pipeline_says_to_run_the_pipeline(tmp_path, monkeypatch, capsys):
    from rlhf_gym import sweep

    monkeypatch.chdir(tmp_path)
    ran = []
    monkeypatch.setattr(sweep, "run_sweep", lambda config, force=False: ran.append(config) or tmp_path)
    assert cli.main(["sweep", "--config", "sweep"]) == 2
    assert capsys.readouterr().err == (
        "rlhf-gym sweep: error: the file runs/default/sft named by env.model does not exist; the file "
        "runs/default/reward_model named by env.reward_model does not exist "
        f"(relative to {tmp_path}); `configs/sweep.yaml` uses the pipeline's outputs: run `rlhf-gym "
        "pipeline` (or `make demo`) first\n"
    )
    assert not ran and not any(tmp_path.iterdir()), "nothing runs, nothing is written"
    (tmp_path / "runs/default/sft").mkdir(parents=True)  # as the pipeline leaves them
    (tmp_path / "runs/default/reward_model").mkdir()
    assert cli.main(["sweep", "--config", "sweep"]) == 0 and len(ran) == 1


def test_train_names_a_missing_model_or_reward_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--agent", "ppo", "env.reward_model=rm"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"rlhf-gym train: error: the file rm named by env.reward_model does not exist (relative to {tmp_path})\n"
    )
    assert cli.main(["train", "--agent", "ppo", "env.model=runs/mine/sft"]) == 2
    assert capsys.readouterr().err.endswith(
        "; runs/mine/sft is the pipeline's output: run `rlhf-gym pipeline name=mine` first\n"
    )


def test_only_local_paths_are_checked(tmp_path, monkeypatch):
    """A hub id or built-in model name is the loader's business; a local-looking path must exist."""
    from rlhf_base.config import ConfigError
    from rlhf_gym.pipeline import check_env_paths
    from text_env.config import EnvConfig

    monkeypatch.chdir(tmp_path)
    for model in (None, "tiny-reviews", "smollm2", "HuggingFaceTB/SmolLM2-135M"):
        check_env_paths(EnvConfig(model=model))
    for model in ("./here", "a/b/c", "m.gguf", "/nowhere/model"):
        with pytest.raises(
            ConfigError, match=f"the file {re.escape(model)} named by env.model does not exist"
        ):
            check_env_paths(EnvConfig(model=model))
    with pytest.raises(ConfigError, match="the file p.jsonl named by env.prompts"):
        check_env_paths(EnvConfig(prompts="p.jsonl"))
