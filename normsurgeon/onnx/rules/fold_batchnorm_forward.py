"""Fold an inference-form BatchNormalization into the Conv, Gemm or MatMul layers after it.

With ``BN(x)_c = s_c * x_c + t_c`` (``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``)
feeding a layer ``y = W x + b`` that is linear in each *input* channel c:

    W'[o, c, ...] = W[o, c, ...] * s_c,   b'_o = b_o + sum_{c, k} W[o, c, k] * t_c.

This is exact only when nothing but BN(x) reaches the weights: a conv that zero-pads its input
would see the padded zeros where the original saw ``t``, so only convs with all pads 0
(``auto_pad`` NOTSET or VALID) qualify; a Pad in between qualifies when it only copies values
(mode edge, reflect or wrap, not on the batch or channel axis), which is how a conv with
``padding_mode="replicate"`` exports. A Gemm (``transA=0``) or a rank-2 MatMul with a constant
``(K, N)`` weight qualifies per input feature; a Gemm's ``alpha``/``beta`` become
``C' = beta·C + alpha·(t·B)`` with ``beta=1``; a MatMul gets an ``Add`` of ``t·W`` after it.

The BN output must feed only such layers (and not be a graph output), so that the BN goes away;
each of them is folded by its own match, and the BN is removed when the last one is.
"""

from __future__ import annotations

from typing import Callable, ClassVar

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
    attr_str,
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
from .fold_batchnorm import scale_weight

MatchResult = pattern.MatchResult


def shift_contribution(weight: np.ndarray, shift: np.ndarray, *, groups: int = 1) -> np.ndarray:
    """Per output row o of ``weight`` (rows = outputs): sum over input channels and taps of W·shift (float64)."""
    w = torch.from_numpy(weight.astype(np.float64))
    return maths.input_shift_contribution(w, torch.from_numpy(shift), groups=groups).numpy()


# --------------------------------------------------------------------------- which consumers qualify


def _conv_problem(node: ir.Node, channels: int, bn_rank: int | None) -> str | None:
    auto_pad = attr_str(node, "auto_pad", "NOTSET")
    pads = attr_ints(node, "pads") or []
    if auto_pad not in ("NOTSET", "VALID") or any(pads):
        shown = f"pads={pads}" if auto_pad == "NOTSET" else f"auto_pad={auto_pad}"
        return f"{describe(node)} zero-pads its input ({shown}), so the fold would change the border values"
    weight = constant(node.inputs[1])
    if weight.shape[1] * attr_int(node, "group", 1) != channels:  # type: ignore[union-attr]
        return f"{describe(node)} has another number of input channels than the BN"
    return None


def _gemm_problem(node: ir.Node, channels: int, bn_rank: int | None) -> str | None:
    if attr_int(node, "transA", 0):
        return f"{describe(node)} reads it transposed (transA=1)"
    weight = constant(node.inputs[1])
    inputs_axis = 1 if attr_int(node, "transB", 0) else 0
    if weight.ndim != 2 or weight.shape[inputs_axis] != channels:  # type: ignore[union-attr]
        return f"{describe(node)} has another number of input features than the BN"
    return None


def _matmul_problem(node: ir.Node, channels: int, bn_rank: int | None) -> str | None:
    if bn_rank != 2:
        what = "unknown" if bn_rank is None else bn_rank
        return f"{describe(node)} contracts the last axis, not the BN channel axis 1 (input rank {what})"
    weight = constant(node.inputs[1])
    if weight.ndim != 2 or weight.shape[0] != channels:  # type: ignore[union-attr]
        return f"{describe(node)} has another number of input features than the BN"
    return None


_CONSUMER_PROBLEMS: dict[str, Callable[[ir.Node, int, int | None], str | None]] = {
    "Conv": _conv_problem,
    "Gemm": _gemm_problem,
    "MatMul": _matmul_problem,
}


def consumer_problem(node: ir.Node, normalized: ir.Value, channels: int) -> str | None:
    """Why the BN output cannot be folded into ``node``, which reads it; None when it can."""
    check = _CONSUMER_PROBLEMS.get(node.op_type)
    if check is None:
        return f"its output feeds {describe(node)}, which is not a Conv, Gemm or MatMul"
    if node.inputs[0] is not normalized or normalized in node.inputs[1:]:
        return f"{describe(node)} reads its output as a weight"
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return f"{describe(node)} has no weight input"
    for value, role in ((node.inputs[1], "weight"), (node.inputs[2] if len(node.inputs) > 2 else None, "bias")):
        reason = param_problem(value, role)
        if reason is not None:
            return f"{describe(node)}: {reason}"
    return check(node, channels, rank(normalized))


