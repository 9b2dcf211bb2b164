"""dvc.yaml lists the code each stage runs: the import closure of its script inside pipeline/.

A stage whose deps miss a module it imports (the metrics, a model builder) answers "up to date"
to ``dvc repro`` with outputs of the old code. The closure is derived statically from the
scripts' source (``import pipeline.x``, ``from pipeline import x``, ``from pipeline.x import y``,
function-local imports included), so the test needs no heavy imports and sees lazy ones too.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO  # the repository root, defined once

PACKAGE = "pipeline"
SCRIPT = re.compile(r"\bpython3?\s+(pipeline/[\w/]+\.py)\b")


def module_file(module: str) -> Path | None:
    """The file of ``pipeline.x.y`` under the repo (``x/y.py`` or ``x/y/__init__.py``), if any."""
    base = REPO.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports anywhere (module level or inside functions).

    Importing ``pipeline.a.b`` runs ``pipeline/__init__.py`` and ``pipeline/a/__init__.py`` too;
    ``from pipeline.a import b`` imports ``pipeline.a.b`` when ``b`` is a submodule.
    """
    found: set[str] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    # `if TYPE_CHECKING:` imports never run: they are no dependency of the stage
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for stmt in node.body
                   for inner in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom):  # relative: resolve against the file's package
            package = path.relative_to(REPO).with_suffix("").parts[:-node.level]
            module = ".".join([*package, *([node.module] if node.module else [])])
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] != PACKAGE:
                continue
            found.update(".".join(parts[:k]) for k in range(1, len(parts) + 1)
                         if module_file(".".join(parts[:k])))
    return found


def closure(script: Path) -> set[str]:
    """Repo-relative posix paths of ``script`` and every package file it imports, transitively."""
    files, todo = {script}, [script]
    while todo:
        for module in imported_modules(todo.pop()):
            path = module_file(module)
            if path not in files:
                files.add(path)
                todo.append(path)
    return {p.relative_to(REPO).as_posix() for p in files}


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_scripts(stage: dict) -> list[str]:
    return SCRIPT.findall(stage["cmd"] if isinstance(stage["cmd"], str) else " ".join(stage["cmd"]))


def dep_paths(stage: dict) -> list[str]:
    return [next(iter(d)) if isinstance(d, dict) else str(d) for d in stage.get("deps", [])]


def covered(path: str, deps: list[str]) -> bool:
    """``path`` is a dep or lies under a folder dep."""
    return any(path == d.rstrip("/") or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_every_stage_runs_a_pipeline_script():
    for name, stage in stages().items():
        scripts = stage_scripts(stage)
        assert scripts, f"stage '{name}': no `python pipeline/<script>.py` in its cmd {stage['cmd']!r}"
        for script in scripts:
            assert (REPO / script).is_file(), f"stage '{name}': {script} does not exist"


@pytest.mark.parametrize("name", list(stages()))
def test_stage_depends_on_every_module_it_imports(name):
    stage = stages()[name]
    deps = dep_paths(stage)
    needed = set().union(*(closure(REPO / s) for s in stage_scripts(stage)))
    missing = sorted(p for p in needed if not covered(p, deps))
    assert not missing, (f"dvc.yaml stage '{name}' runs code it does not depend on: "
                         f"{', '.join(missing)} (add them to its deps)")


@pytest.mark.parametrize("name", list(stages()))
def test_stage_code_deps_exist_and_are_imported(name):
    """A listed pipeline/ file must exist (a typo is never hashed) and be run by the stage
    (a stray dep re-runs it for nothing); folder deps may hold more than the closure."""
    stage = stages()[name]
    code = [d for d in dep_paths(stage) if d.startswith(f"{PACKAGE}/")]
    absent = [d for d in code if not (REPO / d).exists()]
    assert not absent, f"dvc.yaml stage '{name}' depends on missing file(s): {', '.join(absent)}"
    needed = set().union(*(closure(REPO / s) for s in stage_scripts(stage)))
    stray = [d for d in code if (REPO / d).is_file() and d not in needed]
    assert not stray, f"dvc.yaml stage '{name}' depends on code it never imports: {', '.join(stray)}"


def test_closure_follows_every_import_form(tmp_path, monkeypatch):
    """import a.b / from a import b / from a.b import c / a function-local import, transitively."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    for rel, text in {
        "__init__.py": "", "sub/__init__.py": "", "plain.py": "", "leaf.py": "",
        "fromsub.py": "X = 1\n", "lazy.py": "import pipeline.leaf\n",
        "sub/deep.py": "", "sub/named.py": "", "typed.py": "",
        "script.py": ("import os\nimport pipeline.plain\nfrom pipeline import fromsub\n"
                      "from pipeline.sub.deep import thing\nfrom pipeline.sub import named\n"
                      "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from pipeline.typed import T  # never runs: not a dependency\n"
                      "def f():\n    from pipeline.lazy import y\n"),
    }.items():
        (pkg / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert closure(pkg / "script.py") == {f"{PACKAGE}/{p}" for p in (
        "script.py", "__init__.py", "plain.py", "fromsub.py", "sub/__init__.py", "sub/deep.py",
        "sub/named.py", "lazy.py", "leaf.py")}


def test_folder_deps_cover_files_under_them():
    assert covered("pipeline/data/vspw.py", ["pipeline/data"])
    assert covered("pipeline/data/vspw.py", ["pipeline/data/"])
    assert not covered("pipeline/database.py", ["pipeline/data"])
