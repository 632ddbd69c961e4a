"""onnxruntime's own fused norm ops, for ``optimize --target ort``: at any opset, not only where ONNX has them.

Over the last axis, with ``E`` the mean (schemas as onnxruntime 1.32 registers them):

    SimplifiedLayerNormalization(x, scale)    = x / sqrt(E[x^2] + eps) * scale          (RMSNorm)
    LayerNormalization(x, scale[, bias])      below opset 17: onnxruntime's own schema
    SkipLayerNormalization(input, skip, gamma[, beta])      -> LayerNorm(input + skip), ..., input + skip
    SkipSimplifiedLayerNormalization(input, skip, gamma)    -> RMSNorm(input + skip),   ..., input + skip

The first two live in the default domain (onnxruntime registers them there, since version 1; its own
transformer optimizer emits them so); the Skip ops in ``com.microsoft``, with outputs (output, mean,
inv_std_var, input_skip_bias_sum). The RMSNorm chain is matched by :class:`.fuse_norms.FuseRMSNorm`;
only the op it emits differs. A residual ``Add`` feeding a norm becomes the Skip op; the Add's other
readers (the next residual) are moved onto its 4th output by :func:`share_skip_sums` afterwards,
because a rewrite rule may only replace the norm's output.

What onnxruntime 1.32's CPU kernels accept (measured), and so what :class:`FuseSkipNorm` checks: float,
float16 or bfloat16 (not double); an input of rank 2 or 3; a skip of the input's shape, or (1, S, H) or
(S, H) for an input (B, S, H); one normalized axis, the last, with a 1-D gamma (and beta) of H.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import onnx_ir as ir
from onnxscript.rewriter import pattern

from ...report import Change
from ._common import attr_float, attr_int, constant, describe, record, records
from .fuse_norms import NORM_FUSIONS, AbsorbAffine, FuseRMSNorm, NormFusion

MatchResult = pattern.MatchResult

ORT_DOMAIN = "com.microsoft"
NATIVE_RMS_SINCE = 23  # below it, RMSNorm becomes onnxruntime's SimplifiedLayerNormalization
SKIP_OPS: dict[str, str] = {
    "LayerNormalization": "SkipLayerNormalization",
    "SimplifiedLayerNormalization": "SkipSimplifiedLayerNormalization",
    "RMSNormalization": "SkipSimplifiedLayerNormalization",
}
"""The norm a residual Add may feed → the onnxruntime op the pair becomes."""

_SKIP_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_SUM_LINK = "normsurgeon.skip_sum_of"  # metadata: the Add output a Skip node's 4th output equals


class FuseSimplifiedLayerNorm(FuseRMSNorm):
    """``x / sqrt(E[x^2] + eps)`` → onnxruntime's ``SimplifiedLayerNormalization(x, 1)``."""

    native: ClassVar[str] = "SimplifiedLayerNormalization"


_SIMPLIFIED = NormFusion(
    "SimplifiedLayerNormalization",
    1,
    (FuseSimplifiedLayerNorm.rule(divide=True), FuseSimplifiedLayerNorm.rule(divide=False)),
    (AbsorbAffine.rule("SimplifiedLayerNormalization", "Mul"),),
)


def ort_norm_fusions(opset: int) -> tuple[NormFusion, ...]:
    """:data:`NORM_FUSIONS`, family for family, as onnxruntime takes them at ``opset``: LayerNormalization
    at any opset, RMSNorm as SimplifiedLayerNormalization below 23 (the native op from 23), GroupNorm as is."""
    families = []
    for family in NORM_FUSIONS:
        if family.native == "LayerNormalization":
            family = dataclasses.replace(family, since=1)
        elif family.native == "RMSNormalization" and opset < NATIVE_RMS_SINCE:
            family = _SIMPLIFIED
        families.append(family)
    return tuple(families)


# --------------------------------------------------------------------------- residual Add + norm


