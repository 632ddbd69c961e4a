"""Fold an inference-form BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it.

Test-time BN is a per-channel affine map, ``BN(y)_c = s_c * y_c + t_c`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``. When ``y = W x + b`` comes from a
layer whose weights are constants, the BN disappears into it:

    W'[c, ...] = W[c, ...] * s_c,   b' = (b - mean) * s + beta = b * s + t.

What differs per producer is which weight axis is the output channel ``c``: Conv ``(C_out, C_in/g,
k...)`` row; ConvTranspose ``(C_in, C_out/g, k...)`` column *within its group*; Gemm ``B`` column
(``transB=0``) or row (``transB=1``), with ``beta * C`` as the bias; MatMul ``(K, N)`` column,
where the BN channel axis must be the MatMul's last axis (rank 2, or a Transpose between them
that moves the last axis to axis 1, as in ``Linear`` on ``(B, T, C)`` then ``BatchNorm1d``).

The producer's output must feed only this BN. A weight shared with another node is never changed
in place: the folded node gets a fresh initializer (every fold writes a new one; the old one is
removed when nothing reads it any more). The arithmetic is float64 (:mod:`normsurgeon.maths`),
cast back once.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir
import torch
from onnxscript.rewriter import pattern

from ... import maths
from ...report import Change
from ._common import (
    attr_float,
    attr_int,
    attr_ints,
    batchnorm_affine,
    batchnorm_failure,
    constant,
    describe,
    new_initializer,
    other_users,
    param_problem,
    rank,
    record,
    sharing_note,
)

MatchResult = pattern.MatchResult


def scale_weight(weight: np.ndarray, scale: np.ndarray, *, channel_dim: int, groups: int = 1) -> np.ndarray:
    """``weight`` with each element times its channel's scale (float64, cast back to its dtype)."""
    folded = torch.from_numpy(weight.astype(np.float64))
    maths.scale_channels_(folded, torch.from_numpy(scale), channel_dim=channel_dim, groups=groups)
    return folded.numpy().astype(weight.dtype)


class _FoldIntoProducer(pattern.RewriteRuleClassBase):
    """Shared check and rewrite; a variant says which weight axis holds the output channel.

    ``remove_nodes=False``: the matched nodes are left for dead-code removal, so that this
    class's own check (not the matcher's generic one) explains a producer with other users.
    """

    op_type: ClassVar[str]

    def __init__(self) -> None:
        super().__init__(name=type(self).__name__, remove_nodes=False)

    def pattern(self, op, x):
        produced = getattr(op, self.op_type)(x, _allow_other_inputs=True, _outputs=["produced"])
        return op.BatchNormalization(produced, _allow_other_inputs=True, _outputs=["normalized"])

    # -- what differs per producer

    def channels(self, node: ir.Node, weight: np.ndarray) -> int:
        """How many output channels the producer's weight has."""
        raise NotImplementedError

    def producer_problem(self, node: ir.Node) -> str | None:
        return None

    def fold(self, node: ir.Node, weight: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray):
        """(W', b', attributes) of the folded producer."""
        raise NotImplementedError

    # -- shared

    def check(self, context, x, produced: ir.Value, normalized: ir.Value, **_) -> MatchResult:
        failure = batchnorm_failure(normalized) or self.producer_failure(produced, normalized.producer())
        return MatchResult().fail(*failure) if failure else MatchResult()

    def producer_failure(self, produced: ir.Value, bn: ir.Node) -> tuple[str, ir.Node] | None:
        """Why the BN cannot go into the node producing ``produced`` (and where), or None."""
        node = produced.producer()
        others = other_users(produced, {bn})
        if others:
            return f"the output of {describe(node)} also feeds {', '.join(others)}", node
        if len(node.inputs) < 2 or node.inputs[1] is None:
            return f"{describe(node)} has no weight input", node
        for value, role in ((node.inputs[1], "weight"), (self.bias(node), "bias")):
            reason = param_problem(value, role)
            if reason is not None:
                return f"{describe(node)}: {reason}", node
        reason = self.producer_problem(node)
        if reason is not None:
            return f"{describe(node)}: {reason}", node
        channels = self.channels(node, constant(node.inputs[1]))  # type: ignore[arg-type]
        if channels != constant(bn.inputs[1]).size:  # type: ignore[union-attr]
            return f"{describe(node)} has {channels} output channels, the BN has another count", node
        return None

    @staticmethod
    def bias(node: ir.Node) -> ir.Value | None:
        return node.inputs[2] if len(node.inputs) > 2 else None

    def rewrite(self, op, x, produced: ir.Value, normalized: ir.Value, **_):
        node, bn = produced.producer(), normalized.producer()
        weight_value, bias_value = node.inputs[1], self.bias(node)
        s, t = batchnorm_affine(bn)
        new_weight, new_bias, attributes = self.fold(node, constant(weight_value), constant(bias_value), s, t)
        graph = bn.graph
        weight = new_initializer(op, graph, new_weight, f"{weight_value.name}.folded")
        bias = new_initializer(op, graph, new_bias, f"{weight_value.name}.folded_bias")
        out = op.op(self.op_type, x, weight, bias, _name=node.name, **attributes)
        detail = f"into the preceding {self.op_type}" + sharing_note(weight_value, node, "weight")
        detail += sharing_note(bias_value, node, "bias")
        record(out.producer(), Change("folded", bn.name, node.name, detail))
        return out


