"""The package layout's rules (ARCHITECTURE.md), checked on the source: what may import what, module
size, and no sys.path edits in tests, benchmarks, scripts or the harness."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

from harness.support import REPO_ROOT

EXPORTER = REPO_ROOT / "exporter"
MAX_LINES = 450


def _imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def _modules(*parts: str) -> list[Path]:
    return sorted((EXPORTER.joinpath(*parts)).rglob("*.py"))


def test_web_and_collectors_never_import_sources() -> None:
    offenders = [
        f"{path.relative_to(REPO_ROOT)} imports {name}"
        for package in ("web", "collectors")
        for path in _modules(package)
        for name in _imports(path)
        if name.startswith(("exporter.nvml", "exporter.attribution"))
    ]
    assert offenders == []


def test_hook_imports_only_the_standard_library_and_its_own_modules() -> None:
    allowed = ("exporter.hook", "exporter.attribution.procfs")
    offenders = [
        f"{path.relative_to(REPO_ROOT)} imports {name}"
        for path in _modules("hook")
        for name in _imports(path)
        if name.split(".")[0] not in sys.stdlib_module_names and not name.startswith(allowed)
        and name.split(".")[0] not in ("torch", "lightning", "transformers", "pytorch_lightning")
    ]
    assert offenders == []


def test_modules_stay_small() -> None:
    big = {
        str(path.relative_to(REPO_ROOT)): n
        for path in _modules()
        if "simulate" not in path.parts and (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert big == {}


def _sys_path_edits(path: Path) -> Iterator[int]:
    """Lines calling ``sys.path.<anything>(...)`` (insert, append, extend, ...)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "path"
            and isinstance(node.func.value.value, ast.Name)
            and node.func.value.value.id == "sys"
        ):
            yield node.lineno


def test_no_sys_path_edits() -> None:
    edits = [
        f"{path.relative_to(REPO_ROOT)}:{line}"
        for folder in ("tests", "benchmarks", "scripts", "harness")
        for path in sorted((REPO_ROOT / folder).rglob("*.py"))
        for line in _sys_path_edits(path)
    ]
    assert edits == []