class FuseSkipNorm(pattern.RewriteRuleClassBase):
    """``norm(Add(a, b))`` → ``Skip…Normalization(input, skip, gamma[, beta])``; with ``bias``,
    ``norm(Add(Add(a, bias), b))`` → ``Skip…Normalization(input, skip, gamma[, beta], bias)`` (a linear
    layer's bias, added by the kernel).

    The Add is not removed here (its sum may have other readers): the new node names it in its
    metadata, and :func:`share_skip_sums` moves those readers onto the node's 4th output.
    """

    def __init__(self, norm: str, bias: bool) -> None:
        super().__init__(name=f"FuseSkip{norm}{'Bias' if bias else ''}", remove_nodes=False)
        self.norm, self.bias = norm, bias

    def pattern(self, op, a, b, bias):
        if self.bias:
            a = op.Add(a, bias, _outputs=["biased"])
        summed = op.Add(a, b, _outputs=["summed"])
        return getattr(op, self.norm)(summed, _allow_other_inputs=True, _outputs=["normed"])

    def check(self, context, a, b, bias, normed, **bound) -> MatchResult:
        result = MatchResult()
        inputs = self._inputs(a, b, bias, bound.get("biased"), normed.producer())
        return result.fail(inputs, normed.producer()) if isinstance(inputs, str) else result

    def rewrite(self, op, a, b, bias, summed, normed, **bound):
        node, add = normed.producer(), summed.producer()
        inputs = self._inputs(a, b, bias, bound.get("biased"), node)
        if isinstance(inputs, str):  # check() refused this case already
            return None
        fused = SKIP_OPS[self.norm]
        outputs = getattr(op, fused)(*inputs, epsilon=attr_float(node, "epsilon", 1e-5), _domain=ORT_DOMAIN,
                                     _outputs=4, _name=f"{add.name}/{fused}")
        for output, like in ((outputs[0], normed), (outputs[3], summed)):  # typed, for passes run after this one
            output.dtype, output.shape = like.dtype, like.shape
        new = outputs[0].producer()
        new.metadata_props[_SUM_LINK] = summed.name
        for change in records(node):  # the norm's own fusion now ends in this node
            record(new, Change(change.action, change.module, new.name, change.detail))
        what = f"Add + {self.norm}{' (and the bias Add before it)' if self.bias else ''} → {fused}"
        record(new, Change("fused", add.name, new.name, what))
        return outputs[0]

    def _inputs(self, a: ir.Value, b: ir.Value, bias: ir.Value | None, biased: ir.Value | None,
                node: ir.Node) -> list[ir.Value | None] | str:
        """The Skip op's inputs (input, skip, the norm's params[, bias]), or why there are none."""
        reason = _norm_problem(node) or (_bias_problem(bias, biased, node) if self.bias else None)
        operands = reason or _operands(biased if self.bias else a, b, node)
        if isinstance(operands, str):
            return operands
        inputs = [a if value is biased else value for value in operands] + list(node.inputs[1:])
        if self.bias:
            inputs += [None] * (len(_PARAMS[self.norm]) - len(node.inputs[1:])) + [bias]
        return inputs


_PARAMS = {"LayerNormalization": ("gamma", "beta"), "SimplifiedLayerNormalization": ("gamma",),
           "RMSNormalization": ("gamma",)}  # the Skip op's inputs between skip and bias


def _bias_problem(bias: ir.Value, biased: ir.Value, node: ir.Node) -> str | None:
    """Why ``biased = Add(a, bias)`` cannot become the Skip op's bias input, or None."""
    array = constant(bias)
    if array is None or array.ndim != 1 or not _same(array.shape[0], node.inputs[0].shape[-1]):
        return "the Add before it adds no constant 1-D bias of the hidden size"
    if len(biased.uses()) != 1 or biased.is_graph_output():
        return "the biased value has other readers"
    return None


def _norm_problem(node: ir.Node) -> str | None:
    """Why this norm node cannot be the norm of a Skip op, or None."""
    x = node.inputs[0]
    if x.dtype not in _SKIP_DTYPES:
        return f"its input is {x.dtype.name if x.dtype else 'of unknown type'}; onnxruntime's Skip ops take " \
               "float, float16 or bfloat16"
    if x.shape is None or len(x.shape) not in (2, 3):
        shown = "not known" if x.shape is None else str(len(x.shape))
        return f"its input's rank is {shown}; onnxruntime's Skip ops take rank 2 or 3"
    if attr_int(node, "axis", -1) % len(x.shape) != len(x.shape) - 1:
        return "it normalizes more than the last axis; onnxruntime's Skip ops normalize only the last"
    if attr_int(node, "stash_type", 1) != 1:
        return "its stash_type is not float, which onnxruntime's Skip ops compute in"
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        return "its mean or inverse standard deviation output is used"
    hidden = x.shape[-1]
    for param in node.inputs[1:]:
        if param is not None and (param.shape is None or len(param.shape) != 1 or not _same(param.shape[0], hidden)):
            return f"its scale or bias '{param.name}' is not 1-D of the hidden size"
    return None


def _operands(a: ir.Value, b: ir.Value, node: ir.Node) -> tuple[ir.Value, ir.Value] | str:
    """(input, skip) for the Skip op: the operand of the sum's shape first; or why neither order fits."""
    full = node.inputs[0].shape
    if a.shape is None or b.shape is None:
        return "the shapes of the Add's operands are not known"
    for first, second in ((a, b), (b, a)):
        if _same_shape(first.shape, full) and _skip_fits(second.shape, full):
            return first, second
    return (f"the Add's operands {_dims(a.shape)} and {_dims(b.shape)} broadcast in a way onnxruntime's Skip ops "
            "cannot (the skip must have the input's shape, or be (1, S, H) or (S, H))")


