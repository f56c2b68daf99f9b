"""The package layout (DESIGN.md, "Layout"): subpackages stacked, no cycles, old paths deprecated."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import steersample
from steersample import _moved

PACKAGE = Path(steersample.__file__).resolve().parent
# each subpackage imports only from those before it
STACK = ("reference", "oracle", "sampling", "steering", "evaluation")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("steersample"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if f"{node.module}.{a.name}" in mods)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("steersample"))
    return {name for name in found if name in mods}


def _rank(module: str) -> int | None:
    parts = module.split(".")
    return STACK.index(parts[1]) if len(parts) > 1 and parts[1] in STACK else None


def test_subpackages_import_only_those_below_them():
    mods = _modules()
    upward = [f"{m} -> {d}" for m, path in mods.items() for d in _imports(path, mods)
              if _rank(m) is not None and _rank(d) is not None and _rank(d) > _rank(m)]
    assert upward == []


def test_no_import_cycles_between_modules():
    mods = _modules()
    graph = {m: _imports(p, mods) - {m} for m, p in mods.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_imports_at_the_bottom_of_a_module():
    late = []
    for name, path in _modules().items():
        body = ast.parse(path.read_text()).body
        seen_definition = False
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                seen_definition = True
            elif seen_definition and isinstance(node, (ast.Import, ast.ImportFrom)):
                late.append(f"{name}:{node.lineno}")
    assert late == []


def test_registry_lists_the_builtin_steerers_without_importing_them_back():
    from steersample.steering.registry import STEERERS

    assert {"none", "attractor", "representation"} <= set(STEERERS)
    assert STEERERS["attractor"] is steersample.AttractorRepulsion
    source = (PACKAGE / "steering" / "attractor.py").read_text()
    assert "registry" not in source.split('"""', 2)[-1].split("\nclass ")[0]


def test_metrics_does_not_reexport_the_judge():
    from steersample.evaluation import metrics

    assert "classify" not in vars(metrics)
    with pytest.warns(DeprecationWarning, match="steersample.evaluation.judge.classify"):
        forwarded = metrics.classify
    from steersample.evaluation.judge import classify
    assert forwarded is classify


@pytest.mark.parametrize("old, new", sorted(_moved.MOVED.items()))
def test_old_module_paths_warn_and_alias_the_new_module(old, new):
    code = (
        "import warnings, importlib\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({new!r})\n"
        "assert old is new, (old, new)\n"
        f"assert new.__spec__.name == {new!r}, new.__spec__.name\n"
        "msgs = [str(x.message) for x in w if x.category is DeprecationWarning]\n"
        f"assert any({new!r} in m for m in msgs), msgs\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_old_top_level_attributes_still_resolve_with_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        schedules = steersample.schedules
    assert schedules is importlib.import_module("steersample.sampling.schedules")
    assert steersample.metrics is importlib.import_module("steersample.evaluation.metrics")
    assert any("steersample.sampling.schedules" in str(w.message) for w in caught) or \
        "steersample.schedules" in sys.modules


def test_tests_mirror_the_package():
    tests = Path(__file__).resolve().parent
    for sub in STACK + ("geometry", "commands"):
        assert (PACKAGE / sub).is_dir()
        assert list((tests / sub).glob("test_*.py")), f"tests/{sub}/ has no tests"
