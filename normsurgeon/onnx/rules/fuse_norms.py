"""Fuse decomposed normalizations into the native ONNX op, where the model's opset has it.

Over the normalized (trailing) axes, with ``E`` the mean:

    LayerNormalization (opset 17):  y = (x - E[x]) / sqrt(E[(x - E[x])^2] + eps) * scale + bias
    RMSNormalization   (opset 23):  y = x / sqrt(E[x^2] + eps) * scale
    GroupNormalization (opset 21):  y = InstanceNorm(x viewed as (N, G, -1)) viewed back, * scale_c + bias_c

Each fusion is two steps, so each rule is small: a *core* rule turns the chain (as torch's
exporters emit it: ReduceMean with axes as input or attribute, Pow or Mul for the square, Div,
Reciprocal or ``1/`` for the inverse; Reshape+InstanceNormalization+Reshape for GroupNorm) into
the native op with a neutral affine (scale 1, bias 0), and *absorb* rules fold a following
``Mul``/``Add`` by a constant into the op's scale and bias, when that constant is per
normalized element (LayerNorm, RMSNorm) or per channel (GroupNorm):

    scale' = scale * m,  bias' = bias * m   (Mul by m);     bias' = bias + a   (Add of a).

onnxscript's own fusion rules (``rewriter.rules.fusion``) were measured on torch 2.13's exports
and not reused: they require ``axes=[-1]`` as an input (missing the legacy exporter's attribute
form and nn.RMSNorm's positive ``axes=[2]``) and a Reciprocal (missing legacy RMSNorm's
``Div(1, .)``), and keep state on the rule between check and rewrite. Which opset each fusion
needs is data (:data:`NORM_FUSIONS`); the driver applies a family only where the opset allows it,
and otherwise reports the chains it found (GroupNormalization-18 scaled per group, not per
channel, so only the 21 form is emitted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from ...report import Change
from ._common import (
    FLOAT_TYPES,
    attr_float,
    attr_int,
    constant,
    describe,
    is_scalar,
    new_initializer,
    record,
    records,
    reduce_axes,
    static_shape,
    trailing_axes,
)

MatchResult = pattern.MatchResult


def _unique_node_name(graph: ir.Graph, base: str) -> str:
    names = {node.name for node in graph}
    name, index = base, 1
    while name in names:
        name, index = f"{base}.{index}", index + 1
    return name


def _stash_type(x: ir.Value) -> int:
    return ir.DataType.DOUBLE.value if x.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT.value


def _trailing_norm(x: ir.Value, reduce_nodes: list[ir.Node], eps: ir.Value | None) -> tuple[int, float] | str:
    """(k, eps) when every ReduceMean keeps dims and reduces the same last k axes of x; else why not."""
    if x.dtype not in FLOAT_TYPES:
        return "its input is not floating point"
    axes = [reduce_axes(node) for node in reduce_nodes]
    if any(a is None for a in axes) or any(a != axes[0] for a in axes):
        return "its ReduceMean axes are not constant or differ"
    if any(attr_int(node, "keepdims", 1) != 1 for node in reduce_nodes):
        return "its ReduceMean does not keep dims"
    rank_ = None if x.shape is None else len(x.shape)
    k = trailing_axes(axes[0], rank_)  # type: ignore[arg-type]
    if k is None:
        return f"axes {axes[0]} are not the trailing axes"
    shape = x.shape
    if shape is None or not all(isinstance(d, int) for d in list(shape)[-k:]):
        return "the normalized dims are not static"
    epsilon = constant(eps)
    if epsilon is None or epsilon.size != 1:
        return "epsilon is not a constant scalar"
    return k, float(epsilon.reshape(()))


def _inverse_problem(two: ir.Value | None, one: ir.Value | None) -> str | None:
    if two is not None and not is_scalar(constant(two), 2.0):
        return "the square is not Pow(., 2)"
    if one is not None and not is_scalar(constant(one), 1.0):
        return "the inverse is not 1 / sqrt(.)"
    return None


def _ones(x: ir.Value, k: int) -> np.ndarray:
    return np.ones(tuple(x.shape)[-k:], dtype=x.dtype.numpy())  # type: ignore[union-attr]


class _Core(pattern.RewriteRuleClassBase):
    """A chain → native-op rule; ``divide`` picks ``Div(d, std)`` over ``Mul(d, 1/std)`` as the root."""

    native: ClassVar[str]

    def __init__(self, divide: bool) -> None:
        super().__init__(name=f"{type(self).__name__}{'Div' if divide else 'Mul'}")
        self.divide = divide

    def _normalize(self, op, d, std, one):
        if self.divide:
            return op.Div(d, std)
        return op.Mul(d, pattern.OrValue([op.Reciprocal(std), op.Div(one, std)]))

    def _record(self, out: ir.Value, first: ir.Node) -> None:
        node = out.producer()
        record(node, Change("fused", first.name, node.name, self.native))


class FuseLayerNorm(_Core):
    """``(x - E[x]) / sqrt(E[(x - E[x])^2] + eps)`` → ``LayerNormalization(x, 1)``."""

    native: ClassVar[str] = "LayerNormalization"

    def pattern(self, op, x, two, eps, one):
        mean = op.ReduceMean(x, _allow_other_inputs=True, _outputs=["mean"])
        d = op.Sub(x, mean)
        square = pattern.OrValue([op.Pow(d, two), op.Mul(d, d)])
        var = op.ReduceMean(square, _allow_other_inputs=True, _outputs=["var"])
        return self._normalize(op, d, op.Sqrt(op.Add(var, eps)), one)

    def check(self, context, x, two, eps, one, mean, var, **_) -> MatchResult:
        result = MatchResult()
        reason = _inverse_problem(two, one)
        params = _trailing_norm(x, [mean.producer(), var.producer()], eps)
        if isinstance(params, str):
            reason = reason or params
        return result.fail(reason, mean.producer()) if reason else result

    def rewrite(self, op, x, eps, mean, var, **_):
        k, epsilon = _trailing_norm(x, [mean.producer(), var.producer()], eps)  # type: ignore[misc]
        first = mean.producer()
        scale = new_initializer(op, first.graph, _ones(x, k), f"{first.name}.scale")
        name = _unique_node_name(first.graph, f"{first.name}/{self.native}")
        out = op.LayerNormalization(x, scale, axis=-k, epsilon=epsilon, stash_type=_stash_type(x), _name=name)
        self._record(out, first)
        return out


class FuseRMSNorm(_Core):
    """``x / sqrt(E[x^2] + eps)`` → ``RMSNormalization(x, 1)``."""

    native: ClassVar[str] = "RMSNormalization"

    def pattern(self, op, x, two, eps, one):
        square = pattern.OrValue([op.Pow(x, two), op.Mul(x, x)])
        mean_square = op.ReduceMean(square, _allow_other_inputs=True, _outputs=["mean_square"])
        return self._normalize(op, x, op.Sqrt(op.Add(mean_square, eps)), one)

    def check(self, context, x, two, eps, one, mean_square, **_) -> MatchResult:
        result = MatchResult()
        reason = _inverse_problem(two, one)
        params = _trailing_norm(x, [mean_square.producer()], eps)
        if isinstance(params, str):
            reason = reason or params
        return result.fail(reason, mean_square.producer()) if reason else result

    def rewrite(self, op, x, eps, mean_square, **_):
        k, epsilon = _trailing_norm(x, [mean_square.producer()], eps)  # type: ignore[misc]
        first = mean_square.producer().inputs[0].producer()
        scale = new_initializer(op, first.graph, _ones(x, k), f"{first.name}.scale")
        name = _unique_node_name(first.graph, f"{first.name}/{self.native}")
        out = getattr(op, self.native)(x, scale, axis=-k, epsilon=epsilon, stash_type=_stash_type(x), _name=name)
        self._record(out, first)
        return out


class FuseGroupNorm(pattern.RewriteRuleClassBase):
    """``Reshape(InstanceNormalization(Reshape(x, [0, G, -1]), s, b), shape(x))`` → ``GroupNormalization``.

    The InstanceNormalization's per-group scale and bias become per-channel (repeated C/G times).
    """

    native: ClassVar[str] = "GroupNormalization"

    def pattern(self, op, x, grouping, s, b, shape_back):
        grouped = op.Reshape(x, grouping, _outputs=["grouped"])
        normed = op.InstanceNormalization(grouped, s, b)
        return op.Reshape(normed, shape_back)

    def check(self, context, x, grouping, s, b, shape_back, grouped, **_) -> MatchResult:
        result = MatchResult()
        reason = _group_problem(x, grouping, s, b, shape_back, grouped.producer())
        return result.fail(reason, grouped.producer()) if reason else result

    def rewrite(self, op, x, grouping, s, b, grouped, **_):
        first = grouped.producer()
        groups = int(constant(grouping)[1])  # type: ignore[index]
        per_group = x.shape[1] // groups  # type: ignore[index]
        dtype = x.dtype.numpy()  # type: ignore[union-attr]
        scale, bias = (np.repeat(constant(v), per_group).astype(dtype) for v in (s, b))  # type: ignore[arg-type]
        epsilon = attr_float(grouped.consumers()[0], "epsilon", 1e-5)
        name = _unique_node_name(first.graph, f"{first.name}/{self.native}")
        out = op.GroupNormalization(
            x,
            new_initializer(op, first.graph, scale, f"{first.name}.scale"),
            new_initializer(op, first.graph, bias, f"{first.name}.bias"),
            epsilon=epsilon,
            num_groups=groups,
            _name=name,
        )
        record(out.producer(), Change("fused", first.name, name, self.native))
        return out


def _group_problem(
    x: ir.Value, grouping: ir.Value, s: ir.Value, b: ir.Value, back: ir.Value, first: ir.Node
) -> str | None:
    """Why ``Reshape(IN(Reshape(x, grouping), s, b), back)`` is not a GroupNorm of x, or None."""
    if x.dtype not in FLOAT_TYPES:
        return "its input is not floating point"
    shape = x.shape
    if shape is None or len(shape) < 3 or not isinstance(shape[1], int):
        return "its input's rank or channel count is not known"
    target = constant(grouping)
    if target is None or target.ndim != 1 or target.size != 3 or int(target[2]) != -1:
        return "the first Reshape is not to (N, G, -1)"
    batch, groups = int(target[0]), int(target[1])
    if not (batch == 0 and attr_int(first, "allowzero", 0) == 0) and batch != shape[0]:
        return "the first Reshape changes the batch dim"
    if groups <= 0 or shape[1] % groups:
        return f"{shape[1]} channels do not split into {groups} groups"
    for value in (s, b):
        array = constant(value)
        if array is None or array.size != groups:
            return "the InstanceNormalization scale/bias are not constant per group"
    if not _is_shape_of(back, x):
        return "the second Reshape does not restore the input's shape"
    return None


def _is_shape_of(shape_value: ir.Value, x: ir.Value) -> bool:
    """True when ``shape_value`` is ``Shape(x)`` (whole) or a constant equal to x's static shape."""
    producer = shape_value.producer()
    if producer is not None and producer.op_type == "Shape" and producer.inputs[0] is x:
        start = attr_int(producer, "start", 0)
        end = producer.attributes.get("end")
        return start == 0 and (end is None or (x.shape is not None and end.as_int() >= len(x.shape)))
    array, static = constant(shape_value), static_shape(x)
    return array is not None and static is not None and tuple(int(v) for v in array.reshape(-1)) == static


