"""Mutation check of the agent wiring tests (issue 12): each deliberate bug must make them fail.

    python -m tests.mutations            # every mutation; exit 1 if one survives
    python -m tests.mutations -k gamma   # those whose name contains "gamma"

Each bug is a one-line text replacement in the real source. For each, the repository is copied to a
temporary directory (without .git and caches; the working tree is never touched), the replacement is made
there, and `tests/test_agent_wiring.py` runs in a fresh process on the copy: the mutation is *killed* when
the tests fail, and *survives* when they pass. The unmutated copy runs first and must pass, or a kill would
prove nothing. A pattern that no longer matches the source exactly once is an error, not a survivor:
`tests/test_mutations.py` checks that in the fast suite, so that the list cannot silently rot.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = "tests/test_agent_wiring.py"
IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", "*.egg-info"
)


@dataclass(frozen=True)
class Mutation:
    """Replace `old` (which must occur exactly once in `path`) with `new`; the name starts with the agent."""

    name: str
    path: str
    old: str
    new: str

    @property
    def tests(self) -> str:
        """pytest's `-k` for the wiring tests of the mutated agent (the others cannot see the bug)."""
        return f"test_{self.name.split('-')[0]}_"


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "ppo-kl-sign-flipped",
        "agents/ppo.py",
        "kl = kl_penalty(batch.logprobs[:, :n], b_ref_logprobs, b_mask, *kl_settings)",
        "kl = -kl_penalty(batch.logprobs[:, :n], b_ref_logprobs, b_mask, *kl_settings)",
    ),
    Mutation(
        "ppo-beta-zero",
        "agents/ppo.py",
        'token_rewards(batch.rm_scores, paid, b_mask, self.beta, "per_token")',
        'token_rewards(batch.rm_scores, paid, b_mask, 0.0, "per_token")',
    ),
    Mutation(
        "ppo-gamma-lambda-swapped",
        "agents/ppo.py",
        "gae(rewards, b_values, b_mask, cfg.gamma, cfg.gae_lambda)",
        "gae(rewards, b_values, b_mask, cfg.gae_lambda, cfg.gamma)",
    ),
    Mutation(
        "ppo-value-one-token-late",
        "agents/ppo.py",
        "hidden = out.hidden_states[-1][:, start - 1 : -1].float()",
        "hidden = out.hidden_states[-1][:, start:].float()",
    ),
    Mutation(
        "ppo-value-target-whitened-advantage",
        "agents/ppo.py",
        "ppo_value_loss(values, b_values[mb], b_returns[mb], mb_mask, cfg.clip_range_value)",
        "ppo_value_loss(values, b_values[mb], b_advantages[mb], mb_mask, cfg.clip_range_value)",
    ),
    Mutation(
        "reinforce-rm-score-without-kl",
        "agents/reinforce.py",
        "rewards = batch.rewards  # the env's rm_score - beta * kl",
        "rewards = batch.rm_scores  # the env's rm_score - beta * kl",
    ),
)


def matches(mutation: Mutation, root: Path = ROOT) -> int:
    """How many times the mutation's pattern occurs in its file (1 when the list is current)."""
    return (root / mutation.path).read_text().count(mutation.old)


def run_tests(mutation: Mutation | None) -> tuple[bool, float, list[str], str]:
    """Copy the repository, apply `mutation` (None: none), run the wiring tests there.

    Returns:
        (passed, seconds, the ids of the tests that failed, the end of pytest's output).
    """
    with tempfile.TemporaryDirectory(prefix="rlhf-mutation-") as tmp:
        root = Path(tmp) / "repo"
        shutil.copytree(ROOT, root, ignore=IGNORE)
        if mutation is not None:
            if matches(mutation, root) != 1:
                raise ValueError(f"{mutation.name}: pattern not found exactly once in {mutation.path}")
            path = root / mutation.path
            path.write_text(path.read_text().replace(mutation.old, mutation.new))
        # The copy's packages come first on the path, ahead of the editable install of the original.
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "400"}
        if mutation is None:  # once: every copy is laid out, and imported, the same way
            check = "import agents, rlhf_base, text_env; print(agents.__file__, rlhf_base.__file__, text_env.__file__)"
            cmd = [sys.executable, "-c", check]
            where = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=True).stdout
            if any(not Path(f).resolve().is_relative_to(root.resolve()) for f in where.split()):
                raise RuntimeError(f"the copy imports packages from elsewhere: {where}")
        start = time.perf_counter()
        pytest = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-n", "0", TESTS]
        if mutation is not None:
            pytest += ["-k", mutation.tests]
        proc = subprocess.run(pytest, cwd=root, env=env, capture_output=True, text=True)
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        failed = [line.split("::", 1)[-1][:200] for line in lines if line.startswith(("FAILED", "ERROR"))]
        return proc.returncode == 0, time.perf_counter() - start, failed, "\n".join(lines[-5:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="run only the mutations whose name contains this")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="mutations tested at once")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.k in m.name]
    stale = [m.name for m in chosen if matches(m) != 1]
    if stale:
        print(f"patterns that no longer match the source exactly once: {stale}", file=sys.stderr)
        return 2
    passed, seconds, _, tail = run_tests(None)
    print(f"{'unmutated':40s} {'passes' if passed else 'FAILS'}  {seconds:5.1f} s")
    if not passed:
        print(tail, file=sys.stderr)
        return 2
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(run_tests, chosen))
    survivors = []
    for mutation, (passed, seconds, failed, tail) in zip(chosen, results, strict=True):
        verdict = "SURVIVED" if passed else f"killed by {len(failed)} tests"
        print(f"{mutation.name:40s} {verdict}  {seconds:5.1f} s")
        if passed:
            survivors.append(mutation.name)
        for test in failed or ([] if passed else tail.splitlines()):
            print(f"    {test}")
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutations killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