def _consumers_failure(bn: ir.Node, value: ir.Value, consumed: ir.Value) -> tuple[str, ir.Node] | None:
    """Why ``bn`` cannot go into every consumer of ``value`` (its output, or that output padded)."""
    if not consumed.uses() and not consumed.is_graph_output():
        return "the consumer's output is unused", consumed.producer()
    if value.is_graph_output():
        return "its output is a graph output, so it has to stay", bn
    channels = constant(bn.inputs[1]).size  # type: ignore[union-attr]
    for node in value.consumers():
        reason = consumer_problem(node, value, channels)
        if reason is not None:
            return reason, node
    return None


_COPYING_PAD_MODES = ("edge", "reflect", "wrap")


def _pad_failure(normalized: ir.Value, padded: ir.Value) -> tuple[str, ir.Node] | None:
    """Why the Pad between the BN and a conv does not commute with the BN's per-channel affine."""
    pad, bn = padded.producer(), normalized.producer()
    mode = attr_str(pad, "mode", "constant")
    if mode not in _COPYING_PAD_MODES:
        return f"{describe(pad)} pads with constants (mode={mode}), so the fold would change the border values", pad
    others = other_users(normalized, {pad})
    if others:
        return f"its output also feeds {', '.join(others)}", bn
    pads = constant(pad.inputs[1]) if len(pad.inputs) > 1 else None
    axes = constant(pad.inputs[3]) if len(pad.inputs) > 3 and pad.inputs[3] is not None else None
    rank_ = rank(normalized)
    if pads is None or rank_ is None or (len(pad.inputs) > 3 and pad.inputs[3] is not None and axes is None):
        return f"{describe(pad)} has pads or axes that are not constant, or an input of unknown rank", pad
    axes_list = [int(a) % rank_ for a in (range(rank_) if axes is None else axes.reshape(-1))]
    begins, ends = pads.reshape(2, -1)
    if any((begins[i] or ends[i]) and axis in (0, 1) for i, axis in enumerate(axes_list)):
        return f"{describe(pad)} pads the batch or channel axis", pad
    return None


# --------------------------------------------------------------------------- rules


class _FoldIntoConsumer(pattern.RewriteRuleClassBase):
    """Shared check and rewrite; a variant computes the folded weight and bias of its op."""

    op_type: ClassVar[str]

    def __init__(self) -> None:
        super().__init__(name=type(self).__name__, remove_nodes=False)

    def pattern(self, op, x):
        normalized = op.BatchNormalization(x, _allow_other_inputs=True, _outputs=["normalized"])
        return getattr(op, self.op_type)(normalized, _allow_other_inputs=True, _outputs=["consumed"])

    def fold(self, node: ir.Node, weight: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray):
        """(W', b' in float64, attributes) of the folded consumer."""
        raise NotImplementedError

    def check(self, context, x, normalized: ir.Value, consumed: ir.Value, **_) -> MatchResult:
        failure = batchnorm_failure(normalized) or _consumers_failure(normalized.producer(), normalized, consumed)
        return MatchResult().fail(*failure) if failure else MatchResult()

    def rewrite(self, op, x, normalized: ir.Value, consumed: ir.Value, **_):
        return self.folded(op, x, consumed.producer(), normalized.producer(), "")

    def folded(self, op, x: ir.Value, node: ir.Node, bn: ir.Node, via: str) -> ir.Value:
        """``node`` reading ``x`` instead of BN(x), with the BN folded into its weight and bias."""
        weight_value = node.inputs[1]
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        weight = constant(weight_value)
        s, t = batchnorm_affine(bn)
        new_weight, new_bias, attributes = self.fold(node, weight, constant(bias_value), s, t)
        graph = bn.graph
        w = new_initializer(op, graph, new_weight, f"{weight_value.name}.folded")
        b = new_initializer(op, graph, new_bias.astype(weight.dtype), f"{weight_value.name}.folded_bias")
        if self.op_type == "MatMul":
            out = op.MatMul(x, w, _name=node.name)
            folded = out.producer()
            out = op.Add(out, b, _name=f"{node.name}/bn_shift")
        else:
            out = op.op(self.op_type, x, w, b, _name=node.name, **attributes)
            folded = out.producer()
        detail = f"into the following {self.op_type}{via}" + sharing_note(weight_value, node, "weight")
        detail += sharing_note(bias_value, node, "bias")
        record(folded, Change("folded", bn.name, node.name, detail))
        return out