def _output_bias(bias: np.ndarray | None, s: np.ndarray, t: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """b' = b * s + t for a per-output-channel bias (absent means zero)."""
    b = np.zeros_like(s) if bias is None else bias.astype(np.float64).reshape(-1)
    return (b * s + t).astype(dtype)


class FoldBatchNormIntoConv(_FoldIntoProducer):
    """``BatchNormalization(Conv(x, W, b))`` → ``Conv(x, W', b')``; W is ``(C_out, C_in/g, k...)``."""

    op_type: ClassVar[str] = "Conv"

    def channels(self, node, weight):
        return weight.shape[0]

    def fold(self, node, weight, bias, s, t):
        return scale_weight(weight, s, channel_dim=0), _output_bias(bias, s, t, weight.dtype), dict(node.attributes)


class FoldBatchNormIntoConvTranspose(_FoldIntoProducer):
    """``BatchNormalization(ConvTranspose(x))``; W is ``(C_in, C_out/g, k...)``, channel = column in group."""

    op_type: ClassVar[str] = "ConvTranspose"

    def channels(self, node, weight):
        return weight.shape[1] * attr_int(node, "group", 1)

    def producer_problem(self, node):
        weight = constant(node.inputs[1])
        groups = attr_int(node, "group", 1)
        if weight is None or weight.ndim < 3 or weight.shape[0] % groups:
            return f"its weight's first dim is not divisible by group={groups}"
        return None

    def fold(self, node, weight, bias, s, t):
        groups = attr_int(node, "group", 1)
        folded = scale_weight(weight, s, channel_dim=1, groups=groups)
        return folded, _output_bias(bias, s, t, weight.dtype), dict(node.attributes)


class FoldBatchNormIntoGemm(_FoldIntoProducer):
    """``BatchNormalization(Gemm(A, B, C))``: ``B`` column (transB=0) or row (transB=1); C' = beta·C·s + t."""

    op_type: ClassVar[str] = "Gemm"

    def channels(self, node, weight):
        return weight.shape[0] if attr_int(node, "transB", 0) else weight.shape[1]

    def producer_problem(self, node):
        weight = constant(node.inputs[1])
        if weight is None or weight.ndim != 2:
            return "its B is not a 2-D constant"
        return None

    def fold(self, node, weight, bias, s, t):
        trans_b = attr_int(node, "transB", 0)
        folded = scale_weight(weight, s, channel_dim=0 if trans_b else 1)
        beta = attr_float(node, "beta", 1.0)
        c = np.zeros(1) if bias is None else bias.astype(np.float64) * beta
        attributes = {k: v for k, v in node.attributes.items() if k != "beta"}
        return folded, (c * s + t).astype(weight.dtype), attributes


class FoldBatchNormIntoMatMul(pattern.RewriteRuleClassBase):
    """``BN([Transpose](MatMul(x, W) [+ b]))`` → ``[Transpose](MatMul(x, W') + b')``, W ``(K, N)``.

    The BN normalizes axis 1 of its input; that must be the MatMul's last axis: its input has
    rank 2, or the Transpose between them has ``perm[1] == rank - 1``.
    """

    def __init__(self) -> None:
        super().__init__(name=type(self).__name__, remove_nodes=False)

    def pattern(self, op, x, w, b):
        produced = op.MatMul(x, w, _outputs=["produced"])
        biased = pattern.OrValue([op.Add(produced, b), op.Add(b, produced), produced], tag_var="biased",
                                 tag_values=[True, True, False])
        moved = pattern.OrValue([op.Transpose(biased), biased], tag_var="moved", tag_values=[True, False])
        return op.BatchNormalization(moved, _allow_other_inputs=True, _outputs=["normalized"])

    def check(self, context, x, w, b, produced, normalized, biased, moved, **_) -> MatchResult:
        bn = normalized.producer()
        failure = batchnorm_failure(normalized) or _matmul_failure(_chain(produced, bn, biased, moved), w, b)
        return MatchResult().fail(*failure) if failure else MatchResult()

    def rewrite(self, op, x, w, b, produced, normalized, biased, moved, **_):
        bn, matmul = normalized.producer(), produced.producer()
        chain = _chain(produced, bn, biased, moved)
        s, t = batchnorm_affine(bn)
        weight = constant(w)
        graph = bn.graph
        new_w = new_initializer(op, graph, scale_weight(weight, s, channel_dim=1), f"{w.name}.folded")
        bias = np.zeros(1) if b is None else constant(b).astype(np.float64)
        new_b = new_initializer(op, graph, (bias * s + t).astype(weight.dtype), f"{w.name}.folded_bias")
        product = op.MatMul(x, new_w, _name=matmul.name)
        add_name = chain[1].name if biased else f"{bn.name}/bias"
        out = op.Add(product, new_b, _name=add_name)
        if moved:
            out = op.Transpose(out, perm=attr_ints(chain[-2], "perm"), _name=chain[-2].name)
        detail = "into the preceding MatMul" + (" (through a Transpose)" if moved else "")
        detail += sharing_note(w, matmul, "weight") + (sharing_note(b, chain[1], "bias") if biased else "")
        record(product.producer(), Change("folded", bn.name, matmul.name, detail))
        return out


def _chain(produced: ir.Value, bn: ir.Node, biased: bool, moved: bool) -> list[ir.Node]:
    """The matched nodes from the MatMul to the BN, in data order."""
    matmul = produced.producer()
    transpose = bn.inputs[0].producer() if moved else None
    add = (transpose or bn).inputs[0].producer() if biased else None
    return [n for n in (matmul, add, transpose, bn) if n is not None]


def _matmul_failure(chain: list[ir.Node], w: ir.Value, b: ir.Value | None) -> tuple[str, ir.Node] | None:
    """Why the BN at the end of ``chain`` cannot go into the MatMul at its head, or None."""
    matmul, bn = chain[0], chain[-1]
    for writer, reader in zip(chain, chain[1:]):
        others = other_users(writer.outputs[0], {reader})
        if others:
            return f"the output of {describe(writer)} also feeds {', '.join(others)}", writer
    for value, role in ((w, "weight"), (b, "bias")):
        reason = param_problem(value, role)
        if reason is not None:
            return f"{describe(matmul)}: {reason}", matmul
    weight = constant(w)
    if weight.ndim != 2:  # type: ignore[union-attr]
        return f"{describe(matmul)}: its weight is not 2-D", matmul
    if weight.shape[1] != constant(bn.inputs[1]).size:  # type: ignore[union-attr]
        return f"{describe(matmul)} has {weight.shape[1]} output features, the BN has another count", matmul
    if b is not None and constant(b).shape[-1:] not in ((1,), (weight.shape[1],), ()):  # type: ignore[union-attr]
        return f"{describe(matmul)}: its bias does not broadcast per output feature", matmul
    return _axis_failure(chain)


def _axis_failure(chain: list[ir.Node]) -> tuple[str, ir.Node] | None:
    """Why the BN's channel axis (1) is not the MatMul's feature axis (its last), or None."""
    bn = chain[-1]
    transpose = chain[-2] if chain[-2].op_type == "Transpose" else None
    if transpose is not None:
        perm = attr_ints(transpose, "perm")
        if perm is None or len(perm) < 2 or perm[1] != len(perm) - 1:
            return f"{describe(transpose)} does not move the MatMul's feature axis to axis 1", transpose
        return None
    bn_rank = rank(bn.inputs[0])
    if bn_rank != 2:
        what = "unknown" if bn_rank is None else str(bn_rank)
        return f"its input has rank {what}: the BN channel axis 1 is not the MatMul's feature axis", bn
    return None


FOLD_INTO_PRODUCER: tuple[pattern.RewriteRule, ...] = (
    FoldBatchNormIntoConv.rule(),
    FoldBatchNormIntoConvTranspose.rule(),
    FoldBatchNormIntoGemm.rule(),
    FoldBatchNormIntoMatMul.rule(),
)
"""Rules folding a BN into the layer that produces its input."""
