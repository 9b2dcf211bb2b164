"""The package's shape: stage scripts alone at the top of pipeline/, subpackages that import
only the layers below them, no import circle, and modules of one idea.

Imports are read statically (as for dvc.yaml's deps), so lazy and function-local imports count
and ``if TYPE_CHECKING:`` ones do not.
"""

from __future__ import annotations

import ast

import pytest

from conftest import REPO
from test_dvc_deps import imported_modules

PACKAGE = REPO / "pipeline"
STAGES = {"prepare", "folds", "train", "swa", "infer", "ensemble", "submit", "evaluate", "report",
          "parallel", "weights", "bundle", "predict"}
# which subpackages each may import (besides itself); the arrows point down, so this is a DAG
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "submission": {"core", "data"},
    "evaluation": {"core", "data", "submission"},       # scoring decodes a submission zip
    "models": {"core", "evaluation"},                   # validation counts a confusion matrix
    "training": {"core", "data", "models", "evaluation"},
    "inference": {"core", "data", "models", "evaluation"},
    "ensembling": {"core", "data", "models", "evaluation", "inference", "submission"},  # bundles
    "reporting": {"core", "data", "evaluation", "inference", "ensembling", "submission"},
    "launch": {"core", "data", "models", "inference"},  # the cost plan: frames, weights, TTA
}
MAX_STAGE_LINES = 120    # an argparse front over one library call
MAX_MODULE_LINES = 400   # longer only with the reason at the top ("long because ...")


def library_modules() -> dict[str, object]:
    """{dotted name: path} of every module in a subpackage."""
    return {".".join(p.relative_to(REPO).with_suffix("").parts): p
            for p in sorted(PACKAGE.glob("*/*.py"))}


def test_top_level_holds_stage_scripts_only():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == STAGES, f"pipeline/ top level: not a stage script: {sorted(top - STAGES)}"
    subpackages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert subpackages == set(ALLOWED), f"subpackages {sorted(subpackages)} vs the layer table"
    assert not subpackages & STAGES, "a subpackage shares a name with a stage script"


def test_subpackages_import_only_lower_layers():
    bad = []
    for name, path in library_modules().items():
        own = name.split(".")[1]
        for target in imported_modules(path):
            parts = target.split(".")
            if len(parts) < 2 or parts[1] == "__init__":
                continue
            if parts[1] in STAGES:
                bad.append(f"{name} imports the stage script {target}")
            elif parts[1] != own and parts[1] not in ALLOWED[own]:
                bad.append(f"{name} imports {target} (layer {parts[1]} is not below {own})")
    assert not bad, "\n".join(bad)


def test_stage_scripts_do_not_import_each_other():
    bad = [f"{p.name} imports {t}" for p in PACKAGE.glob("*.py") for t in imported_modules(p)
           if len(t.split(".")) == 2 and t.split(".")[1] in STAGES]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    modules = library_modules()
    graph = {name: {t for t in imported_modules(path) if t in modules and t != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}   # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [])
            assert cycle is None, "import circle: " + " -> ".join(cycle[cycle.index(cycle[-1]):])


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_stage_script_is_short(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_STAGE_LINES, f"{path.name}: {lines} lines; move library code to a subpackage"


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*/*.py")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_library_module_is_one_idea(path):
    text = path.read_text()
    doc = ast.get_docstring(ast.parse(text)) or ""
    if path.name != "__init__.py":
        assert doc, f"{path.relative_to(REPO)}: no module docstring saying its one idea"
    lines = len(text.splitlines())
    assert lines <= MAX_MODULE_LINES or "long because" in doc, (
        f"{path.relative_to(REPO)}: {lines} lines; split it by idea, or say at its top why "
        f"it is long (\"long because ...\")")
