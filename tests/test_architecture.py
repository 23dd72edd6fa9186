"""The layers hold: the import contract (.importlinter) passes, fails on a deliberate violation, and no module
inside the package imports from the package root (whose __init__ imports the API) or a private module of a
library."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "onnxprune"
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT)], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[dev]')")
def test_import_contract_holds():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[dev]')")
def test_import_contract_catches_a_violation(tmp_path):
    """The analysis layer importing a verb (an upward import) breaks the contract."""
    shutil.copytree(PACKAGE, tmp_path / "onnxprune", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    graph = tmp_path / "onnxprune" / "analysis" / "graph.py"
    graph.write_text(graph.read_text() + "\nfrom onnxprune.verbs import inspect as _upward  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "onnxprune.analysis.graph -> onnxprune.verbs.inspect" in result.stdout


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def test_no_imports_from_the_package_root_or_private_library_modules():
    submodules = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
                  if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.stem != "__init__"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py":
            continue
        for module, names in _imports(path):
            if module == "onnxprune" and set(names) - submodules:
                found.append(f"{path.relative_to(ROOT)}: from onnxprune import {', '.join(names)}")
            if module != "__future__" and not module.startswith("onnxprune") \
                    and any(part.startswith("_") for part in module.split(".")):
                found.append(f"{path.relative_to(ROOT)}: import {module}")
    assert not found, found