# --------------------------------------------------------------------------- absorbing a following affine


class AbsorbAffine(pattern.RewriteRuleClassBase):
    """``Mul(norm(x, scale, bias), m)`` → ``norm(x, scale*m, bias*m)``; ``Add(norm, a)`` → bias + a."""

    def __init__(self, native: str, kind: str) -> None:
        super().__init__(name=f"Absorb{kind}Into{native}")
        self.native, self.kind = native, kind

    def pattern(self, op, x, factor):
        normed = getattr(op, self.native)(x, _allow_other_inputs=True, _outputs=["normed"])
        return getattr(op, self.kind)(normed, factor, _outputs=["affine"])

    def check(self, context, x, factor, normed, **_) -> MatchResult:
        result = MatchResult()
        node = normed.producer()
        if any(constant(v) is None for v in node.inputs[1:] if v is not None):
            return result.fail(f"{describe(node)} has a non-constant scale or bias", node)
        param = _as_param(node, x, constant(factor))
        return result.fail(param, node) if isinstance(param, str) else result

    def rewrite(self, op, x, factor, normed, affine, **_):
        node = normed.producer()
        param = _as_param(node, x, constant(factor))
        if isinstance(param, str):  # check() refused this case already
            return None
        scale = constant(node.inputs[1]).astype(np.float64)  # type: ignore[union-attr]
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        bias = constant(node.inputs[2]) if has_bias else np.zeros_like(param)
        bias = bias.astype(np.float64)  # type: ignore[union-attr]
        if self.kind == "Mul":
            scale, bias = scale * param, bias * param
        else:
            bias = bias + param
        dtype = node.inputs[1].dtype.numpy()  # type: ignore[union-attr]
        graph = node.graph
        inputs = [x, new_initializer(op, graph, scale.astype(dtype), f"{node.name}.scale")]
        if has_bias or self.kind == "Add":
            inputs.append(new_initializer(op, graph, bias.astype(dtype), f"{node.name}.bias"))
        out = op.op(self.native, *inputs, _name=node.name, **node.attributes)
        if not any(c.detail == self.native for c in records(node)):  # not from a fusion here: report the absorb
            what = "scale" if self.kind == "Mul" else "bias"
            mul = affine.producer()
            record(out.producer(), Change("fused", mul.name, node.name, f"{self.kind} into {self.native} {what}"))
        return out


