"""The residual streams LayerNorms read, found in the trace: what writes to each, and through which ops.

LayerNorm -> RMSNorm by centring (:mod:`.convert_centring`) needs every value a LayerNorm reads to be
a sum of *writes* that can each be made zero-mean along the hidden axis by editing weights: the
output of a linear layer, a conv (one group) or an embedding with its features on the hidden axis,
or a parameter read directly (ViT's class token and position embeddings). Between a write and the
norm there may be

* adds: the residual adds, both branches of a parallel block (Phi: ``attn(h) + mlp(h) + x``), summed
  embeddings, a parameter added (``x + pos_embed``);
* a concatenation: along another axis (the class token before the patches), or of parts that are
  each zero-mean along the hidden axis (Swin's patch merging);
* ops that keep the hidden axis: layout ops, the axis tracked (OPT's ``reshape(-1, d)`` and ``view``
  back, Swin's window partition), eval-mode dropout (a module or ``F.dropout(training=False)``), and
  any parameter-free leaf module that returns its input unchanged (drop-path in eval mode: found by
  calling it once on a probe);
* a multiplication by a number (Whisper's ``embed_scale``), which keeps a zero mean;
* a per-channel layer scale (DINOv2's ``layer_scale``, timm's ``LayerScale``: a one-parameter leaf
  module found by probing, or ``x * gamma``), which does not: it is folded into the writes beneath it.

Walking up from each LayerNorm's input through these ops gives the values of its stream; norms whose
walks meet share a stream (an encoder-decoder has two). A walk that meets anything else (a GELU, a
norm's output, the model's input) records why its stream cannot be centred; other streams still can.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..dataflow import Refusal, describe, is_passthrough
from ..layout import axis_before, is_layout_op
from ..placement import is_conv1d
from ..report import SkipReason
from ..surgery import foreign_hooks
from ..trace import Node, Trace, Value

_ADDS = frozenset({"add", "__add__", "__radd__", "add_", "__iadd__"})
_SCALINGS = frozenset({"mul", "__mul__", "__rmul__", "mul_", "__imul__"})
_DIVISIONS = frozenset({"div", "__truediv__", "div_", "__itruediv__"})
_DROPOUTS = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"})
# ops that hand on a parameter with its trailing axes kept (broadcast to, sliced along leading axes, moved)
_PARAMETER_READS = frozenset({"expand", "broadcast_to", "repeat", "to", "contiguous", "clone", "__getitem__"})
_CENTRABLE = "normsurgeon centres linear layers, convs, embeddings and parameters"


@dataclass(frozen=True)
class Writer:
    """A write to the stream: a module's output (``name`` None: its weight, and its bias) or a parameter."""

    owner: nn.Module
    name: str | None
    dim: int  # the dim of the weight (or the parameter) indexed by the hidden features
    path: str


@dataclass(frozen=True)
class Scale:
    """A per-channel layer scale: the parameter ``owner.name``; ``owner`` is a leaf module computing
    ``x * parameter`` when ``module`` is set, else the parameter is read by a ``mul``."""

    owner: nn.Module
    name: str
    path: str
    module: bool


Scales = frozenset[Scale]


@dataclass
class Stream:
    """One residual stream: its values (id -> value, hidden axis, the layer scales above it), its writers
    (with the layer scales above each) and, when it cannot be centred, why."""

    values: dict[int, tuple[Value, int, Scales]] = field(default_factory=dict)
    writers: dict[Writer, Scales] = field(default_factory=dict)
    refusal: Refusal | None = None

    def refuse(self, refusal: Refusal) -> None:
        self.refusal = self.refusal or refusal

    def add_writer(self, writer: Writer, scales: Scales) -> None:
        if self.writers.setdefault(writer, scales) != scales:
            raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, f"{writer.path} writes to the residual stream both "
                          "with and without a layer scale")

    def absorb(self, other: Stream) -> None:
        self.values.update(other.values)
        for writer, scales in other.writers.items():
            try:
                self.add_writer(writer, scales)
            except Refusal as refusal:
                self.refuse(refusal)
        if other.refusal is not None:
            self.refuse(other.refusal)


@dataclass
class _Step:
    """What a value is made of: values to walk on (with their hidden axis), writers, and a layer scale."""

    inputs: list[tuple[Value, int]] = field(default_factory=list)
    writers: list[Writer] = field(default_factory=list)
    scale: Scale | None = None


def find_streams(flow: Trace, calls: list[Node]) -> dict[Node, Stream]:
    """The stream each LayerNorm call reads (calls whose walks meet share one :class:`Stream` object)."""
    walker = _Walker(flow)
    starts = {call: walker.walk(flow.data_input(call), call) for call in calls}
    return walker.merged(starts)


def keeps_values(node: Node) -> bool:
    """An op that hands its input on unchanged in eval mode: passthrough ops and ``F.dropout(training=False)``."""
    return is_passthrough(node) or _is_eval_dropout(node)


def _is_eval_dropout(node: Node) -> bool:
    if node.kind != "function" or node.name not in _DROPOUTS or len(node.inputs) != 1:
        return False
    training = node.kwargs.get("training", node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True))
    return training is False