def _dims(shape: ir.Shape) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else str(d.value or "?") for d in shape) + ")"


def _skip_fits(skip: ir.Shape, full: ir.Shape) -> bool:
    if _same_shape(skip, full):
        return True
    if len(full) != 3:
        return False
    return (len(skip) == 3 and skip[0] == 1 and _same_shape(skip[1:], full[1:])) or (
        len(skip) == 2 and _same_shape(skip, full[1:]))


def _same_shape(first, second) -> bool:
    return len(first) == len(second) and all(_same(d, e) for d, e in zip(first, second))


def _same(first: int | ir.SymbolicDim, second: int | ir.SymbolicDim) -> bool:
    """Equal dims: equal integers, or the same named symbolic dim (an unnamed one equals nothing)."""
    if isinstance(first, int) or isinstance(second, int):
        return first == second
    return first.value is not None and first.value == second.value


PLAIN_SKIP_FUSIONS: tuple[pattern.RewriteRule, ...] = tuple(FuseSkipNorm.rule(norm, False) for norm in SKIP_OPS)
SKIP_FUSIONS: tuple[pattern.RewriteRule, ...] = (
    *(FuseSkipNorm.rule(norm, True) for norm in SKIP_OPS), *PLAIN_SKIP_FUSIONS)
"""Residual Add (+ bias Add) + norm → onnxruntime's Skip ops, the longer match first; apply with
``commute=True``, then :func:`share_skip_sums`."""


def share_skip_sums(graph: ir.Graph) -> None:
    """Let each fused residual Add's other readers read the Skip op's 4th output instead. The graph
    must be re-sorted afterwards: a reader may sit between the Add and the norm."""
    produced = {value.name: value for node in graph for value in node.outputs if value.name}
    for node in graph:
        name = node.metadata_props.pop(_SUM_LINK, None)
        summed = produced.get(name) if name is not None else None
        if summed is not None:
            _move_readers(summed, node.outputs[3])


def _move_readers(old: ir.Value, new: ir.Value) -> None:
    if old.is_graph_output():  # the graph output keeps its name
        name, old.name = old.name, f"{old.name}.replaced"
        new.name = name
    old.replace_all_uses_with(new, replace_graph_outputs=True)


def omit_unread_outputs(graph: ir.Graph) -> None:
    """Leave out the Skip ops' outputs nobody reads (mean, inv_std_var, often the sum), as onnxruntime's
    own optimizer does, so the kernel does not write them. Last, after any pass that names values."""
    for node in graph:
        if node.domain != ORT_DOMAIN or node.op_type not in SKIP_OPS.values():
            continue
        read = [bool(out.uses() or out.is_graph_output()) for out in node.outputs]
        node.resize_outputs(max(i for i, used in enumerate(read) if used or i == 0) + 1)
        for out, used in zip(node.outputs[1:], read[1:]):
            if not used:
                out.name = ""  # an omitted optional output


def describe_skip_pair(node: ir.Node) -> str | None:
    """For a norm node fed by an Add: a sentence naming the pair, else None (for the report's skips)."""
    x = node.inputs[0] if node.inputs else None
    producer = x.producer() if x is not None else None
    if node.op_type not in SKIP_OPS or producer is None or producer.op_type != "Add":
        return None
    return f"{describe(producer)} + {describe(node)} not fused into {SKIP_OPS[node.op_type]}"


SHIELDED_NORMS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization"})
"""The norms onnxruntime's own session-time SkipLayerNormFusion pairs with an Add feeding them."""


def shield_residual_adds(graph: ir.Graph) -> None:
    """Write each float32 ``Add`` whose only reader is a LayerNorm (or SimplifiedLayerNormalization) as the
    equivalent two-input ``Sum``, for ``--target ort-cpu``.

    onnxruntime fuses such a pair into SkipLayerNormalization itself when it builds a session (post-norm models
    like BERT, where the residual sum has no other reader), and its CPU Skip kernels take 2-6x the time of
    Add + norm (benchmarks/skip_kernels.py): a tiny BERT ran 1.10x optimum's file, 0.99x with the Sums, which its
    fusion does not match. ``Sum`` broadcasts as ``Add`` does; the values are the same.
    """
    for node in graph:
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        out = node.outputs[0]
        uses = list(out.uses())
        if out.dtype != ir.DataType.FLOAT or out.is_graph_output() or len(uses) != 1:
            continue
        reader, index = uses[0].node, uses[0].idx
        if reader.op_type in SHIELDED_NORMS and index == 0:
            node.op_type = "Sum"
            record(node, Change("replaced", node.name, node.name,
                                f"Add → Sum before {reader.op_type} (onnxruntime's CPU Skip fusion left out)"))
