"""Half-precision ONNX graphs in onnxruntime: float32 islands where a provider has no kernel for the dtype.

onnxruntime's CPU provider has few half-precision kernels. Measured on onnxruntime 1.32 (its kernel
registry, :func:`onnxruntime.capi._pybind_state.get_all_opkernel_def`, which this module reads):

* bfloat16: only data movement (Reshape, Transpose, Concat, Slice, Split, Gather, Squeeze,
  Unsqueeze, Cast, ...), LayerNormalization and com.microsoft's (Skip)SimplifiedLayerNormalization.
  No MatMul, Gemm, Add, Mul, Attention, RMSNormalization, RotaryEmbedding, Sigmoid, Tanh, Expand:
  a bfloat16 Llama or GPT-2 fails to load ("Could not find an implementation for MatMul(13)").
* float16: also Attention, RMSNormalization, RotaryEmbedding and Expand, still no MatMul/Gemm/Add/
  Mul/Softmax; but for float16 the CPU provider inserts float32 Casts around such nodes itself when
  it loads the model (its InsertCastTransformer), so float16 files load and run unchanged.

:func:`add_float32_islands` rewrites the nodes without a kernel for their half dtype to compute in
float32: one Cast to float32 per half value entering an island, one Cast back per value leaving it.
Neighbouring islands are one island: a node that has a kernel but reads an island's output (a
Reshape or Transpose between two MatMuls) joins it instead of costing a Cast pair. Weights stay in
their half dtype on disk (their Cast is constant-folded when onnxruntime loads the file). By default
only bfloat16 is rewritten; the float16 nodes the provider casts itself are reported, not rewritten.

Subgraphs (If/Loop bodies) and model functions are left as they are.
"""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

from .runtime import PROVIDERS, ort_value, run_torch, to_torch

HALF = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
# Never computed in float32: an attribute sets their output dtype (float32 would change what they produce), or
# a subgraph produces their outputs (it would still produce the half dtype).
_KEEP_DTYPE = frozenset({"Cast", "CastLike", "ConstantOfShape", "EyeLike", "RandomNormalLike", "RandomUniformLike",
                         "RandomNormal", "RandomUniform", "Constant", "If", "Loop", "Scan", "SequenceMap"})

_KernelDef = tuple[int, int, Mapping[str, frozenset[str]]]  # since-version range, type constraints


@dataclass
class Islands:
    """What :func:`add_float32_islands` found and did for one model."""

    provider: str = "cpu"
    float32_ops: dict[str, dict[str, int]] = field(default_factory=dict)  # dtype -> op type -> nodes with no kernel
    written: frozenset[str] = frozenset()  # the half dtypes whose islands are in the file (the others: the provider's)
    joined: int = 0  # nodes that have a half kernel but read an island's output, computed in float32 with it
    islands: int = 0
    casts: int = 0

    def note(self) -> str | None:
        """One line for a report: which ops compute in float32, and where the casts are; None when none do."""
        parts = []
        for dtype, ops in self.float32_ops.items():
            listed = ", ".join(f"{op} x{n}" for op, n in sorted(ops.items(), key=lambda item: (-item[1], item[0])))
            lacking = f"onnxruntime {self.provider} has no {dtype} kernel for {listed}"
            if dtype not in self.written:
                parts.append(f"{lacking}: it computes them in float32 (casts it inserts when it loads the file)")
                continue
            joined = f", and {_plural(self.joined, 'node')} with a {dtype} kernel inside them" if self.joined else ""
            parts.append(f"{lacking}: they compute in float32, in {_plural(self.islands, 'island')} "
                         f"({_plural(self.casts, 'Cast')} in the file{joined}); the weights stay {dtype} on disk")
        return "; ".join(parts) or None