def writer_dim(module: nn.Module) -> int | None:
    """The weight dim indexed by output features of a layer whose output can be centred, else None."""
    if isinstance(module, nn.Linear):
        return 0
    if isinstance(module, nn.modules.conv._ConvNd):
        return 0 if not module.transposed and module.groups == 1 else None
    if isinstance(module, nn.Embedding) or is_conv1d(module):
        return 1
    return None


class _Walker:
    """Walks up from LayerNorm inputs; a union-find joins the streams whose walks meet."""

    def __init__(self, flow: Trace) -> None:
        self.flow = flow
        self.owners = {id(t): (module, name, f"{path}.{name}" if path else name)
                       for module, path in flow.module_paths.items()
                       for name, t in (*module._parameters.items(), *module._buffers.items()) if t is not None}
        self.streams: list[Stream] = []
        self.parent: list[int] = []
        self.owner_of: dict[int, int] = {}  # id(value) -> index of the stream that walked it first
        self.probed: dict[tuple[int, int], object] = {}
        tensors = (t for module in flow.module_paths for t in module.parameters(recurse=False))
        self.like = next((t for t in tensors if t.is_floating_point()), None)  # a probe's dtype and device

    def walk(self, start: Value | None, call: Node) -> int:
        index = len(self.streams)
        self.streams.append(Stream())
        self.parent.append(index)
        if start is None:
            why = f"{describe(call)}'s input is not traced"
            self.streams[index].refuse(Refusal(SkipReason.UNSUPPORTED_STRUCTURE, why))
            return index
        stack: list[tuple[Value, int, Scales]] = [(start, len(start.shape) - 1, frozenset())]
        while stack:
            try:
                self._visit(index, *stack.pop(), stack)
            except Refusal as refusal:
                self.streams[index].refuse(refusal)
        return index

    def merged(self, starts: dict[Node, int]) -> dict[Node, Stream]:
        roots = {self._root(index): self.streams[self._root(index)] for index in range(len(self.streams))}
        for index, stream in enumerate(self.streams):
            if self._root(index) != index:
                roots[self._root(index)].absorb(stream)
        return {call: roots[self._root(index)] for call, index in starts.items()}

    def _root(self, index: int) -> int:
        while self.parent[index] != index:
            self.parent[index] = self.parent[self.parent[index]]
            index = self.parent[index]
        return index

    def _visit(self, index: int, value: Value, axis: int, scales: Scales, stack: list) -> None:
        known = self.owner_of.get(id(value))
        if known is not None:
            self.parent[self._root(known)] = self._root(index)
            _, seen_axis, seen_scales = self.streams[known].values[id(value)]
            if (seen_axis, seen_scales) != (axis, scales):
                raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, f"the residual stream reaches {describe(value.producer)} "
                              "along paths with different hidden axes or layer scales")
            return
        stream = self.streams[index]
        self.owner_of[id(value)] = index
        stream.values[id(value)] = (value, axis, scales)
        step = self._step(value, axis)
        below = scales | {step.scale} if step.scale is not None else scales
        for writer in step.writers:
            stream.add_writer(writer, below)
        stack.extend((v, a, below) for v, a in step.inputs)

    # ------------------------------------------------------------------------- one op

    def _step(self, value: Value, axis: int) -> _Step:
        node = value.producer
        if node.kind == "module":
            return self._module_step(node, value, axis)
        if node.kind == "function" and node.inputs and keeps_values(node):
            return _Step([(node.inputs[0], axis)])
        if node.kind == "function" and is_layout_op(node):
            before = axis_before(node, axis)
            if before is None:
                raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, f"{describe(node)} on the residual stream mixes the "
                              "hidden axis with others")
            return _Step([(node.inputs[0], before)])
        if node.kind == "function":
            step = self._function_step(node, value, axis)
            if step is not None:
                return step
        where = "the model's input" if node.kind == "input" else describe(node)
        raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, f"{where} writes to the residual stream and its output "
                      f"cannot be made zero-mean by editing weights ({_CENTRABLE})")

    def _module_step(self, node: Node, value: Value, axis: int) -> _Step:
        module = node.module
        dim = writer_dim(module)
        if dim is not None:
            expected = 1 if isinstance(module, nn.modules.conv._ConvNd) else len(value.shape) - 1
            if axis != expected:
                raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, f"{describe(node)} writes to the residual stream with "
                              "its output features off the hidden axis")
            return _Step(writers=[Writer(module, None, dim, self.flow.module_paths[module])])
        effect = "identity" if keeps_values(node) else self._probe(node, axis)  # eval nn.Dropout, nn.Identity
        if effect == "identity":
            return _Step([(node.inputs[0], axis)])
        if isinstance(effect, Scale):
            return _Step([(node.inputs[0], axis)], scale=effect)
        raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, f"{describe(node)} writes to the residual stream and its "
                      f"output cannot be made zero-mean by editing weights ({_CENTRABLE})")

    def _function_step(self, node: Node, value: Value, axis: int) -> _Step | None:
        params = node.used_parameters
        if node.name in _ADDS and len(node.inputs) + len(params) == 2:
            step = _Step([(v, self._operand_axis(node, v.shape, value, axis)) for v in node.inputs])
            step.writers = [self._parameter_writer(node, p, value, axis) for p in params]
            return step
        if node.name == "cat" and len(node.inputs) + len(params) >= 1:
            # along another axis each row is a row of one part; along the hidden axis (Swin's patch merging)
            # a row is parts of rows, zero-mean when each part is
            writers = [self._parameter_writer(node, p, value, axis) for p in params]
            return _Step([(v, axis) for v in node.inputs], writers)
        if node.name in _SCALINGS | _DIVISIONS and len(node.inputs) == 1 and not params and _by_number(node):
            return _Step([(node.inputs[0], axis)])
        if node.name in _SCALINGS and len(node.inputs) == 1 and len(params) == 1:
            return _Step([(node.inputs[0], axis)], scale=self._parameter_scale(node, params[0], value, axis))
        if (node.name in _PARAMETER_READS and not node.inputs and len(params) == 1
                and _keeps_trailing(node, params[0], value)):
            return _Step(writers=[self._parameter_writer(node, params[0], value, axis)])
        return None

    @staticmethod
    def _operand_axis(node: Node, shape: tuple[int, ...], value: Value, axis: int) -> int:
        operand_axis = axis - (len(value.shape) - len(shape))
        if operand_axis < 0 or shape[operand_axis] != value.shape[axis]:
            raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, f"{describe(node)} adds a value that is the same along "
                          "the hidden axis, which centring cannot remove")
        return operand_axis

    def _parameter_writer(self, node: Node, tensor: torch.Tensor, value: Value, axis: int) -> Writer:
        owner, name, path = self._owner(node, tensor)
        dim = axis - (len(value.shape) - tensor.dim())
        if dim < 0 or tensor.shape[dim] not in (1, value.shape[axis]):
            raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, f"{path}, read by {describe(node)}, is not laid out "
                          "along the hidden axis of the residual stream")
        return Writer(owner, name, dim, path)

    def _parameter_scale(self, node: Node, tensor: torch.Tensor, value: Value, axis: int) -> Scale:
        owner, name, path = self._owner(node, tensor)
        dim = axis - (len(value.shape) - tensor.dim())
        if dim < 0 or tensor.numel() != value.shape[axis] or tensor.shape[dim] != value.shape[axis]:
            raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, f"{describe(node)} multiplies the residual stream by "
                          f"{path}, which is not one scale per hidden channel")
        return Scale(owner, name, path, module=False)

    def _owner(self, node: Node, tensor: torch.Tensor) -> tuple[nn.Module, str, str]:
        found = self.owners.get(id(tensor))
        if found is None:
            raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, f"{describe(node)} reads a tensor no module holds")
        return found

    # ------------------------------------------------------------------------- probes

    def _probe(self, node: Node, axis: int) -> object:
        """'identity', a :class:`Scale` or None: what a leaf module does to its one input, found by calling it
        on a random tensor of the traced shape."""
        key = (id(node.module), axis)
        if key not in self.probed:
            self.probed[key] = self._run_probe(node, axis)
        return self.probed[key]

    def _run_probe(self, node: Node, axis: int) -> object:
        module = node.module
        params = list(module.parameters())
        if (next(module.children(), None) is not None or foreign_hooks(module) or len(node.inputs) != 1
                or len(params) > 1 or next(module.buffers(), None) is not None):
            return None
        shape = node.inputs[0].shape
        like = params[0] if params else self.like
        options = {"dtype": like.dtype, "device": like.device} if like is not None and like.is_floating_point() else {}
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(**options)
        try:
            with torch.no_grad():
                out = module(x.clone())
        except Exception:  # a module that needs more than one tensor is not an identity or a scale
            return None
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            return None
        if not params:
            return "identity" if torch.equal(out, x) else None
        gamma = params[0]
        if gamma.numel() != shape[axis]:
            return None
        expected = x * gamma.detach().reshape([-1 if d == axis else 1 for d in range(len(shape))])
        if not torch.allclose(out, expected, rtol=1e-6, atol=0.0):
            return None
        name = next(n for n, p in module.named_parameters() if p is gamma)
        return Scale(module, name, self.flow.module_paths[module], module=True)


def _by_number(node: Node) -> bool:
    """A multiplication or division of the one tensor by a Python number."""
    operands = [a for a in (*node.args, *node.kwargs.values()) if a is not None]
    return len(operands) == 1 and isinstance(operands[0], (int, float)) and not isinstance(operands[0], bool)


def _keeps_trailing(node: Node, tensor: torch.Tensor, value: Value) -> bool:
    """A parameter read keeps its trailing axes: a broadcast adds leading ones, a basic slice keeps the rank."""
    if node.name != "__getitem__":
        return len(value.shape) >= tensor.dim()
    index = node.args[1] if len(node.args) > 1 else None
    index = index if isinstance(index, tuple) else (index,)
    return len(value.shape) == tensor.dim() and all(isinstance(i, slice) or i is Ellipsis for i in index)
