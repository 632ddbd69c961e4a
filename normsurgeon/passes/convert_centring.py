"""LayerNorm -> RMSNorm, exactly, in pre-norm transformers: centre the residual stream (SliceGPT/QuaRot).

LayerNorm ignores a constant added to its input row, RMSNorm does not; on a zero-mean row they are
equal: ``LN(x) = RMSNorm(x - mean(x))``. In a pre-norm transformer the residual stream is the sum of
everything written to it — the embeddings and the output projections of the attention/MLP branches —
and is read only by LayerNorms (and the residual adds). Making every write zero-mean,

    W' = (I - 11ᵀ/d) W,   b' = b - mean(b)      (an output projection, d outputs)
    E'[i] = E[i] - mean(E[i])                    (an embedding row)

makes the stream ``x - mean(x)`` everywhere, which no LayerNorm notices. Then each LayerNorm's affine
is folded into the linears that read it (see :mod:`.fold_norm_affine`), and the remaining
parameter-free LayerNorm is an ``nn.RMSNorm(eps, elementwise_affine=False)``. A LayerNorm whose bias
cannot be folded stays a LayerNorm (still exact on the centred stream).

The trace must prove the structure: the stream starts at embeddings, grows only by residual adds of
linear outputs, and is read only by LayerNorms and those adds; the writers write nowhere else and
share no weights (a tied input embedding cannot be centred alone). Otherwise the conversion is refused
with the reason (post-norm blocks, a layer-scale ``mul``, an RMSNorm or the model output reading the
stream, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..dataflow import Refusal, check_editable, describe, is_passthrough, source, users_through
from ..placement import Placement, Where, is_add, is_conv1d, residual_operands
from ..recognize import NormInfo, NormKind, Recognition
from ..report import Action, Change, SkipReason
from ..surgery import editable_weight
from ..trace import Trace, Value
from .fold_norm_affine import apply_affine_fold, plan_affine_fold

_STREAM_PLACEMENTS = (Placement.PRE_NORM, Placement.FINAL_NORM)


@dataclass
class CentringPlan:
    """Writers to centre, LayerNorms to convert, and the selected LayerNorms left out (with why)."""

    writers: list[nn.Module] = field(default_factory=list)
    norms: list[NormInfo] = field(default_factory=list)
    left_out: list[tuple[NormInfo, SkipReason, str]] = field(default_factory=list)


def plan_centring(flow: Trace, recognition: Recognition, sources: list[NormInfo],
                  where: dict[nn.Module, Where], shared: set[int]) -> CentringPlan:
    """Which writers to centre and which LayerNorms become RMSNorm; :class:`~normsurgeon.dataflow.Refusal` when the stream cannot be centred."""
    plan = CentringPlan()
    on_stream = []
    for info in sources:
        placement = where[info.module].placement
        if placement in _STREAM_PLACEMENTS and len(info.normalized_shape) == 1:
            on_stream.append(info)
        else:
            plan.left_out.append((info, SkipReason.UNSUPPORTED_STRUCTURE, _why_not_on_stream(placement)))
    if not on_stream:
        return plan
    # the whole stream is centred, whichever of its LayerNorms were selected
    readers = [i for i in recognition.norms if i.kind is NormKind.LAYERNORM and len(i.normalized_shape) == 1
               and where[i.module].placement in _STREAM_PLACEMENTS]
    stream, writers = _collect_stream(flow, [flow.data_input(c) for i in readers for c in flow.calls_of(i.module)])
    _check_readers(flow, recognition, stream)
    width = on_stream[0].num_features
    for module in writers:
        _check_writer(flow, module, stream, width, shared)
    for info in on_stream:
        if all(id(flow.data_input(c)) in stream for c in flow.calls_of(info.module)):
            plan.norms.append(info)
        else:
            plan.left_out.append((info, SkipReason.UNSUPPORTED_STRUCTURE, "it also reads values off the residual stream"))
    plan.writers = writers
    return plan


def apply_centring(flow: Trace, plan: CentringPlan, shared: set[int]) -> tuple[list[Change], list[tuple[NormInfo, nn.Module | None, str]]]:
    """Centre the writers, fold each LN's affine, and build its RMSNorm.

    Returns the changes, and per LN (info, replacement or None when kept as LayerNorm, detail).
    """
    changes = [_centre(flow, module) for module in plan.writers]
    outcome = []
    for info in plan.norms:
        try:
            consumers = plan_affine_fold(flow, info, shared)
        except Refusal as refusal:
            consumers, why = None, refusal.detail
        if consumers is not None:
            changes.extend(apply_affine_fold(flow, info, consumers))
            outcome.append((info, _rmsnorm(info, None), "exact on the centred residual stream, affine folded into its consumers"))
        elif info.bias is None or not bool(info.bias.detach().any()):
            outcome.append((info, _rmsnorm(info, info.weight), "exact on the centred residual stream"))
        else:
            outcome.append((info, None, f"its bias cannot be folded ({why}); kept as LayerNorm, exact on the centred stream"))
    return changes, outcome


# ------------------------------------------------------------------------------- structure


def _why_not_on_stream(placement: Placement) -> str:
    if placement is Placement.POST_NORM:
        return ("it is a post-norm: it reads the sum of the stream and a branch and its output is the stream; "
                "LayerNorm -> RMSNorm by centring needs pre-norm blocks")
    return (f"it does not read a pre-norm residual stream (placement: {placement.value}); "
            "centring cannot make its input zero-mean")


def _collect_stream(flow: Trace, starts: list[Value | None]) -> tuple[set[int], list[nn.Module]]:
    """ids of the residual stream's values, and the modules that write to it (in order)."""
    stream: set[int] = set()
    writers: dict[nn.Module, None] = {}
    stack = list(starts)
    while stack:
        value = stack.pop()
        if value is None:
            raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, "a LayerNorm's input is not traced")
        if id(value) in stream:
            continue
        stream.add(id(value))
        producer = value.producer
        operands = residual_operands(producer)
        if is_passthrough(producer) and producer.inputs:
            stack.append(producer.inputs[0])
        elif operands is not None:
            stack.append(operands[0])
            writers[_writer(operands[1])] = None
        elif is_add(producer):  # a sum of embeddings
            stack.extend(producer.inputs)
        elif producer.kind == "module" and isinstance(producer.module, nn.Embedding):
            writers[producer.module] = None
        else:
            raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, f"the residual stream starts at {describe(producer)}; "
                          "normsurgeon centres embeddings and linear layers only")
    return stream, list(writers)