def add_float32_islands(model: ir.Model, provider: str = "cpu", *, float16: bool = False) -> Islands:
    """Make ``model`` loadable by onnxruntime's ``provider`` by computing each half-precision node it has no
    kernel for in float32, in place; returns which op types that took.

    bfloat16 nodes are rewritten; float16 ones only with ``float16`` (onnxruntime's CPU provider
    casts those itself at load time, and a file with fewer casts stays fast where float16 kernels
    exist, e.g. CUDA): otherwise they are only counted.
    """
    targets = {ir.DataType.BFLOAT16, *((ir.DataType.FLOAT16,) if float16 else ())}
    lacking = [node for node in model.graph if _lacks_half_kernel(model, node, provider)]
    per_dtype: dict[str, Counter[str]] = defaultdict(Counter)
    for node in lacking:
        for dtype in sorted(_half_dtypes([node]), key=lambda d: d.value):
            per_dtype[_dtype_name(dtype)][_op_name(node)] += 1
    found = Islands(provider, {dtype: dict(ops) for dtype, ops in per_dtype.items()},
                    frozenset(_dtype_name(d) for d in targets) & per_dtype.keys())
    seeds = [n for n in lacking if _half_dtypes([n]) <= targets and n.op_type not in _KEEP_DTYPE]
    island = _grow(model, seeds, provider, targets)
    if island:
        found.joined = sum(node not in lacking for node in island)
        found.islands = _count_components(island)
        found.casts = _rewrite(model.graph, island, targets)
    return found


def _grow(model: ir.Model, seeds: Sequence[ir.Node], provider: str, targets: set[ir.DataType]) -> set[ir.Node]:
    """The seeds, and every later node that reads a seed's (or a joined node's) half output and has a float32
    kernel: data movement between two islands then computes in float32 too, instead of a Cast pair.

    A value of unknown dtype (the sum output of a fused com.microsoft Skip*LayerNormalization, which the
    rewrite leaves untyped) gets no Cast, so its reader computes on the side of its producer: it joins when
    the producer is in the island, and stays out when the producer is not."""
    island = set(seeds)
    for node in model.graph:  # topological order: a chain joins link by link
        if node in island or node.op_type in _KEEP_DTYPE:
            continue
        untyped = _untyped_producers_inside(node, island)
        if False in untyped:
            continue
        reads_island = True in untyped or any(v is not None and v.dtype in targets and v.producer() in island
                                              for v in node.inputs)
        if reads_island and _has_kernel(model, node, provider, as_float32=targets):
            island.add(node)
    return {node for node in island if _has_kernel(model, node, provider, as_float32=targets)}


def _untyped_producers_inside(node: ir.Node, island: set[ir.Node]) -> set[bool]:
    """For each input of unknown dtype made by a node: whether that node is in the island."""
    return {v.producer() in island for v in node.inputs if v is not None and v.dtype is None and v.producer()}


def _rewrite(graph: ir.Graph, island: set[ir.Node], targets: set[ir.DataType]) -> int:
    """Cast the island's half inputs to float32 and its half outputs back; its inner values become float32.
    Returns the number of Casts added."""
    casts = 0
    entering: dict[ir.Value, list[tuple[ir.Node, int]]] = defaultdict(list)
    for node in graph:
        if node not in island:
            continue
        for i, value in enumerate(node.inputs):
            if value is not None and value.dtype in targets and value.producer() not in island:
                entering[value].append((node, i))
    for value, uses in entering.items():
        cast = ir.node("Cast", [value], attributes={"to": ir.DataType.FLOAT}, name=f"{value.name}_to_float32",
                       outputs=[ir.val(f"{value.name}_float32", ir.DataType.FLOAT, value.shape)])
        graph.insert_before(uses[0][0], cast)
        for node, i in uses:
            node.replace_input_with(i, cast.outputs[0])
        casts += 1
    for node in [n for n in graph if n in island]:
        for value in node.outputs:
            if value.dtype in targets:
                casts += _leave_island(graph, node, value, island)
    return casts


def _leave_island(graph: ir.Graph, node: ir.Node, value: ir.Value, island: set[ir.Node]) -> int:
    """Make ``value`` float32; readers outside the island (and the graph's outputs) get a Cast back, under the
    original name. Returns the Casts added (0 or 1)."""
    half = value.dtype
    outside = [(user, i) for user, i in value.uses() if user not in island]
    is_output = value.is_graph_output()
    value.dtype = ir.DataType.FLOAT
    if not outside and not is_output:
        return 0
    name = value.name
    value.name = f"{name}_float32"
    restored = ir.val(name, half, value.shape)
    back = ir.node("Cast", [value], attributes={"to": half}, name=f"{name}_to_{_dtype_name(half)}", outputs=[restored])
    graph.insert_after(node, back)
    for user, i in outside:
        user.replace_input_with(i, restored)
    if is_output:
        graph.outputs[:] = [restored if out is value else out for out in graph.outputs]
    return 1


