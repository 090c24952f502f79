"""The one command line (`rlhf_gym/cli.py`): every subcommand defined there, described, and cheap to list."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from rlhf_gym import cli


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
