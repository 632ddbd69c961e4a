"""Helpers shared by the ONNX rewrite rules: constants, attributes, uses, and change records.

A rule never keeps state on ``self`` between ``check`` and ``rewrite``: ``rewrite`` recomputes
what it needs from the match bindings. What a rewrite *did* travels with the graph instead: the
new node carries a metadata record (:func:`record`), copied onto whatever later replaces it, and
:func:`take_changes` collects and removes the records once all rules have run. A rewrite whose
nodes never reach the final graph leaves no record behind.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from ...report import Change, SkipReason

FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})

_RECORD_PREFIX = "normsurgeon.change."


# --------------------------------------------------------------------------- values and attributes


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant tensor as numpy (initializer or Constant output), else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_float()


def attr_ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else list(attr.as_ints())


def attr_str(node: ir.Node, name: str, default: str) -> str:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_string()


def static_shape(value: ir.Value) -> tuple[int, ...] | None:
    """The value's shape when every dim is a known integer."""
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(int(d) for d in shape)


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def opset_version(model: ir.Model) -> int:
    """The default-domain opset the model imports."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def reduce_axes(node: ir.Node) -> list[int] | None:
    """ReduceMean's axes, from its input (opset >= 18) or attribute (older); None if not constant."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = constant(node.inputs[1])
        return None if axes is None else [int(a) for a in np.ravel(axes)]
    return attr_ints(node, "axes")


def trailing_axes(axes: list[int], rank_: int | None) -> int | None:
    """k when ``axes`` are exactly the last k axes (in any sign convention), else None."""
    if not axes:
        return None
    if all(a < 0 for a in axes):
        normalized = sorted(axes)
        k = len(normalized)
        return k if normalized == list(range(-k, 0)) else None
    if rank_ is None:
        return None
    normalized = sorted(a % rank_ for a in axes)
    k = len(normalized)
    return k if normalized == list(range(rank_ - k, rank_)) else None


def is_scalar(array: np.ndarray | None, value: float) -> bool:
    return array is not None and array.size == 1 and float(array.reshape(())) == value


# --------------------------------------------------------------------------- uses and names


def describe(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name}'"


def other_users(value: ir.Value, allowed: set[ir.Node]) -> list[str]:
    """Who else reads ``value`` besides ``allowed``: nodes, or the graph output."""
    others = [describe(node) for node in value.consumers() if node not in allowed]
    if value.is_graph_output():
        others.append("the graph output")
    return sorted(set(others))


def param_problem(value: ir.Value | None, role: str) -> str | None:
    """Why a weight/bias cannot be folded: not constant, or overridable at run time."""
    if value is None:
        return None
    if value.is_graph_input():
        return f"its {role} '{value.name}' is a graph input, so it can change at run time"
    if constant(value) is None:
        return f"its {role} '{value.name}' is not a constant initializer"
    if value.dtype is not None and value.dtype not in FLOAT_TYPES:
        return f"its {role} '{value.name}' is not floating point"
    return None


def sharing_note(value: ir.Value | None, owner: ir.Node, role: str) -> str:
    """A change-detail sentence when ``value`` is also read by nodes other than ``owner``."""
    if value is None:
        return ""
    others = other_users(value, {owner})
    if not others:
        return ""
    return f"; its {role} '{value.name}' is shared with {', '.join(others)}, so the folded node got its own copy"


def unique_initializer_name(graph: ir.Graph, base: str) -> str:
    names = graph.initializers
    if base not in names:
        return base
    index = 1
    while f"{base}.{index}" in names:
        index += 1
    return f"{base}.{index}"


def new_initializer(op, graph: ir.Graph, array: np.ndarray, base: str) -> ir.Value:
    """A fresh initializer (never one that overwrites an existing name, which may be shared)."""
    name = unique_initializer_name(graph, base)
    return op.initializer(ir.tensor(np.ascontiguousarray(array), name=name), name=name)


# --------------------------------------------------------------------------- BatchNormalization


def batchnorm_problem(bn: ir.Node) -> tuple[SkipReason, str] | None:
    """Why a BatchNormalization node is not in foldable (inference) form, or None."""
    if attr_int(bn, "training_mode", 0) or any(out.uses() for out in bn.outputs[1:]):
        return SkipReason.TRAINING_MODE, "training_mode=1 (it normalizes with batch statistics)"
    if len(bn.inputs) < 5:
        return SkipReason.NO_FOLDABLE_NEIGHBOUR, "it lacks one of scale, bias, mean, var"
    x = bn.inputs[0]
    if x is not None and x.dtype is not None and x.dtype not in FLOAT_TYPES:
        return SkipReason.UNSUPPORTED_DTYPE, f"its input is {x.dtype.name}"
    params = [constant(v) for v in bn.inputs[1:5]]
    if any(p is None for p in params):
        return SkipReason.NO_FOLDABLE_NEIGHBOUR, "its scale, bias, mean and var are not all constant"
    if not all(np.isfinite(p.astype(np.float64)).all() for p in params):  # type: ignore[union-attr]
        return SkipReason.NONFINITE_STATS, "its mean, var, scale or bias holds NaN or inf"
    return None


def batchnorm_failure(normalized: ir.Value) -> tuple[str, ir.Node] | None:
    """For a rule's check: why the BN producing ``normalized`` cannot be folded at all, or None."""
    bn = normalized.producer()
    problem = batchnorm_problem(bn)
    if problem is not None:
        return problem[1], bn
    if not normalized.uses() and not normalized.is_graph_output():
        return "its output is unused", bn
    return None


def batchnorm_affine(bn: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) in float64 with ``BN(x)_c = s_c * x_c + t_c`` (s = gamma/sqrt(var+eps), t = beta - mean*s)."""
    gamma, beta, mean, var = (constant(v).astype(np.float64) for v in bn.inputs[1:5])  # type: ignore[union-attr]
    scale = gamma / np.sqrt(var + attr_float(bn, "epsilon", 1e-5))
    return scale.reshape(-1), (beta - mean * scale).reshape(-1)


# --------------------------------------------------------------------------- change records


def record(node: ir.Node, change: Change) -> None:
    """Attach ``change`` to the node a rewrite produced (see the module docstring)."""
    node.metadata_props[_RECORD_PREFIX + change.module] = json.dumps(change.to_dict())


def records(node: ir.Node) -> list[Change]:
    """The changes recorded on ``node`` so far."""
    return [_parse(value) for key, value in node.metadata_props.items() if key.startswith(_RECORD_PREFIX)]


def _parse(text: str) -> Change:
    data = json.loads(text)
    return Change(data["action"], data["module"], data["into"], data["detail"])


def take_changes(graph: ir.Graph) -> list[Change]:
    """Collect the records of the rewrites that reached the graph (subgraphs included), in graph
    order, and remove them."""
    changes: list[Change] = []
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for key in [k for k in node.metadata_props if k.startswith(_RECORD_PREFIX)]:
            change = _parse(node.metadata_props.pop(key))
            if change not in changes:
                changes.append(change)
    return changes
