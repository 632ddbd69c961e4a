"""Walks over module graphs and nested containers that stay linear when objects are shared.

A file can make a model whose submodules are shared by name at every level (``Sequential(m, m)``
nested 60 deep is 17 KB and has 2**61 module paths), or inputs that are a list DAG, a
self-referential list or a list nested 200 000 deep. torch's ``named_modules(remove_duplicate=False)``,
``named_parameters(remove_duplicate=False)`` and pytree walk every path (or recurse on every
level); the walks here visit each object once, with an explicit stack:

* :func:`module_graph` visits each distinct module once, in ``named_modules()`` order, and
  computes (by dynamic programming over the DAG, never by enumerating) how many registration
  paths reach each module, the last path ``named_modules(remove_duplicate=False)`` would give it,
  and the nesting depth. A cycle is reported, not followed.
* :func:`refuse_unwalkable` refuses, in one line, a module graph with a cycle, more than
  :data:`MAX_MODULE_PATHS` paths (running such a model calls its leaves that many times) or
  deeper than :data:`MAX_MODULE_DEPTH` (torch's own recursive walks would overflow).
* :func:`check_nesting` checks loaded inputs: cycles and nesting deeper than :data:`MAX_NESTING`
  are refused; a DAG is fine (every later walk visits a shared container once).
* :func:`iter_leaves` yields the leaves of a nested structure in ``tree_flatten`` order, visiting
  each container once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import LoadError, PreconditionError

# More registration paths than this: running the model would call its leaves about that many times.
# Real models have one path per module, or a few per shared block (ALBERT-style sharing).
MAX_MODULE_PATHS = 1_000_000
# Deeper module nesting than this overflows torch's recursive walks (eval(), state_dict(), deepcopy).
MAX_MODULE_DEPTH = 400
# Deeper nesting of inputs than this is no set of example inputs (and overflows pytree's recursion).
MAX_NESTING = 200


@dataclass
class ModuleGraph:
    """Each distinct module of a model once, in ``named_modules()`` order, with what the paths to it are."""

    modules: list[nn.Module] = field(default_factory=list)  # named_modules() order (first visits)
    first_path: dict[int, str] = field(default_factory=dict)  # id -> the path named_modules() gives it
    last_path: dict[int, str] = field(default_factory=dict)  # id -> the last of named_modules(remove_duplicate=False)
    path_count: dict[int, int] = field(default_factory=dict)  # id -> how many registration paths reach it
    edges: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)  # (parent, name, child), once each
    depth: int = 0  # the longest chain of registrations from the root
    cycle: str | None = None  # a path that registers one of its own ancestors, if any

    @property
    def total_paths(self) -> int:
        """How many entries ``named_modules(remove_duplicate=False)`` would yield."""
        return sum(self.path_count.values())


def module_graph(model: nn.Module) -> ModuleGraph:
    """Walk the modules of ``model`` once each (iteratively); see :class:`ModuleGraph`."""
    graph = ModuleGraph()
    on_stack: set[int] = set()
    postorder: list[nn.Module] = []
    children: dict[int, list[tuple[str, nn.Module]]] = {}
    by_id: dict[int, nn.Module] = {}

    def enter(module: nn.Module, path: str) -> Iterator[tuple[str, nn.Module]]:
        key = id(module)
        by_id[key] = module
        graph.modules.append(module)
        graph.first_path[key] = path
        on_stack.add(key)
        kids = [(name, child) for name, child in module._modules.items() if child is not None]
        children[key] = kids
        return iter(kids)

    stack: list[tuple[nn.Module, str, Iterator[tuple[str, nn.Module]]]] = [(model, "", enter(model, ""))]
    while stack:
        parent, parent_path, pending = stack[-1]
        step = next(pending, None)
        if step is None:
            stack.pop()
            on_stack.discard(id(parent))
            postorder.append(parent)
            continue
        name, child = step
        graph.edges.append((parent, name, child))
        child_path = f"{parent_path}.{name}" if parent_path else name
        if id(child) in on_stack:
            graph.cycle = graph.cycle or child_path
            continue
        if id(child) not in graph.first_path:
            stack.append((child, child_path, enter(child, child_path)))

    if graph.cycle is not None:
        return graph
    # Reverse postorder is a topological order of the DAG: every parent before its children.
    order = postorder[::-1]
    # Size of each module's unfolded subtree (itself once per path below it), children first.
    size: dict[int, int] = {}
    for module in postorder:
        size[id(module)] = 1 + sum(size[id(child)] for _, child in children[id(module)])
    count: dict[int, int] = {id(model): 1}
    level: dict[int, int] = {id(model): 0}
    # When the last visit of each module starts in the unfolded pre-order walk, and on which path.
    last_start: dict[int, int] = {id(model): 0}
    graph.last_path[id(model)] = ""
    for module in order:
        key = id(module)
        offset = last_start[key] + 1
        for name, child in children[key]:
            ckey = id(child)
            count[ckey] = count.get(ckey, 0) + count[key]
            level[ckey] = max(level.get(ckey, 0), level[key] + 1)
            if offset > last_start.get(ckey, -1):
                last_start[ckey] = offset
                graph.last_path[ckey] = f"{graph.last_path[key]}.{name}" if graph.last_path[key] else name
            offset += size[ckey]
    graph.path_count = {id(m): count[id(m)] for m in graph.modules}
    graph.depth = max(level.values(), default=0)
    return graph


def refuse_unwalkable(model: nn.Module, source: str | Path | None = None) -> ModuleGraph:
    """The model's :class:`ModuleGraph`; a one-line error for a cycle, a path explosion or extreme depth.

    With ``source`` (the file the model came from) the error is a :class:`LoadError` naming it;
    without, a :class:`PreconditionError` (a model built in Python).
    """
    graph = module_graph(model)
    problem = None
    if graph.cycle is not None:
        problem = (f"the model's module graph has a cycle ({graph.cycle} registers a module that contains it), "
                   "so walking or running it never ends")
    elif graph.total_paths > MAX_MODULE_PATHS:
        problem = (f"the model registers its {len(graph.modules)} modules under {_amount(graph.total_paths)} paths "
                   f"(submodules shared by name at every level, {graph.depth} levels deep), more than {MAX_MODULE_PATHS:,}; "
                   "walking or running it would take about that many steps")
    elif graph.depth > MAX_MODULE_DEPTH:
        problem = f"the model's modules are nested {graph.depth} levels deep, more than {MAX_MODULE_DEPTH}"
    if problem is None:
        return graph
    if source is not None:
        raise LoadError(f"{source}: {problem} (a hostile or corrupt file?); re-save the model")
    raise PreconditionError(f"{problem}; build it with fewer shared or nested submodules")


def registrations(graph: ModuleGraph, members: str = "_parameters") -> dict[int, int]:
    """id(tensor) -> how often ``named_parameters(remove_duplicate=False)`` (or buffers) would list it."""
    counts: dict[int, int] = {}
    for module in graph.modules:
        paths = graph.path_count.get(id(module), 1)
        for tensor in getattr(module, members).values():
            if tensor is not None:
                counts[id(tensor)] = counts.get(id(tensor), 0) + paths
    return counts


def _amount(n: int) -> str:
    return f"{n:,}" if n < 10**12 else f"about 2**{round(math.log2(n))}"


# --------------------------------------------------------------------------- nested containers


def node_children(obj: Any) -> list[Any] | None:
    """The children of a pytree node, one level (``tree_flatten`` order), or None for a leaf."""
    if isinstance(obj, torch.Tensor):
        return None
    kind = type(obj)
    if kind is tuple or kind is list:
        return list(obj)
    if kind is dict:
        return list(obj.values())
    try:
        if pytree.tree_is_leaf(obj):
            return None
        children, _ = pytree.SUPPORTED_NODES[pytree._get_node_type(obj)].flatten_fn(obj)
    except Exception:  # an unregistered or odd type: a leaf, as tree_flatten treats it
        return None
    return list(children)


def iter_leaves(obj: Any) -> Iterator[Any]:
    """The leaves of a nested structure in ``tree_flatten`` order; a container seen before is skipped.

    Linear in the number of distinct containers and their entries (a DAG does not blow up, a cycle
    ends), and iterative (no recursion limit).
    """
    seen: set[int] = set()
    stack: list[Iterator[Any]] = [iter((obj,))]
    while stack:
        item = next(stack[-1], _DONE)
        if item is _DONE:
            stack.pop()
            continue
        children = node_children(item)
        if children is None:
            yield item
        elif id(item) not in seen:
            seen.add(id(item))
            stack.append(iter(children))


_DONE = object()


def check_nesting(obj: Any, label: str, *, max_depth: int = MAX_NESTING) -> None:
    """Refuse (LoadError) a loaded structure that contains itself or is nested deeper than ``max_depth``.

    Iterative, each container visited once: a list DAG is checked in linear time and accepted.
    """
    state: dict[int, int] = {}  # id -> 1 while on the current path, 2 when done
    stack: list[tuple[Any, Iterator[Any]]] = []

    def push(item: Any) -> bool:
        children = node_children(item)
        if children is None:
            return True
        mark = state.get(id(item))
        if mark == 1:
            raise LoadError(f"{label} contains itself (a {type(item).__name__} that holds itself); "
                            "save plain tensors, tuples, lists or dicts without cycles")
        if mark == 2:
            return True
        if len(stack) >= max_depth:
            raise LoadError(f"{label} is nested more than {max_depth} levels deep (a hostile or corrupt file?); "
                            "save a tensor, a tuple/list or a dict of tensors")
        state[id(item)] = 1
        stack.append((item, iter(children)))
        return True

    push(obj)
    while stack:
        item, pending = stack[-1]
        child = next(pending, _DONE)
        if child is _DONE:
            stack.pop()
            state[id(item)] = 2
            continue
        push(child)