def _as_param(node: ir.Node, x: ir.Value, factor: np.ndarray | None) -> np.ndarray | str:
    """``factor`` laid out like the norm's scale (float64), or why it is not per normalized element."""
    if factor is None:
        return "the factor is not constant"
    shape = x.shape
    if shape is None:
        return "the input's rank is not known"
    rank_ = len(shape)
    if factor.ndim > rank_:
        return "the factor would raise the output rank"
    aligned = factor.reshape((1,) * (rank_ - factor.ndim) + factor.shape).astype(np.float64)
    if node.op_type == "GroupNormalization":
        keep = [1]
        param_shape: tuple = (shape[1],)
    else:
        axis = attr_int(node, "axis", -1) % rank_
        keep = list(range(axis, rank_))
        param_shape = tuple(shape[axis:])
    if any(aligned.shape[i] != 1 for i in range(rank_) if i not in keep):
        return "the factor varies along an axis the norm does not normalize per element"
    if not all(isinstance(d, int) for d in param_shape):
        return "the normalized dims are not static"
    squeezed = aligned.reshape([aligned.shape[i] for i in keep])
    try:
        return np.broadcast_to(squeezed, param_shape).copy()
    except ValueError:
        return "the factor does not broadcast to the norm's scale"


# --------------------------------------------------------------------------- the families