def _writer(branch: Value) -> nn.Module:
    producer = source(branch).producer
    if producer.kind == "module" and (isinstance(producer.module, (nn.Linear, nn.Embedding)) or is_conv1d(producer.module)):
        return producer.module
    raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, f"{describe(producer)} writes to the residual stream; "
                  "normsurgeon can centre only linear layers and embeddings")


def _check_readers(flow: Trace, recognition: Recognition, stream: set[int]) -> None:
    """Everything reading the stream must ignore its mean: LayerNorms, and the residual adds."""
    layernorms = {i.module for i in recognition.norms if i.kind is NormKind.LAYERNORM and len(i.normalized_shape) == 1}
    for node in flow.nodes:
        for value in node.outputs:
            if id(value) not in stream:
                continue
            for user, _ in users_through(value):
                if is_add(user) and user.outputs and id(user.outputs[0]) in stream:
                    continue
                if user.kind == "module" and user.module in layernorms:
                    continue
                what = "the model's output (e.g. hidden states)" if user.kind == "output" else describe(user)
                raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE,
                              f"the residual stream is also read by {what}, which would see the centred values")


def _check_writer(flow: Trace, module: nn.Module, stream: set[int], width: int, shared: set[int]) -> None:
    path = flow.module_paths[module]
    for call in flow.calls_of(module):
        for user, _ in users_through(call.outputs[0]):
            if not (is_add(user) and user.outputs and id(user.outputs[0]) in stream):
                raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, f"{path} writes to the residual stream and also to {describe(user)}")
    if _out_features(module) != width:
        raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, f"{path} writes {_out_features(module)} features, the stream has {width}")
    try:
        check_editable(flow, module, shared, output_changes=True)
    except Refusal as refusal:
        raise Refusal(refusal.reason, f"{refusal.detail}: it writes to the residual stream and cannot be centred alone") from None


# ------------------------------------------------------------------------------- edits


def _out_dim(module: nn.Module) -> int:
    """The weight dim indexed by output features: 0 for nn.Linear, 1 for Conv1D and nn.Embedding."""
    return 0 if isinstance(module, nn.Linear) else 1


def _out_features(module: nn.Module) -> int:
    return int(module.weight.shape[_out_dim(module)])


def _centre(flow: Trace, module: nn.Module) -> Change:
    """In place: make every output row of ``module`` zero-mean over its features (float64 maths)."""
    weight = editable_weight(module)
    assert not isinstance(weight, str)  # checked while planning
    w = weight.tensor
    with torch.no_grad():
        w64 = w.double()
        w.copy_((w64 - w64.mean(_out_dim(module), keepdim=True)).to(w.dtype))
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and not isinstance(module, nn.Embedding):
            b64 = bias.double()
            bias.copy_((b64 - b64.mean()).to(bias.dtype))
    weight.commit()
    return Change(Action.CENTRED, flow.module_paths[module], None, "its output is made zero-mean: W' = (I - 11ᵀ/d) W")


def _rmsnorm(info: NormInfo, weight: torch.Tensor | None) -> nn.Module:
    reference = next((t for t in (info.weight, info.bias) if t is not None), None)
    factory = {"dtype": reference.dtype, "device": reference.device} if reference is not None else {}
    new = nn.RMSNorm(info.normalized_shape, eps=info.eps, elementwise_affine=weight is not None, **factory)
    if weight is not None:
        with torch.no_grad():
            new.weight.copy_(weight.detach())
    return new
