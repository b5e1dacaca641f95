"""Imports point one way: base model <- strategies <- LightningModule <- entry points, with no cycle anywhere."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from flan_squad.config import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "flan_squad"


def _imports(module: str, type_checking_too: bool = False) -> set[str]:
    """The flan_squad modules `module` imports, at any depth (lazy imports too); those for type checking only
    if `type_checking_too`."""
    tree = ast.parse((PACKAGE / f"{module.split('.')[-1]}.py").read_text(encoding="utf-8"))
    type_checking = set() if type_checking_too else {
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
        and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING") for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "flan_squad":  # from flan_squad import config
            found |= {f"flan_squad.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return {name for name in found if name.startswith("flan_squad.")} - {module}


MODULES = [f"flan_squad.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"]
GRAPH = {module: _imports(module) for module in MODULES}
# A circle through an import for type checking only is a circle still: the two modules cannot be read apart.
GRAPH_WITH_TYPES = {module: _imports(module, type_checking_too=True) for module in MODULES}


def _reachable(module: str, graph: dict[str, set[str]] = GRAPH) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for name in graph.get(todo.pop(), ()):
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_module_imports_itself_through_others(module):
    assert module not in _reachable(module, GRAPH_WITH_TYPES)


@pytest.mark.parametrize("module, below", [
    ("flan_squad.base", ["flan_squad.strategies", "flan_squad.model"]),
    ("flan_squad.strategies", ["flan_squad.model"]),
    ("flan_squad.runs", ["flan_squad.model"]),
    ("flan_squad.squad_metric", ["flan_squad.model", "flan_squad.strategies"]),  # validation's metric, below both
    ("flan_squad.report", ["flan_squad.strategies", "flan_squad.model"]),  # it reads what training recorded
    ("flan_squad.report_runs", ["flan_squad.report", "flan_squad.plots"]),  # the runs both read
    ("flan_squad.plots", ["flan_squad.report"]),
])
def test_layers_point_one_way(module, below):
    assert not set(below) & (_reachable(module) | {module})


def test_report_reads_runs_without_torch():
    code = "import sys, flan_squad.report; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
