"""What every pass reads off the traced dataflow: refusals, walks through layout ops, neighbours, editability.

The passes plan from the same questions: which layer produces a norm's input (looking through a
``transpose``, an ``nn.Identity``, a reshape that keeps the channel axis or a selection along other
axes such as ``hidden_states[:, -1:]``), which nodes read its output, is that layer's weight free to
edit, and how to say why not. They are answered here, once; a pass imports them from this module
and never from another pass.

A plan that does not hold raises :class:`Refusal` with a :class:`~normsurgeon.report.SkipReason`
and a detail; the pass turns it into a :class:`~normsurgeon.report.Skip` for its report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .layout import axis_after, axis_before, is_layout_op, keeps_axes, needs_axis, reads_only_shape
from .report import Skip, SkipReason
from .surgery import editable_weight, foreign_hooks
from .trace import Node, Trace, Value
from .weight_standardization import find_standardization

PRODUCERS: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)


class Refusal(Exception):
    """A plan (or a reading of a module) that does not hold: the reason, and the detail users see.

    ``stats`` carries what the refusing code had already worked out (the BatchNorm fold: the norm's
    :class:`~normsurgeon.norms.BatchNormStats`, so that a caller may still replace it by an affine).
    """

    def __init__(self, reason: SkipReason, detail: str = "", *, stats: Any = None) -> None:
        super().__init__(detail or reason.value)
        self.reason = reason
        self.detail = detail
        self.stats = stats

    def skip(self, path: str) -> Skip:
        """The report's record of the module at ``path`` left as it was for this reason."""
        return Skip(path, self.reason, self.detail)


# ------------------------------------------------------------------------------- nodes


def describe(node: Node) -> str:
    """A node in words, as reports name it: ``fc (Linear)``, ``relu()``, ``the model's output``."""
    if node.kind == "module":
        return f"{node.name} ({type(node.module).__name__})"
    if node.kind in ("input", "output"):
        return f"the model's {node.kind}"
    return f"{node.name}()"


def readers(value: Value) -> list[Node]:
    """The nodes that read ``value``'s numbers: its users but those that read only its shape (``reshape_as``)."""
    return [user for user in value.users if not reads_only_shape(user, value)]


def single_user(value: Value) -> Node | None:
    """The one node reading ``value``'s numbers, or None when it has no reader or several."""
    found = readers(value)
    return found[0] if len(found) == 1 else None


def channel_axis(module: nn.Module, rank: int) -> int:
    """The channel axis of a conv/linear layer's output (as a producer) or input (as a consumer)."""
    return rank - 1 if isinstance(module, nn.Linear) else 1


def is_passthrough(node: Node) -> bool:
    """An op that hands its input on unchanged, axes included (eval Dropout, Identity, contiguous,
    a ``.to(device)`` without a dtype)."""
    return _is_device_move(node) or keeps_axes(node)


def _is_device_move(node: Node) -> bool:
    if node.kind != "function" or node.name != "to" or len(node.inputs) != 1 or len(node.outputs) != 1:
        return False
    options = [*node.args[1:], *node.kwargs.values()]
    return not any(isinstance(a, (torch.dtype, torch.Tensor)) for a in options)


# ------------------------------------------------------------------------------- walks

Through = Callable[[Node], bool]


def walk_up(flow: Trace, call: Node, *, through: Through = is_layout_op,
            axis: int | None = None) -> tuple[Value | None, int | None, Node]:
    """From a call's data input back through ``through`` ops that nothing else reads.

    Returns ``(value, axis, reader)``: the first value not produced by such an op (None when the
    call, or an op on the way, has no tensor input), the channel axis ``axis`` of the call's input
    has in that value (None when not tracked), and the node on the way that reads ``value``. A
    reshape is looked through only while it keeps the tracked axis whole, a selection only while it
    picks along other axes.
    """
    value, reader = flow.data_input(call), call
    while value is not None and through(value.producer) and single_user(value) is reader:
        goes_on, moved = _carry(value.producer, axis, axis_before)
        if not goes_on:
            break
        reader, axis = value.producer, moved
        value = flow.data_input(reader)
    return value, axis, reader


