"""Ops that move a tensor's axes without changing its values, and where a channel axis goes.

Between a layer and its norm there may be a ``transpose``/``permute`` (a Linear on (B, T, C)
followed by ``BatchNorm1d`` on (B, C, T)), a ``.contiguous()``, an ``nn.Identity`` or an eval-mode
``nn.Dropout``. There may also be a reshape (``flatten``, ``reshape``, ``view``, ``reshape_as``,
``unflatten``, ``squeeze``/``unsqueeze``, ``nn.Flatten``): timm's LeViT runs ``BatchNorm1d`` on
``linear(x).flatten(0, 1)`` and puts the result back with ``reshape_as(x)``. A reshape keeps a
channel axis when it only merges or splits the axes around it; where that axis goes is read off
the traced shapes (a reshape is row-major, so the shapes alone decide it). A fold may look
through all of these as long as the channel axis is tracked correctly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .trace import Node, Value

_SAME_AXES_FUNCTIONS = frozenset({"contiguous", "clone"})
_SAME_AXES_MODULES: tuple[type, ...] = (nn.Identity, nn.modules.dropout._DropoutNd)
_PERMUTES = frozenset({"transpose", "swapaxes", "swapdims", "permute"})
_RESHAPE_FUNCTIONS = frozenset({"flatten", "unflatten", "reshape", "view", "reshape_as", "view_as",
                                "squeeze", "unsqueeze"})
_RESHAPE_MODULES: tuple[type, ...] = (nn.Flatten, nn.Unflatten)
_SHAPE_TEMPLATES = frozenset({"reshape_as", "view_as", "expand_as"})  # x.op(other) reads only other's shape


def keeps_axes(node: Node) -> bool:
    """True for a node that hands its input on unchanged, axes included (Identity, eval Dropout, contiguous)."""
    if node.kind == "module":
        module = node.module
        return isinstance(module, _SAME_AXES_MODULES) and not (
            isinstance(module, nn.modules.dropout._DropoutNd) and module.training
        )
    return _one_in_one_out(node) and node.name in _SAME_AXES_FUNCTIONS


def is_reshape(node: Node) -> bool:
    """True for a row-major reshape of the node's first input (``flatten``, ``view``, ``reshape_as``, ...)."""
    if node.kind == "module":
        return isinstance(node.module, _RESHAPE_MODULES) and len(node.inputs) == 1 and len(node.outputs) == 1
    if node.kind != "function" or node.name not in _RESHAPE_FUNCTIONS or len(node.outputs) != 1 or not node.inputs:
        return False
    templates = node.inputs[1:]
    if templates and not (node.name in _SHAPE_TEMPLATES and all(reads_only_shape(node, v) for v in templates)):
        return False
    if any(isinstance(a, torch.dtype) for a in (*node.args, *node.kwargs.values())):  # view(dtype) reinterprets bits
        return False
    return math.prod(node.inputs[0].shape) == math.prod(node.outputs[0].shape)


def is_layout_op(node: Node) -> bool:
    """True for a node that only rearranges (or passes through) its first input."""
    if keeps_axes(node) or is_reshape(node):
        return True
    return _one_in_one_out(node) and node.name in _PERMUTES


def reads_only_shape(node: Node, value: Value) -> bool:
    """True when ``node`` reads ``value`` for its shape only (``x.reshape_as(value)``), never its numbers."""
    return (node.kind == "function" and node.name in _SHAPE_TEMPLATES and len(node.inputs) == 2
            and node.inputs[1] is value and node.inputs[0] is not value)


def _one_in_one_out(node: Node) -> bool:
    return node.kind == "function" and len(node.inputs) == 1 and len(node.outputs) == 1


def _permutation(node: Node, rank: int) -> list[int]:
    """``perm`` such that output axis i is input axis perm[i]."""
    if keeps_axes(node):
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


def reshaped_axis(source: tuple[int, ...], target: tuple[int, ...], axis: int) -> int | None:
    """Where axis ``axis`` of shape ``source`` lies after a row-major reshape to ``target``; None when
    the reshape merges it with, or splits it into, other axes (or it has size 1, so it cannot be told apart).

    The axis survives when ``target`` has an axis of the same size with the same number of elements
    before it: an element's index along it is then the same on both sides.
    """
    if not source:
        return None
    axis %= len(source)
    size, before = source[axis], math.prod(source[:axis])
    if size < 2 or 0 in source:
        return None
    elements = 1
    for index, extent in enumerate(target):
        if elements == before and extent == size:
            return index
        elements *= extent
    return None


def axis_before(node: Node, output_axis: int) -> int | None:
    """The input axis that ends up at ``output_axis`` of the layout op's output (None: a reshape mixes it)."""
    output = node.outputs[0].shape
    if is_reshape(node):
        return reshaped_axis(output, node.inputs[0].shape, output_axis)
    return _permutation(node, len(output))[output_axis % len(output)]


def axis_after(node: Node, input_axis: int) -> int | None:
    """Where the layout op puts axis ``input_axis`` of its input (None: a reshape mixes it with others)."""
    output = node.outputs[0].shape
    if is_reshape(node):
        return reshaped_axis(node.inputs[0].shape, output, input_axis)
    return _permutation(node, len(output)).index(input_axis % len(output))
