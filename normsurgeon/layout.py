"""Ops that move a tensor's axes without changing its values, and where a channel axis goes.

Between a layer and its norm there may be a ``transpose``/``permute`` (a Linear on (B, T, C)
followed by ``BatchNorm1d`` on (B, C, T)), a ``.contiguous()``, an ``nn.Identity`` or an eval-mode
``nn.Dropout``. A fold may look through them as long as the channel axis is tracked correctly.
"""

from __future__ import annotations

from torch import nn

from .trace import Node

_SAME_AXES_FUNCTIONS = frozenset({"contiguous", "clone"})
_SAME_AXES_MODULES: tuple[type, ...] = (nn.Identity, nn.modules.dropout._DropoutNd)


def is_layout_op(node: Node) -> bool:
    """True for a node that only rearranges (or passes through) its first input."""
    if node.kind == "module":
        module = node.module
        return isinstance(module, _SAME_AXES_MODULES) and not (
            isinstance(module, nn.modules.dropout._DropoutNd) and module.training
        )
    if node.kind != "function" or len(node.inputs) != 1 or len(node.outputs) != 1:
        return False
    return node.name in _SAME_AXES_FUNCTIONS or node.name in ("transpose", "swapaxes", "swapdims", "permute")


def _permutation(node: Node, rank: int) -> list[int]:
    """``perm`` such that output axis i is input axis perm[i]."""
    if node.kind == "module" or node.name in _SAME_AXES_FUNCTIONS:
        return list(range(rank))
    args = node.args[1:]
    if node.name == "permute":
        dims = node.kwargs.get("dims", args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args)
        return [d % rank for d in dims]
    d0 = node.kwargs.get("dim0", args[0] if args else None)
    d1 = node.kwargs.get("dim1", args[1] if len(args) > 1 else None)
    perm = list(range(rank))
    perm[d0 % rank], perm[d1 % rank] = perm[d1 % rank], perm[d0 % rank]
    return perm


def axis_before(node: Node, output_axis: int) -> int:
    """The input axis that ends up at ``output_axis`` of the layout op's output."""
    rank = len(node.outputs[0].shape)
    return _permutation(node, rank)[output_axis % rank]


def axis_after(node: Node, input_axis: int) -> int:
    """Where the layout op puts axis ``input_axis`` of its input."""
    rank = len(node.outputs[0].shape)
    return _permutation(node, rank).index(input_axis % rank)