def walk_down(value: Value, *, through: Through = is_layout_op,
              axis: int | None = None) -> Iterator[tuple[Node, int | None, Value]]:
    """Every node that reads ``value``'s numbers, looking through ``through`` ops, in trace order.

    Yields ``(node, axis, read)``: the reader, where axis ``axis`` of ``value`` is in the value it
    reads (None when not tracked), and that value. A ``through`` op whose output nobody reads ends
    its branch with nothing; a reshape that does not keep the tracked axis whole, or a selection
    along it, is a reader. ``through`` ops must keep the values they hand on: layout ops, whose axes
    are tracked (a selection drops entries along other axes, which commutes with any per-channel
    edit), or ops that keep their axes (:func:`is_passthrough`). A node that reads ``value`` for
    its shape only is no reader; an op that reads it as other than its data (``index_select``'s index) is.
    """
    for user in readers(value):
        crosses = through(user) and user.outputs and user.inputs[0] is value
        goes_on, moved = _carry(user, axis, axis_after) if crosses else (False, axis)
        if goes_on:
            yield from walk_down(user.outputs[0], through=through, axis=moved)
        else:
            yield user, axis, value


def _carry(op: Node, axis: int | None, move: Callable[[Node, int], int | None]) -> tuple[bool, int | None]:
    """Whether a walk goes on through ``op``, and where ``axis`` is on its other side (``move``: which way).

    A reshape or a selection is gone through only with a tracked axis it keeps: an untracked one
    might be merged, or picked along.
    """
    if not is_layout_op(op):
        return True, axis
    if axis is None:
        return not needs_axis(op), None
    moved = move(op, axis)
    return moved is not None, moved


def users_through(value: Value) -> list[tuple[Node, Value]]:
    """(user, value it reads) for every user of ``value``, looking through passthrough ops."""
    return [(user, read) for user, _, read in walk_down(value, through=is_passthrough)]


def source(value: Value) -> Value:
    """The value before any passthrough ops that lead to ``value`` (whoever else reads them)."""
    while is_passthrough(value.producer) and value.producer.inputs:
        value = value.producer.inputs[0]
    return value


# ------------------------------------------------------------------------------- planning


def producer_targets(flow: Trace, calls: list[Node], kinds: tuple[type[nn.Module], ...] = PRODUCERS) -> list[nn.Module]:
    """The one layer (of ``kinds``) that produces the input of every call in ``calls``, and only that.

    Every call must read, through layout ops nothing else reads, the output of a call of that layer
    with its channels on the norm's channel axis (1); that output must go nowhere else, and every
    call of the layer must be one of these. Otherwise :class:`Refusal` (NO_FOLDABLE_NEIGHBOUR) says why.
    """
    producers: list[Node] = []
    for call in calls:
        value, axis, reader = walk_up(flow, call, axis=1)
        if value is None:
            raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR, "its input is not produced by a layer")
        producer = value.producer
        label = describe(producer)
        if not (producer.kind == "module" and isinstance(producer.module, kinds)):
            raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR, f"its input comes from {label}")
        if single_user(value) is not reader:
            others = ", ".join(describe(u) for u in readers(value) if u is not reader)
            raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR, f"{label}'s output also goes to {others}")
        if axis != channel_axis(producer.module, len(value.shape)):
            raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR, f"{label}'s channels are not the norm's channels")
        producers.append(producer)
    modules = {p.module for p in producers}
    if len(modules) != 1:
        raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR, "its calls read different layers")
    (module,) = modules
    if len(flow.calls_of(module)) != len(producers):
        raise Refusal(
            SkipReason.NO_FOLDABLE_NEIGHBOUR,
            f"{flow.module_paths[module]} is called {len(flow.calls_of(module))} times, not always before this norm",
        )
    return [module]


def check_editable(flow: Trace, target: nn.Module, shared: set[int], *, output_changes: bool = False) -> None:
    """Refuse a layer whose weight cannot be changed in place exactly, or whose hooks would notice.

    ``shared`` is :func:`~normsurgeon.surgery.shared_parameter_ids` of the model. Its forward
    pre-hooks always count (they see a changed input, or recompute the weight); its forward hooks
    only when the edit changes what it returns (``output_changes``).
    """
    path = flow.module_paths[target]
    hooks = foreign_hooks(target, post=output_changes)
    if hooks:
        raise Refusal(SkipReason.HOOKED, f"{path} has forward hooks ({', '.join(hooks)}) that would see different values")
    if any(id(p) in shared for p in target.parameters()):
        raise Refusal(SkipReason.SHARED_PARAMETER, f"{path} shares its weight with another module")
    if any(flow.uses_outside(p) for p in target.parameters()):
        raise Refusal(SkipReason.FUNCTIONAL_USE, f"{path}'s weight is also read outside {path}")
    weight = editable_weight(target)
    if isinstance(weight, str):
        raise Refusal(SkipReason.PARAMETRIZED_WEIGHT, f"{path}: {weight}")
    standardized = find_standardization(target)
    if standardized is not None:
        raise Refusal(SkipReason.PARAMETRIZED_WEIGHT, f"{path} is a {standardized.describe()}: a change to "
                      "its weight would be standardized away; bake it first (normsurgeon.bake_weight_standardization)")
