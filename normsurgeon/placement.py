"""Where a norm sits, read from the traced dataflow (not from module names or order).

In a transformer the residual stream ``x`` flows from block to block through residual adds
``x + branch(...)``, where the branch is computed from ``x``. A norm is

* **pre-norm** when its input is the stream and that same value also goes to a residual add whose
  branch is computed from the norm's output: ``x + attn(norm(x))`` (GPT-2, Llama, T5);
* **post-norm** when its input is the output of a residual add and its output is the stream the
  next residual add skips with: ``y = norm(x + attn(x)); y + mlp(y)`` (BERT). The last post-norm
  of a model, whose output feeds no further add, is post-norm when the model's other norms are;
* **final-norm** when it reads the stream after the last pre-norm block (``ln_f``);
* **embedding-norm** when its input is not a residual sum but its output starts the stream (BERT's
  embedding LayerNorm).

Otherwise its neighbours say where it sits: after a conv/linear (its input comes from one, maybe
through a transpose), before a conv/linear (all its outputs go to them), or standalone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import nn

from .dataflow import describe, source, users_through, walk_down, walk_up
from .trace import Node, Trace, Value

_ADD_NAMES = frozenset({"add", "__add__", "__radd__", "add_", "__iadd__"})
_CONV = nn.modules.conv._ConvNd


class Placement(enum.Enum):
    """Where a norm sits; the value is what the user sees."""

    PRE_NORM = "pre-norm"
    POST_NORM = "post-norm"
    FINAL_NORM = "final-norm"
    EMBEDDING_NORM = "embedding-norm"
    AFTER_CONV = "after conv"
    AFTER_LINEAR = "after linear"
    BEFORE_CONV = "before conv"
    BEFORE_LINEAR = "before linear"
    STANDALONE = "standalone"
    NOT_CALLED = "not called"


STREAM_PLACEMENTS = frozenset({Placement.PRE_NORM, Placement.POST_NORM, Placement.FINAL_NORM, Placement.EMBEDDING_NORM})


@dataclass(frozen=True)
class Where:
    """A norm's placement, and its neighbours in words (``input from ...; output to ...``)."""

    placement: Placement
    detail: str


# ------------------------------------------------------------------------------- graph helpers
# (the walks through layout and passthrough ops are :mod:`normsurgeon.dataflow`'s)


def is_add(node: Node) -> bool:
    return node.kind == "function" and node.name in _ADD_NAMES and len(node.inputs) == 2


def reaches(value: Value, target: Node) -> bool:
    """True when ``target`` is computed (directly or not) from ``value``."""
    if target in value.users:
        return True
    frontier, seen = list(value.users), set()
    while frontier:
        node = frontier.pop()
        if node is target:
            return True
        if id(node) in seen or node.index > target.index:
            continue
        seen.add(id(node))
        for out in node.outputs:
            frontier.extend(out.users)
    return False


def residual_operands(node: Node) -> tuple[Value, Value] | None:
    """(stream, branch) of a residual add — one operand computed from the other — else None."""
    if not is_add(node):
        return None
    a, b = node.inputs
    if reaches(a, b.producer):
        return a, b
    if reaches(b, a.producer):
        return b, a
    return None


def is_skip(value: Value) -> bool:
    """True when ``value`` is the skip of a residual add whose other operand is computed from it."""
    for user, read in users_through(value):
        if is_add(user):
            other = user.inputs[1] if user.inputs[0] is read else user.inputs[0]
            if other is not read and reaches(value, other.producer):
                return True
    return False


# ------------------------------------------------------------------------------- placement


def place_norms(flow: Trace, modules: list[nn.Module], *, channel_norms: set[nn.Module] = frozenset()) -> dict[nn.Module, Where]:
    """The placement of each norm module; ``channel_norms`` (BN/GN/IN) prefer neighbours to stream roles."""
    roles = {m: _stream_role(flow, m) for m in modules}
    has_pre = any(r is Placement.PRE_NORM for r in roles.values())
    has_post = any(r is Placement.POST_NORM for r in roles.values())
    placed: dict[nn.Module, Where] = {}
    for module in modules:
        calls = flow.calls_of(module)
        if not calls:
            placed[module] = Where(Placement.NOT_CALLED, "it did not run on the example inputs")
            continue
        role = roles[module]
        neighbour = _neighbour_role(flow, calls[0], axis=1 if module in channel_norms else None)
        if module in channel_norms:  # BN/GN/IN: conv neighbours first; no final/last-post guess
            real_role = role if isinstance(role, Placement) else None
            chosen = neighbour if neighbour is not Placement.STANDALONE else real_role or neighbour
        else:
            if role == "after-sum":
                role = Placement.FINAL_NORM if has_pre else Placement.POST_NORM if has_post else None
            chosen = role or neighbour
        placed[module] = Where(chosen, neighbours(flow, calls[0]))
    return placed


def _stream_role(flow: Trace, module: nn.Module) -> Placement | str | None:
    """PRE/POST/EMBEDDING from the first call, "after-sum" when it reads a residual sum only."""
    calls = flow.calls_of(module)
    if not calls or not calls[0].outputs:
        return None
    call, x = calls[0], flow.data_input(calls[0])
    if x is None:
        return None
    out = call.outputs[0]
    for user in x.users:
        if user is not call and is_add(user) and reaches(out, user):
            return Placement.PRE_NORM
    after_sum = residual_operands(source(x).producer) is not None
    skip = is_skip(out)
    if after_sum and skip:
        return Placement.POST_NORM
    if skip:
        return Placement.EMBEDDING_NORM
    if after_sum and len(x.users) == 1:
        return "after-sum"
    return None


def _neighbour_role(flow: Trace, call: Node, *, axis: int | None = None) -> Placement:
    """After/before a conv or linear layer (looking through layout ops; through reshapes that keep
    the channel ``axis`` where it is given), else STANDALONE."""
    value, _, _ = walk_up(flow, call, axis=axis)
    producer = value.producer if value is not None else None
    if producer is not None and producer.kind == "module":
        if isinstance(producer.module, _CONV):
            return Placement.AFTER_CONV
        if _is_linear_like(producer.module):
            return Placement.AFTER_LINEAR
    consumers = [node for node, _, _ in walk_down(call.outputs[0], axis=axis)] if call.outputs else []
    modules = [c.module for c in consumers if c.kind == "module"]
    if consumers and len(modules) == len(consumers):
        if all(isinstance(m, _CONV) for m in modules):
            return Placement.BEFORE_CONV
        if all(_is_linear_like(m) for m in modules):
            return Placement.BEFORE_LINEAR
    return Placement.STANDALONE


def _is_linear_like(module: nn.Module | None) -> bool:
    """nn.Linear, or transformers' Conv1D (a linear layer with its weight stored (in, out))."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_conv1d(module: nn.Module | None) -> bool:
    """transformers' ``Conv1D`` (GPT-2): y = x @ W + b with W of shape (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def neighbours(flow: Trace, call: Node) -> str:
    """``input from A; output to B, C`` for one call of a norm."""
    value = flow.data_input(call)
    parts = [f"input from {describe(value.producer)}" if value is not None else "no tensor input"]
    if call.outputs:
        users = [describe(u) for u, _ in users_through(call.outputs[0])]
        parts.append("output to " + (", ".join(dict.fromkeys(users)) or "nothing"))
    return "; ".join(parts)