@dataclass(frozen=True)
class NormFusion:
    """One native op: the rules that build it and the first opset that has it (in that form)."""

    native: str
    since: int
    core: tuple[pattern.RewriteRule, ...]
    absorb: tuple[pattern.RewriteRule, ...]
    caveat: str = ""

    def skip_detail(self, opset: int, alternative: str = "") -> str:
        """Why a chain was left at ``opset``, and what to do about it (``alternative``: another way)."""
        return f"opset {opset} has no {self.native}{self.caveat}{alternative}; export at opset >= {self.since}"


NORM_FUSIONS: tuple[NormFusion, ...] = (
    NormFusion(
        "LayerNormalization",
        17,
        (FuseLayerNorm.rule(divide=True), FuseLayerNorm.rule(divide=False)),
        (AbsorbAffine.rule("LayerNormalization", "Mul"), AbsorbAffine.rule("LayerNormalization", "Add")),
    ),
    NormFusion(
        "RMSNormalization",
        23,
        (FuseRMSNorm.rule(divide=True), FuseRMSNorm.rule(divide=False)),
        (AbsorbAffine.rule("RMSNormalization", "Mul"),),
    ),
    NormFusion(
        "GroupNormalization",
        21,
        (FuseGroupNorm.rule(),),
        (AbsorbAffine.rule("GroupNormalization", "Mul"), AbsorbAffine.rule("GroupNormalization", "Add")),
        "-21 (GroupNormalization-18 scales per group, not per channel)",
    ),
)
"""The norm fusions, each applied only where the model's opset is at least ``since``."""