def _previous_bias(bias: np.ndarray | None, size: int) -> np.ndarray:
    return np.zeros(size) if bias is None else bias.astype(np.float64)


class FoldBatchNormIntoFollowingConv(_FoldIntoConsumer):
    """``Conv(BatchNormalization(x))`` with all pads 0 → ``Conv(x)``; W is ``(C_out, C_in/g, k...)``."""

    op_type: ClassVar[str] = "Conv"

    def fold(self, node, weight, bias, s, t):
        groups = attr_int(node, "group", 1)
        new_bias = _previous_bias(bias, weight.shape[0]) + shift_contribution(weight, t, groups=groups)
        return scale_weight(weight, s, channel_dim=1, groups=groups), new_bias, dict(node.attributes)


class FoldBatchNormIntoFollowingGemm(_FoldIntoConsumer):
    """``Gemm(BatchNormalization(A), B, C)`` → ``Gemm(A, B', C')``, per input feature of B."""

    op_type: ClassVar[str] = "Gemm"

    def fold(self, node, weight, bias, s, t):
        trans_b = attr_int(node, "transB", 0)
        rows_out = weight if trans_b else weight.T  # (N, K): rows are outputs
        shift = attr_float(node, "alpha", 1.0) * shift_contribution(rows_out, t)
        new_bias = attr_float(node, "beta", 1.0) * _previous_bias(bias, 1) + shift
        new_weight = scale_weight(weight, s, channel_dim=1 if trans_b else 0)
        attributes = {k: v for k, v in node.attributes.items() if k != "beta"}
        return new_weight, new_bias, attributes


class FoldBatchNormIntoFollowingMatMul(_FoldIntoConsumer):
    """``MatMul(BatchNormalization(x), W)`` (rank 2) → ``MatMul(x, W') + t·W``; W is ``(K, N)``."""

    op_type: ClassVar[str] = "MatMul"

    def fold(self, node, weight, bias, s, t):
        return scale_weight(weight, s, channel_dim=0), shift_contribution(weight.T, t), {}


class FoldBatchNormThroughPadIntoConv(FoldBatchNormIntoFollowingConv):
    """``Conv(Pad(BatchNormalization(x)))``, Pad mode edge/reflect/wrap → ``Conv(Pad(x))``.

    Such a Pad only copies values of the same channel, so it commutes with the per-channel affine
    (a conv with ``padding_mode="replicate"`` or ``"reflect"`` exports this way).
    """

    def pattern(self, op, x):
        normalized = op.BatchNormalization(x, _allow_other_inputs=True, _outputs=["normalized"])
        padded = op.Pad(normalized, _allow_other_inputs=True, _outputs=["padded"])
        return op.Conv(padded, _allow_other_inputs=True, _outputs=["consumed"])

    def check(self, context, x, normalized: ir.Value, padded: ir.Value, consumed: ir.Value, **_) -> MatchResult:
        bn = normalized.producer()
        failure = (
            batchnorm_failure(normalized)
            or _pad_failure(normalized, padded)
            or _consumers_failure(bn, padded, consumed)
        )
        return MatchResult().fail(*failure) if failure else MatchResult()

    def rewrite(self, op, x, normalized: ir.Value, padded: ir.Value, consumed: ir.Value, **_):
        pad = padded.producer()
        repadded = op.Pad(x, *pad.inputs[1:], _name=pad.name, **pad.attributes)
        return self.folded(op, repadded, consumed.producer(), normalized.producer(), " (through an edge/reflect Pad)")


FOLD_INTO_CONSUMER: tuple[pattern.RewriteRule, ...] = (
    FoldBatchNormIntoFollowingConv.rule(),
    FoldBatchNormThroughPadIntoConv.rule(),
    FoldBatchNormIntoFollowingGemm.rule(),
    FoldBatchNormIntoFollowingMatMul.rule(),
)
"""Rules folding a BN into the layers that consume its output (tried after FOLD_INTO_PRODUCER)."""
