"""The package's layers (pyproject ``[tool.importlinter]``): imports go downward only, with no cycles.

import-linter checks every import it finds, function-level ones included. On top of that, a
function-level import of one of our own modules is allowed only where it defers work and cannot
hide a cycle: the list below says which and why. Anything else is an import that should be at
the top of its module (or a cycle to break by moving code down a layer).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
PACKAGE = SRC / "inc_bridge"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

# (importing module, imported module or package) -> why the import is inside a function.
DEFERRED = {
    ("inc_bridge.cli", "*"): "each subcommand imports what it runs, so `inc-bridge --help` and `doctor` start fast; "
                             "cli is the top layer and nothing imports it, so this cannot close a cycle",
    ("inc_bridge.demo", "inc_bridge"): "the demo drives the public API (`import inc_bridge as ib`) when it runs; "
                                       "the package root does not import demo",
}


def _lint(src: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", str(REPO / "pyproject.toml")], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_contracts_are_kept(tmp_path):
    result = _lint(SRC, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_contracts_catch_an_upward_import_and_a_cycle(tmp_path):
    """A copy of the package with one upward import (errors → tune) and one cycle (convert → coverage
    → convert, function-level) breaks both contracts."""
    copy = tmp_path / "src" / "inc_bridge"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so", "csrc"))
    with open(copy / "errors.py", "a") as f:
        f.write("\nfrom . import tune  # noqa\n")
    with open(copy / "coverage.py", "a") as f:
        f.write("\n\ndef _planted():\n    from . import convert  # noqa\n")
    result = _lint(tmp_path / "src", tmp_path)
    assert result.returncode != 0
    assert "0 kept, 2 broken" in result.stdout, result.stdout
    assert "inc_bridge.errors -> inc_bridge.tune" in result.stdout


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _target(module: str, is_package: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The inc_bridge modules an import statement names (empty for other packages)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "inc_bridge"]
    if node.level == 0:
        return [node.module] if node.module and node.module.split(".")[0] == "inc_bridge" else []
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return [".".join(base + ([node.module] if node.module else []))]


def function_level_imports() -> list[tuple[str, str, int]]:
    """(importing module, imported inc_bridge module, line) for every import inside a function."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for fn in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        found += [(module, t, node.lineno) for t in _target(module, path.name == "__init__.py", node)]
    return found


def test_no_function_level_import_dodges_a_layer_or_a_cycle():
    bad = [f"{m}:{line} imports {t}" for m, t, line in function_level_imports()
           if (m, "*") not in DEFERRED and (m, t) not in DEFERRED]
    assert not bad, "function-level imports of inc_bridge modules (move them to the top, or down a layer): " + "; ".join(bad)


def test_the_scan_sees_relative_and_absolute_imports():
    """The scanner itself: what it reports for a relative, a parent-relative and an absolute import."""
    tree = ast.parse("def f():\n    from .scales import x\n    from ..nn import y\n    import inc_bridge.tune\n    import os\n")
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    targets = [t for n in nodes for t in _target("inc_bridge.serialization.saving", False, n)]
    assert targets == ["inc_bridge.serialization.scales", "inc_bridge.nn", "inc_bridge.tune"]
    assert all(m.startswith("inc_bridge.cli") or m == "inc_bridge.demo" for m, _, _ in function_level_imports())
