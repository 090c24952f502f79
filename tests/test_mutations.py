"""The mutation check of the wiring tests (`tests/mutations.py`) stays current, and kills every mutation."""

from __future__ import annotations

import pytest

from tests import mutations


@pytest.mark.parametrize("mutation", mutations.MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_pattern_matches_the_source_exactly_once(mutation):
    """When the code changes, a stale pattern fails here (fast) rather than silently mutating nothing."""
    assert mutation.old != mutation.new
    assert mutations.matches(mutation) == 1, f"update {mutation.name} in tests/mutations.py"


@pytest.mark.slow
def test_every_mutation_fails_the_wiring_tests(capsys):
    """Issue 12's bugs, each applied to a copy of the source, each fail tests/test_agent_wiring.py."""
    code = mutations.main([])
    out = capsys.readouterr().out
    assert code == 0, out
