"""The files of this repository that a stage script imports, directly or not (static).

Every ``import`` and ``from ... import`` statement is followed, module level or inside a
function, because a stage that calls the function imports the module. Modules named only as
strings are not: the warm worker's server preloads modules by name, and it is held to
producing the same bytes as a cold process (tests/test_worker.py), so what it preloads is not
part of what a stage computes.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "minichatgpt"


def module_file(name: str) -> Path | None:
    """The file of a module of this package, or None for anything else."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(path: Path) -> set[str]:
    """Module names imported by one file (``from a import b`` yields ``a`` and ``a.b``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def closure(script: Path) -> set[Path]:
    """``script`` and every file of the package it imports, with each package's ``__init__``."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
                found = module_file(".".join(parts[:i]))
                if found is not None and found not in seen:
                    todo.append(found)
    return seen
