"""Ops that move a tensor's axes without changing its values, and where a channel axis goes.

Between a layer and its norm there may be a ``transpose``/``permute`` (a Linear on (B, T, C)
followed by ``BatchNorm1d`` on (B, C, T)), a ``.contiguous()``, an ``nn.Identity`` or an eval-mode
``nn.Dropout``. There may also be a reshape (``flatten``, ``reshape``, ``view``, ``reshape_as``,
``unflatten``, ``squeeze``/``unsqueeze``, ``nn.Flatten``): timm's LeViT runs ``BatchNorm1d`` on
``linear(x).flatten(0, 1)`` and puts the result back with ``reshape_as(x)``. A reshape keeps a
channel axis when it only merges or splits the axes around it; where that axis goes is read off
the traced shapes (a reshape is row-major, so the shapes alone decide it). And there may be a
*selection* along other axes: transformers' causal LMs run ``lm_head`` on
``hidden_states[:, -k:, :]`` (``narrow``, ``select`` and ``index_select`` likewise pick entries of one
axis). A per-channel scale commutes with picking entries along any other axis, so a fold may look
through all of these as long as the channel axis is tracked correctly and is not itself selected.
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
_SELECTIONS = frozenset({"__getitem__", "narrow", "select", "index_select"})
_BASIC_INDEX = (int, slice, type(...))


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


def is_selection(node: Node) -> bool:
    """True for an op that picks entries of its first input along some axes and keeps the other axes whole:
    basic indexing (``x[:, -1:]``, ``x[..., 0]``), ``narrow``, ``select``, ``index_select``."""
    return _selection(node) is not None


def needs_axis(node: Node) -> bool:
    """True for a layout op a walk may cross only with a tracked axis (a reshape may merge an untracked
    one with others, a selection may pick along it)."""
    return is_reshape(node) or is_selection(node)


def is_layout_op(node: Node) -> bool:
    """True for a node that only rearranges (or passes through) its first input, or picks entries of it
    along some axes (:func:`is_selection`)."""
    if keeps_axes(node) or is_reshape(node) or is_selection(node):
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
    """The input axis that ends up at ``output_axis`` of the layout op's output (None: a reshape mixes it,
    a selection picks along it or made it)."""
    output = node.outputs[0].shape
    if is_reshape(node):
        return reshaped_axis(output, node.inputs[0].shape, output_axis)
    selection = _selection(node)
    if selection is not None:
        kept, picked = selection
        source = kept[output_axis % len(output)] if output else None
        return None if source is None or source in picked else source
    return _permutation(node, len(output))[output_axis % len(output)]


def axis_after(node: Node, input_axis: int) -> int | None:
    """Where the layout op puts axis ``input_axis`` of its input (None: a reshape mixes it with others,
    a selection picks along it)."""
    output = node.outputs[0].shape
    if is_reshape(node):
        return reshaped_axis(node.inputs[0].shape, output, input_axis)
    selection = _selection(node)
    if selection is not None:
        kept, picked = selection
        rank = len(node.inputs[0].shape)
        axis = input_axis % rank if rank else input_axis
        return None if axis in picked or axis not in kept else kept.index(axis)
    return _permutation(node, len(output)).index(input_axis % len(output))


Selection = tuple[list[int], frozenset[int]]  # the input axis of each output axis; the axes picked along


def _selection(node: Node) -> Selection | None:
    """How a selection maps axes (see :data:`Selection`), checked against the traced shapes; None for any other op."""
    if node.kind != "function" or node.name not in _SELECTIONS or len(node.outputs) != 1 or not node.inputs:
        return None
    if len(node.inputs) > (2 if node.name == "index_select" else 1):  # x[tensor]: advanced indexing, not read
        return None  # (an index tensor the trace did not see produced is not among the inputs)
    shape, args = node.inputs[0].shape, node.args[1:]
    try:
        if node.name == "__getitem__":
            found = _indexed(args[0] if args else None, shape)
        else:
            found = _picked_along(node.name, node.kwargs.get("dim", args[0] if args else None), shape)
    except (TypeError, ValueError, IndexError):
        return None
    if found is None or not _fits_output(found, shape, node.outputs[0].shape):
        return None
    return found


def _picked_along(name: str, dim: object, shape: tuple[int, ...]) -> Selection | None:
    """``narrow``/``index_select`` keep every axis, ``select`` drops ``dim``; all pick along ``dim``."""
    if not isinstance(dim, int) or isinstance(dim, bool) or not shape:
        return None
    dim %= len(shape)
    kept = [a for a in range(len(shape)) if not (name == "select" and a == dim)]
    return kept, frozenset({dim})


def _indexed(index: object, shape: tuple[int, ...]) -> Selection | None:
    """Basic indexing (ints, slices, one Ellipsis); an axis a slice takes whole is not picked along.

    A ``None`` entry is refused: the trace records a tensor index as None too, so a new axis
    cannot be told from advanced indexing by a constant tensor.
    """
    entries = index if isinstance(index, tuple) else (index,)
    if any(isinstance(e, bool) or not isinstance(e, _BASIC_INDEX) for e in entries) or entries.count(...) > 1:
        return None
    rest = len(shape) - (len(entries) - entries.count(...))
    if rest < 0:
        return None
    expanded: list[int | slice] = []
    for entry in (*entries, ...) if ... not in entries else entries:
        expanded.extend([slice(None)] * rest if entry is ... else [entry])
    kept = [axis for axis, entry in enumerate(expanded) if isinstance(entry, slice)]
    picked = {axis for axis, entry in enumerate(expanded)
              if isinstance(entry, int) or range(*entry.indices(shape[axis])) != range(shape[axis])}
    return kept, frozenset(picked)


def _fits_output(selection: Selection, source: tuple[int, ...], output: tuple[int, ...]) -> bool:
    """The traced output has the rank the mapping says, and every axis not picked along has its size."""
    kept, picked = selection
    return len(kept) == len(output) and all(axis in picked or size == source[axis] for axis, size in zip(kept, output))
