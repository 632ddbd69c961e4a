"""Find where a module would be imported from, and whether it defines a class, without importing it.

``importlib.util.find_spec("a.b")`` imports ``a`` first, so it is not used: each part of the dotted
name is looked up with ``PathFinder`` in the folders of the part before it. The source is read
with ``ast``, never run. The search order puts installed packages first and the current
directory and ``--import-path`` folders last, so a ``transformers.py`` beside the model can add
classes but never stand in for the real package.
"""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.machinery import PathFinder, SourceFileLoader
from pathlib import Path

_MAX_SOURCE_BYTES = 8 * 1024 * 1024  # a module's source larger than this is not parsed


@dataclass(frozen=True)
class ModuleSource:
    """Where a module's code lives: its source file, or None for a namespace package."""

    name: str
    origin: Path | None


def search_path(user_paths: Sequence[str | Path] = ()) -> list[str]:
    """sys.path with the current directory (and ``''``) moved after the installed packages,
    followed by ``user_paths``: the order in which modules named by a file are looked up."""
    cwd = os.getcwd()
    late = {"", ".", cwd}
    installed = [p for p in sys.path if p not in late and os.path.abspath(p or ".") != cwd]
    extra = [str(Path(p).resolve()) for p in user_paths]
    return installed + [cwd] + [p for p in extra if p not in installed]


def locate(module: str, path: Sequence[str]) -> ModuleSource | None:
    """The source of ``module`` as an import along ``path`` would find it; None if absent.

    Only plain Python source files qualify: an extension module or bytecode-only module cannot
    be checked without running it, so it is reported as absent.
    """
    parts = module.split(".")
    locations: Sequence[str] | None = list(path)
    spec = None
    for index in range(len(parts)):
        if locations is None:  # a plain module has no submodules
            return None
        spec = PathFinder.find_spec(".".join(parts[: index + 1]), locations)
        if spec is None:
            return None
        locations = spec.submodule_search_locations
    assert spec is not None
    if spec.origin is None or spec.origin == "namespace":
        return ModuleSource(module, None)
    if not isinstance(spec.loader, SourceFileLoader):
        return None
    return ModuleSource(module, Path(spec.origin))


def defines_class(source: ModuleSource, name: str) -> bool:
    """True when the module's source defines ``class name`` at module level (also under if/try)."""
    if source.origin is None:
        return False
    try:
        if source.origin.stat().st_size > _MAX_SOURCE_BYTES:
            return False
        tree = ast.parse(source.origin.read_bytes(), filename=str(source.origin))
    except (OSError, SyntaxError, ValueError):
        return False
    return any(isinstance(node, ast.ClassDef) and node.name == name for node in _module_level(tree.body))


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements at module level, looking into if/try/with blocks but not functions or classes."""
    stack = list(reversed(body))
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            children: list[ast.stmt] = list(node.body)
            children += getattr(node, "orelse", []) + getattr(node, "finalbody", [])
            for handler in getattr(node, "handlers", []):
                children += handler.body
            stack.extend(reversed(children))
