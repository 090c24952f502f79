"""The floors of the house (docs/architecture.md): no import runs upward and no modules import in a circle.

Every import statement of every module is read with `ast`, those inside functions too (a lazy import is
still a dependency), and resolved to the most specific module it names. Deprecated aliases reach their new
homes by name at run time (`rlhf_base.deprecation`), so they carry no import statement to check; the test
checks instead that each alias is listed in `MOVED`, and that each old name still works and warns.
"""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

from rlhf_base.deprecation import MOVED

ROOT = Path(__file__).resolve().parents[1]

#: Package (or module) -> floor; a module's floor is that of its longest listed prefix. A module may import
#: its own package and lower floors only. reward_models sits below text_env: the env loads a saved reward
#: model by path; a reward model never needs an env. The benchmarks run the stages (a pipeline builds their
#: models), and the CLI, the one door, runs everything, the benchmarks included.
FLOORS = {
    "rlhf_base": 1,
    "reward_models": 2,
    "text_env": 2.5,
    "agents": 3,
    "rlhf_gym": 4,
    "benchmarks": 5,
    "rlhf_gym.cli": 6,
}


def _unit(module: str) -> str:
    """The listed package or module that `module` belongs to (imports inside one unit are free)."""
    while module not in FLOORS:
        module = module.rpartition(".")[0]
    return module


def floor_of(module: str) -> float:
    return FLOORS[_unit(module)]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    tops = {name.partition(".")[0] for name in FLOORS}
    return {
        _module_name(p): p
        for top in sorted(tops)
        for p in sorted((ROOT / top).rglob("*.py"))
        if not _generated(p.relative_to(ROOT).parts)
    }


def _generated(parts: tuple[str, ...]) -> bool:
    """Files a run leaves under a package (benchmarks/out/ holds TRL's venv), not the project's own."""
    return "out" in parts or "site-packages" in parts or any(part.startswith(".") for part in parts)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The most specific project module that `name` (a module, or module.attribute) refers to."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports, anywhere in its source."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package
                    package = module if is_package else module.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}".strip(".")
                names = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            edges.update(t for n in names if (t := _resolve(n, modules)) and t != module)
        graph[module] = edges
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a module to a higher floor, or across two packages of the same floor."""
    bad = []
    for module, targets in graph.items():
        for target in targets:
            if _unit(target) != _unit(module) and floor_of(target) >= floor_of(module):
                bad.append(f"{module} (floor {floor_of(module)}) imports {target} (floor {floor_of(target)})")
    return sorted(bad)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_runs_upward():
    assert upward_imports(import_graph(project_modules())) == []


def test_no_import_cycles():
    assert import_cycles(import_graph(project_modules())) == []


def test_the_checks_catch_an_upward_import_and_a_circle():
    """The two checks above fail on the two faults the redesign removed (a test that cannot fail is a defect)."""
    graph = {
        "text_env.core": {"reward_models"},
        "reward_models": {"reward_models.labeller"},
        "reward_models.labeller": {"text_env.core"},
        "text_env.models": {"text_env.tasks.reviews.pretrain"},
        "text_env.tasks.reviews.pretrain": {"text_env.models"},
        "rlhf_base.maths": {"agents.ppo"},
    }
    assert "reward_models.labeller (floor 2) imports text_env.core (floor 2.5)" in upward_imports(graph)
    assert "rlhf_base.maths (floor 1) imports agents.ppo (floor 3)" in upward_imports(graph)
    assert sorted(import_cycles(graph)) == [
        ["reward_models", "reward_models.labeller", "text_env.core"],
        ["text_env.models", "text_env.tasks.reviews.pretrain"],
    ]


def test_the_walk_sees_lazy_and_relative_imports(tmp_path):
    source = "def f():\n    from agents.ppo import PPOAgent\n    from . import maths\n"
    path = tmp_path / "rlhf_base" / "lazy.py"
    path.parent.mkdir()
    path.write_text(source)
    modules = {"rlhf_base.lazy": path, "rlhf_base.maths": path, "agents.ppo": path}
    assert import_graph(modules)["rlhf_base.lazy"] == {"agents.ppo", "rlhf_base.maths"}


def _shims(modules: dict[str, Path]) -> set[str]:
    markers = ("alias_module(", "moved_names(")
    return {
        m
        for m, p in modules.items()
        if m != "rlhf_base.deprecation" and any(s in p.read_text() for s in markers)
    }


def test_every_alias_is_listed_in_moved():
    """Aliases reach other floors by name; `MOVED` is the one list of them, so none hides elsewhere."""
    shims = _shims(project_modules())
    # reward_models/__init__ forwards two names of the labeller; agents.sft keeps its loss and step
    assert shims - {"reward_models"} == set(MOVED)


def _forget_alias(old: str) -> None:
    """Drop an alias from `sys.modules` so importing it runs (and warns) again; a split module stays."""
    module = sys.modules.get(old)
    if module is not None and module.__name__ != old:
        del sys.modules[old]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_still_import(old):
    """An alias module warns when imported; a split module forwards its moved names (tested below)."""
    _forget_alias(old)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    if module.__name__ != old:  # an alias: the old name is the new module
        assert any("has moved to" in str(w.message) for w in caught if w.category is DeprecationWarning)
    else:
        assert callable(module.__getattr__)


@pytest.mark.parametrize(
    "old, name, new",
    [
        ("rlhf_gym.maths", "gae", "rlhf_base.maths"),
        ("text_env.scoring", "teacher_forced", "rlhf_base.lm"),
        ("text_env.scoring", "Judge", "text_env.judge"),
        ("text_env.models", "load_causal_lm", "rlhf_base.models"),
        ("text_env.models", "tiny_gpt2", "text_env.tasks.reviews.model"),
        ("reward_models", "label_pairs", "rlhf_gym.label"),
        ("agents.sft", "SFTConfig", "rlhf_gym.sft"),
        ("agents.commands", "train", "rlhf_gym.train"),
    ],
)
def test_moved_names_are_the_same_objects(old, name, new):
    _forget_alias(old)
    with pytest.warns(DeprecationWarning, match="has moved to"):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize("statement", ["import rlhf_gym.maths", "from agents.sft import SFTConfig"])
def test_a_users_old_import_shows_its_warning_under_default_filters(statement):
    """Python shows a DeprecationWarning by default only when it points at `__main__`: the warning must name
    the user's line, not the alias module or the import machinery, or nobody would ever see it."""
    import subprocess

    result = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True, check=True)
    assert "<string>:1: DeprecationWarning:" in result.stderr and "has moved to" in result.stderr
