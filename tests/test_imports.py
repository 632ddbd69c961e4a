"""normsurgeon's own import graph, read from the source (AST only, nothing is imported).

Three rules:

1. no import cycle (a strongly connected component of the module graph), counting imports inside
   functions too: a lazy import only hides a cycle;
2. no ``from <another normsurgeon module> import _private``: what two modules share is public,
   and lives in the lower one (shared pass helpers: :mod:`normsurgeon.dataflow`, :mod:`normsurgeon.surgery`);
3. layers import only downward: core < passes < onnx < cli_options < commands < cli. The facade
   ``normsurgeon/__init__.py`` re-exports every layer; its own imports are not counted, and it
   counts as the top layer for a module that imports it. ``__main__`` may import anything.

The package must have none: a finding fails with its name and where (file:line, or the modules
of a cycle).
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "normsurgeon"
LAYERS = ("core", "normsurgeon.passes", "normsurgeon.onnx", "normsurgeon.cli_options", "normsurgeon.commands",
          "normsurgeon.cli")
EXEMPT = {"normsurgeon.__main__"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(imported normsurgeon module, name imported from it or None, line) for every import in the file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + (node.module.split(".") if node.module else []))
            targets = []
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                targets.append((submodule, None) if submodule in known else (module, alias.name))
        else:
            continue
        for module, attr in targets:
            if module != "normsurgeon" and not module.startswith("normsurgeon."):
                continue
            while module not in known and "." in module:  # `import normsurgeon.x.y`: a name inside a module
                module = module.rsplit(".", 1)[0]
            if module != name:
                found.append((module, attr, node.lineno))
    return found


def layer(module: str) -> int:
    if module == "normsurgeon":
        return len(LAYERS) - 1
    return max((i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")), default=0)


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def shortest_cycle(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """The shortest cycle through the component's first module (which names the component)."""
    start, members = component[0], set(component)
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(edges.get(v, set()) & members):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if w not in previous:
                previous[w] = v
                queue.append(w)
    raise AssertionError(f"{component} is not a cycle")


def findings() -> tuple[set[str], dict[str, str]]:
    """What the three rules find, and where (file:line) or which modules, per finding."""
    known = modules()
    edges: dict[str, set[str]] = {}
    found: dict[str, str] = {}
    for name, path in known.items():
        if name == "normsurgeon":
            continue
        where = path.relative_to(PACKAGE.parent)
        for module, attr, line in imports(name, path, known):
            edges.setdefault(name, set()).add(module)
            if attr and attr.startswith("_") and not attr.startswith("__"):
                found[f"private: {name} imports {attr} from {module}"] = f"{where}:{line}"
            if name not in EXEMPT and layer(module) > layer(name):
                what = lambda m: "core" if layer(m) == 0 else LAYERS[layer(m)].rpartition(".")[2]  # noqa: E731
                found[f"upward: {name} ({what(name)}) imports {module} ({what(module)})"] = f"{where}:{line}"
    for component in strongly_connected(edges):
        found["cycle: " + " -> ".join(shortest_cycle(component, edges))] = "modules in it: " + ", ".join(component)
    return set(found), found


def test_no_import_cycle_private_import_or_upward_import():
    found, where = findings()
    assert found == set(), "\n".join(f"{f} ({where[f]})" for f in sorted(found))


def test_the_graph_reader_sees_what_the_rules_need(tmp_path, monkeypatch):
    """The reader itself: relative imports resolved, function-level imports and cycles found, facade skipped."""
    root = tmp_path / "normsurgeon"
    files = {
        "__init__.py": "from .passes.a import f\n",
        "core.py": "def g():\n    from .passes import a\n",
        "passes/__init__.py": "",
        "passes/a.py": "from ..core import g\nfrom .b import _hidden\nimport normsurgeon.cli\n",
        "passes/b.py": "_hidden = 1\n",
        "cli.py": "",
    }
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    monkeypatch.setitem(globals(), "PACKAGE", root)  # this module's global, read by modules()
    found, _ = findings()
    assert found == {
        "cycle: normsurgeon.core -> normsurgeon.passes.a -> normsurgeon.core",
        "private: normsurgeon.passes.a imports _hidden from normsurgeon.passes.b",
        "upward: normsurgeon.core (core) imports normsurgeon.passes.a (passes)",
        "upward: normsurgeon.passes.a (passes) imports normsurgeon.cli (cli)",
    }