def _count_components(island: set[ir.Node]) -> int:
    """Connected parts of the island (nodes joined by a value one produces and another reads)."""
    parent = {node: node for node in island}

    def root(node: ir.Node) -> ir.Node:
        while parent[node] is not node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for node in island:
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer in island:
                parent[root(node)] = root(producer)
    return len({root(node) for node in island})


# --------------------------------------------------------------------------- onnxruntime's kernels


def _lacks_half_kernel(model: ir.Model, node: ir.Node, provider: str) -> bool:
    """Whether ``node`` reads or writes a half dtype and ``provider`` registers kernels for its op, none of them
    for these types. An op with no kernel at all (Constant; function ops onnxruntime expands) is not counted."""
    return bool(_half_dtypes([node])) and not _has_kernel(model, node, provider)


def _has_kernel(model: ir.Model, node: ir.Node, provider: str, as_float32: Iterable[ir.DataType] = ()) -> bool:
    """Whether ``provider`` has a kernel for ``node``'s types (with ``as_float32`` dtypes read as float32)."""
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    opset = model.opset_imports.get(node.domain, model.opset_imports.get(domain, 1))
    schema = _schema(node.op_type, domain, opset)
    version = schema.since_version if schema is not None else opset
    defs = [d for d in _kernel_defs(provider).get((domain, node.op_type), ()) if d[0] <= version <= d[1]]
    if not defs:
        return True
    bound = _bound_types(node, schema, set(as_float32))
    return any(_accepts(constraints, bound) for _, _, constraints in defs)


def _bound_types(node: ir.Node, schema: onnx.defs.OpSchema | None, as_float32: set[ir.DataType]) -> dict[str, set[str]]:
    """The ORT type strings of ``node``'s inputs and outputs, keyed by the schema's type parameter and by the
    formal's name (a kernel constrains either); without a schema, all under ``*``."""
    bound: dict[str, set[str]] = defaultdict(set)
    sides = ((node.inputs, schema.inputs if schema else ()), (node.outputs, schema.outputs if schema else ()))
    for values, formals in sides:
        for i, value in enumerate(values):
            if value is None or value.dtype is None:
                continue
            dtype = ir.DataType.FLOAT if value.dtype in as_float32 else value.dtype
            kind = f"tensor({dtype.name.lower()})"
            if not formals:
                bound["*"].add(kind)
                continue
            formal = formals[min(i, len(formals) - 1)]
            bound[formal.type_str].add(kind)
            bound[formal.name].add(kind)
    return bound


def _accepts(constraints: Mapping[str, frozenset[str]], bound: Mapping[str, set[str]]) -> bool:
    if "*" in bound:  # no schema: a kernel accepts the node when some constraint lists each of its types
        listed = frozenset().union(*constraints.values()) if constraints else frozenset()
        return bound["*"] <= listed
    return all(bound.get(key, set()) <= allowed for key, allowed in constraints.items())


@functools.cache
def _kernel_defs(provider: str) -> dict[tuple[str, str], tuple[_KernelDef, ...]]:
    """onnxruntime's registered kernels of ``provider``: (domain, op) -> (since-version range, type constraints)."""
    from onnxruntime.capi import _pybind_state

    table: dict[tuple[str, str], list[_KernelDef]] = defaultdict(list)
    for kernel in _pybind_state.get_all_opkernel_def():
        if kernel.provider == PROVIDERS[provider]:
            low, high = kernel.version_range
            constraints = {key: frozenset(types) for key, types in kernel.type_constraints.items()}
            table[(kernel.domain, kernel.op_name)].append((low, high, constraints))
    return {key: tuple(defs) for key, defs in table.items()}


@functools.cache
def _schema(op_type: str, domain: str, opset: int) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return None


def _half_dtypes(nodes: Iterable[ir.Node]) -> set[ir.DataType]:
    return {v.dtype for node in nodes for v in (*node.inputs, *node.outputs) if v is not None and v.dtype in HALF}


def _op_name(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _dtype_name(dtype: ir.DataType) -> str:
    return {ir.DataType.BFLOAT16: "bfloat16", ir.DataType.FLOAT16: "float16"}.get(dtype, dtype.name.lower())


# --------------------------------------------------------------------------- running bfloat16 files


__all__ = ["HALF", "Islands", "add_float32_islands", "ort_value", "run_torch", "to_torch"]
