"""The package's layers, as the tree shows them, and imports that only point down:

    utils  <-  data  <-  evaluation  <-  models  <-  runs  <-  reporting  <-  entry points (flan_squad/*.py)

A module may import modules of its own layer or of layers below, never above, and no module imports
itself through others (no circle). Entry points import no other entry point.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from flan_squad.utils.config import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "flan_squad"
LAYERS = ["utils", "data", "evaluation", "models", "runs", "reporting"]  # bottom to top; entry points above all


def _module_name(path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(module: str, type_checking_too: bool = False) -> set[str]:
    """The flan_squad modules `module` imports, at any depth (lazy imports too); those for type checking only
    if `type_checking_too`."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    type_checking = set() if type_checking_too else {
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
        and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING") for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names}
            found |= (submodules & set(MODULES)) or {node.module}  # `from flan_squad.models import strategies`
    return {name for name in found if name in MODULES} - {module}


GRAPH = {module: _imports(module) for module in MODULES}
# A circle through an import for type checking only is a circle still: the two modules cannot be read apart.
GRAPH_WITH_TYPES = {module: _imports(module, type_checking_too=True) for module in MODULES}


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS):
        return LAYERS.index(parts[1])
    return len(LAYERS)  # an entry point (or the package itself)


def _reachable(module: str, graph: dict[str, set[str]] = GRAPH) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for name in graph.get(todo.pop(), ()):
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def test_every_subpackage_is_a_layer():
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages == set(LAYERS)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_module_imports_itself_through_others(module):
    assert module not in _reachable(module, GRAPH_WITH_TYPES)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    upward = {name for name in GRAPH[module] if _layer(name) > _layer(module)}
    assert not upward, f"{module} (layer {_layer(module)}) imports from above: {sorted(upward)}"
    if _layer(module) == len(LAYERS):  # entry points use the layers, not each other
        assert not {name for name in GRAPH[module] if _layer(name) == len(LAYERS) and name != "flan_squad"}


def test_a_layer_violation_is_caught():
    # The check itself can fail: a data module importing the LightningModule would be reported.
    assert _layer("flan_squad.models.qa_module") > _layer("flan_squad.data.datamodule")
    assert _layer("flan_squad.train") > _layer("flan_squad.reporting.plots")


def test_report_and_score_read_without_torch():
    code = ("import sys, flan_squad.report, flan_squad.reporting.plots, flan_squad.reporting.runs, flan_squad.score; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
