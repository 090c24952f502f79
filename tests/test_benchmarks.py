"""The benchmarks' own machinery: forward timing, the long-context model, tables, the runner's options.

No figure is asserted here (speed is measured by `make bench`, never by a timed test); these check that the
numbers a benchmark reports are computed from what they claim to be.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

import text_env
from benchmarks import rollout, scaling
from benchmarks.common import ForwardTimer, markdown_table, timed_calls
from benchmarks.run import SECTIONS, add_arguments


def test_forward_timer_counts_each_top_level_call_and_removes_its_hooks(core):
    policy = core.judge.policy
    ids = torch.tensor([[5, 6, 7]])
    with ForwardTimer({"policy": policy, "reference": core.reference}) as timer:
        policy(input_ids=ids)
        policy(input_ids=ids)
        core.reference(input_ids=ids)
    assert timer.calls == {"policy": 2, "reference": 1}
    assert timer.seconds["policy"] > 0 and timer.total == pytest.approx(sum(timer.seconds.values()))
    policy(input_ids=ids)
    assert timer.calls["policy"] == 2, "hooks are gone after the block"
    assert not policy._forward_hooks and not policy._forward_pre_hooks


def test_batched_rate_splits_time_into_forwards_and_bookkeeping(core):
    result = rollout.batched_rate(core, batch=4, min_seconds=0.0)
    assert result["rollouts"] == 2 and result["tokens"] > 0
    assert set(result["forward_seconds"]) == {"policy", "reference"}  # the gold reward is the RM here
    assert 0.0 < result["bookkeeping_share"] < 1.0 and result["gold_share"] == 0.0
    assert result["tokens_per_s"] == pytest.approx(result["tokens"] / result["seconds"])
    assert core.judge.gold_fn is core.task.gold_reward, "the gold timer is removed again"


def test_long_context_core_generates_past_the_tiny_models_context():
    core = scaling.long_context_core(new_tokens=160, device="cpu")
    assert core.reference.config.n_positions == 512 and core.min_new_tokens == 160
    batch = text_env.rollout(
        text_env.TextGenVectorEnv(2, core=core), generator=torch.Generator().manual_seed(0)
    )
    assert batch.lengths.tolist() == [160.0, 160.0]  # beyond the tiny model's 128 positions


def test_scaling_table_and_cost_ratio_come_from_the_points():
    point = dict(
        agent="reinforce", batch=64, seconds_per_iteration=1.0, rollout_seconds=0.6, update_seconds=0.4
    )
    points = [
        {**point, "axis": "length", "new_tokens": 32, "ms_per_token": 0.5},
        {**point, "axis": "length", "new_tokens": 256, "ms_per_token": 0.6},
    ]
    result = {"points": points, "reinforce_cost_per_token_ratio": 1.2}
    text = scaling.markdown(result)
    assert "| reinforce | 64 | 256 | 1.00 | 0.60 | 0.40 | 0.600 |" in text and "reinforce 1.20x" in text


def test_rollout_tables_show_every_batch_and_ratio():
    side = {"tokens_per_s": 1000.0, "bookkeeping_share": 0.1, "gold_share": 0.02}
    rows = [
        {"batch": b, "fixed_length": side, "natural_length": side, "sb3": {"tokens_per_s": 250.0},
         "vs_naive": 10.0, "vs_sb3": 4.0}
        for b in (1, 64)
    ]  # fmt: skip
    text = rollout.markdown({"new_tokens": 32, "naive": {"tokens_per_s": 100.0}, "batches": rows})
    assert "| 64 | 1,000 | 100 | 10.0x | 10.0% | 2.0% |" in text and "| 1 | 1,000 | 250 | 4.0x |" in text


def test_common_helpers():
    totals: dict[str, float] = {}
    double = timed_calls(lambda x: 2 * x, totals, "f")
    assert double(3) == 6 and double(4) == 8 and totals["f"] > 0
    with pytest.raises(ZeroDivisionError):
        timed_calls(lambda: 1 / 0, totals, "boom")()
    assert "boom" in totals, "a call that raises is timed too"
    assert markdown_table(["a", "b"], [[1, 2]]).splitlines() == ["| a | b |", "| --- | ---: |", "| 1 | 2 |"]


def test_runner_options_name_the_sections():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).only == list(SECTIONS)
    assert parser.parse_args(["--quick", "--only", "scaling"]).only == ["scaling"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--only", "nonsense"])


def test_each_ablation_variant_turns_one_fix_off(core):
    """Every variant but the baseline differs from the fast path in one thing: one speed option of its env
    (no patched globals), or, for the fused GELU, its models' activation (swapped back, then restored)."""
    from transformers.activations import NewGELUActivation

    from benchmarks.ablation import UNFUSED, VARIANTS, models_of, unfused_gelu
    from text_env.speed import SpeedOptions

    assert list(VARIANTS)[0] == "all fixes" and VARIANTS["all fixes"] == SpeedOptions()
    default = dataclasses.asdict(SpeedOptions())
    changed = {
        name: {k for k, v in dataclasses.asdict(options).items() if v != default[k]}
        for name, options in VARIANTS.items()
    }
    assert changed == {
        "all fixes": set(),
        "rows kept to the end": {"compact_below"},
        "one padded forward": {"group_by_length"},
        UNFUSED: set(),
        "torch.multinomial": {"sampler"},
        "KV cache grown by torch.cat": {"preallocate_cache"},
        "reward model runs its own pi_ref": {"share_reference_forward"},
    }
    envs = text_env.TextGenVectorEnv(2, core=core)
    models = models_of(envs)
    assert models[:2] == [envs.policy, envs.reference]

    def has_unfused() -> bool:
        return any(isinstance(m, NewGELUActivation) for model in models for m in model.modules())

    with unfused_gelu(models):
        assert has_unfused()
    assert not has_unfused()


def test_cli_help_benchmark_times_every_command_and_reports_the_medians():
    from benchmarks import cli_help
    from rlhf_gym.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert cli_help.commands() == [["--help"], *([name, "--help"] for name in sub.choices)]
    assert "cli" in SECTIONS
    rows = [{"command": "rlhf-gym --help", "median_ms": 90.0, "min_ms": 80.0}]
    text = cli_help.markdown({"repeats": 3, "python_startup_ms": 30.0, "commands": rows})
    assert "| `rlhf-gym --help` | 90 | 60 |" in text and "bare `python -c pass` takes 30 ms" in text
