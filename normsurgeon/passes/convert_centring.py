"""LayerNorm -> RMSNorm, exactly, in pre-norm transformers: centre the residual stream (SliceGPT/QuaRot).

LayerNorm ignores a constant added to its input row, RMSNorm does not; on a zero-mean row they are
equal: ``LN(x) = RMSNorm(x - mean(x))``. In a pre-norm transformer the residual stream is the sum of
everything written to it — the embeddings and the output projections of the attention/MLP branches —
and is read only by LayerNorms (and the residual adds). Making every write zero-mean,

    W' = (I - 11ᵀ/d) diag(s) W,   b' = (I - 11ᵀ/d)(s ⊙ b)     (an output projection, d outputs)
    E'[i] = E[i] - mean(E[i])                                (an embedding row, a parameter)

(``s`` the per-channel layer scales above the writer, set to 1 after, else 1) makes the stream
``x - mean(x)`` everywhere, which no LayerNorm notices. Then each LayerNorm's affine is folded into
the linears that read it (see :mod:`.fold_norm_affine`), and the remaining parameter-free LayerNorm is
an ``nn.RMSNorm(eps, elementwise_affine=False)``. A LayerNorm whose bias cannot be folded stays a
LayerNorm (still exact on the centred stream).

The trace must prove the structure (:mod:`.convert_stream` finds each stream and its writers): the
stream is read only by LayerNorms over its hidden axis and by its own ops; the writers write nowhere
else and share no weights. A writer that shares its weight (an input embedding tied to the LM head)
is given its own copy with ``untie=True``; without it the stream is refused, naming the option. Each
stream is refused or centred on its own (Whisper's encoder starts at a GELU, its decoder can be centred).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..dataflow import Refusal, check_editable, describe, walk_down
from ..layout import is_layout_op
from ..placement import Placement, Where
from ..recognize import NormInfo, NormKind, Recognition
from ..report import Action, Change, SkipReason
from ..surgery import byte_extent, editable_weight, shared_parameter_ids
from ..inputs import InputsLike
from ..trace import Node, Trace, Value, call_model, is_atomic
from .convert_stream import Scale, Scales, Stream, Writer, find_streams, keeps_values
from .fold_norm_affine import apply_affine_fold, plan_affine_fold

# A post-norm's input is another norm's output plus a branch, an embedding norm's output is the stream:
# neither can read a centred stream. Every other LayerNorm's input is walked up (final norms behind a
# reshape are placed "standalone", a norm behind a linear layer reads a stream with one writer).
_OFF_STREAM = (Placement.POST_NORM, Placement.EMBEDDING_NORM, Placement.NOT_CALLED)
_CHUNK_ELEMENTS = 1 << 20  # float64 elements edited at once (8 MiB)


@dataclass
class CentringPlan:
    """Writers to centre (with the layer scales folded into each), tensors to untie, LayerNorms to convert;
    the selected LayerNorms left out (with why) and, per stream that cannot be centred, its norms and why."""

    writers: dict[Writer, Scales] = field(default_factory=dict)
    untie: dict[Writer, list[tuple[str, str]]] = field(default_factory=dict)  # writer -> (tensor name, tied to)
    norms: list[NormInfo] = field(default_factory=list)
    left_out: list[tuple[NormInfo, SkipReason, str]] = field(default_factory=list)
    refused: list[tuple[list[NormInfo], Refusal]] = field(default_factory=list)

    @property
    def scales(self) -> dict[Scale, list[Writer]]:
        """Each layer scale, with the writers it is folded into."""
        found: dict[Scale, list[Writer]] = {}
        for writer, scales in self.writers.items():
            for scale in scales:
                found.setdefault(scale, []).append(writer)
        return found


@dataclass
class CentringOutcome:
    """What centring changed, per LayerNorm (info, replacement or None when kept, detail), and notes."""

    changes: list[Change]
    norms: list[tuple[NormInfo, nn.Module | None, str]]
    notes: list[str]


def plan_centring(flow: Trace, recognition: Recognition, sources: list[NormInfo], where: dict[nn.Module, Where],
                  shared: set[int], *, untie: bool = False, model: nn.Module | None = None,
                  inputs: InputsLike | None = None) -> CentringPlan:
    """Which writers to centre and which LayerNorms become RMSNorm; streams that cannot be centred are
    listed with the :class:`~normsurgeon.dataflow.Refusal` that says why. ``model`` and ``inputs`` (those
    of ``flow``) run the model once more when a module the trace cannot see into reads a stream (without
    them, such a stream is refused)."""
    plan = CentringPlan()
    on_stream = []
    for info in sources:
        placement = where[info.module].placement
        if placement not in _OFF_STREAM and len(info.normalized_shape) == 1:
            on_stream.append(info)
        else:
            plan.left_out.append((info, SkipReason.UNSUPPORTED_STRUCTURE, _why_not_on_stream(placement)))
    if not on_stream:
        return plan
    # every stream is centred whole, whichever of its LayerNorms were selected
    layernorms = {i.module for i in recognition.norms if i.kind is NormKind.LAYERNORM and len(i.normalized_shape) == 1}
    readers = [i for i in recognition.norms if i.module in layernorms and where[i.module].placement not in _OFF_STREAM]
    streams = find_streams(flow, [c for i in readers for c in flow.calls_of(i.module)])
    verdicts: dict[int, Refusal | None] = {}  # only the streams a selected LayerNorm reads are centred
    refused: dict[int, list[NormInfo]] = {}
    for info in on_stream:
        mine = [streams[c] for c in flow.calls_of(info.module)]
        for stream in mine:
            if id(stream) not in verdicts:
                verdicts[id(stream)] = _verdict(flow, stream, layernorms, shared, untie, plan, model, inputs)
        failed = next((s for s in mine if verdicts[id(s)] is not None), None)
        if failed is None:
            plan.norms.append(info)
        else:
            refused.setdefault(id(failed), []).append(info)
    plan.refused = [(infos, verdicts[key]) for key, infos in refused.items()]
    return plan


def apply_centring(model: nn.Module, flow: Trace, plan: CentringPlan) -> CentringOutcome:
    """Untie, fold the layer scales into and centre the writers, fold each LN's affine, build its RMSNorm."""
    notes = [_untie(flow, writer, tied) for writer, tied in plan.untie.items()]
    if plan.untie:
        notes += _untie_config(model)
    changes = [_centre(writer, scales, plan.untie.get(writer)) for writer, scales in plan.writers.items()]
    for scale, writers in plan.scales.items():
        _set_to_one(scale)
        changes.append(Change(Action.FOLDED, scale.path, ", ".join(w.path for w in writers),
                              "per-channel layer scale folded into the layers that write the branch, then set to 1"))
    shared = shared_parameter_ids(model)
    norms = []
    for info in plan.norms:
        try:
            consumers = plan_affine_fold(flow, info, shared)
        except Refusal as refusal:
            consumers, why = None, refusal.detail
        if consumers is not None:
            changes.extend(apply_affine_fold(flow, info, consumers))
            norms.append((info, _rmsnorm(info, None),
                          "exact on the centred residual stream, affine folded into its consumers"))
        elif info.bias is None or not bool(info.bias.detach().any()):
            norms.append((info, _rmsnorm(info, info.scale()), "exact on the centred residual stream"))
        else:
            norms.append((info, None,
                          f"its bias cannot be folded ({why}); kept as LayerNorm, exact on the centred stream"))
    return CentringOutcome(changes, norms, notes)


# ------------------------------------------------------------------------------- checks


def _why_not_on_stream(placement: Placement) -> str:
    if placement is Placement.POST_NORM:
        return ("it is a post-norm: it reads the sum of the stream and a branch and its output is the stream; "
                "LayerNorm -> RMSNorm by centring needs pre-norm blocks")
    if placement is Placement.NOT_CALLED:
        return "it did not run on the example inputs"
    return (f"its output starts the residual stream (placement: {placement.value}), so its per-channel scale "
            "and shift are in the stream: centring cannot make the stream zero-mean")


def _verdict(flow: Trace, stream: Stream, layernorms: set[nn.Module], shared: set[int], untie: bool,
             plan: CentringPlan, model: nn.Module | None, inputs: InputsLike | None) -> Refusal | None:
    """None when ``stream`` can be centred (its writers then join ``plan``), else why not."""
    if stream.refusal is not None:
        return stream.refusal
    try:
        _check_readers(stream, layernorms, model, inputs)
        tied = {writer: _check_writer(flow, writer, stream, shared, untie) for writer in stream.writers}
        for scale in {s for scales in stream.writers.values() for s in scales}:
            _check_scale(flow, scale, stream, shared)
    except Refusal as refusal:
        return refusal
    plan.writers.update(stream.writers)
    plan.untie.update((writer, names) for writer, names in tied.items() if names)
    return None


def _crossable(node: Node) -> bool:
    return is_layout_op(node) or keeps_values(node)


def _check_readers(stream: Stream, layernorms: set[nn.Module], model: nn.Module | None,
                   inputs: InputsLike | None) -> None:
    """Everything reading the stream must ignore its mean: LayerNorms over its hidden axis (not below a
    layer scale, which the fold changes), the stream's own ops, and modules shown to (:func:`_unmoved`)."""
    unknown: list[tuple[Node, Value, int]] = []
    for value, axis, scales in stream.values.values():
        for user, at, read in walk_down(value, through=_crossable, axis=axis):
            if user.outputs and id(user.outputs[0]) in stream.values:
                continue
            if user.kind == "module" and user.module in layernorms and at == len(read.shape) - 1 and not scales:
                continue
            if user.kind == "module" and at is not None and not scales:
                unknown.append((user, read, at))
                continue
            raise _read_by(user)
    moved = _unmoved(model, inputs, unknown)
    if moved is not None:
        raise _read_by(moved)


def _read_by(user: Node) -> Refusal:
    what = "the model's output (e.g. hidden states)" if user.kind == "output" else describe(user)
    return Refusal(SkipReason.UNSUPPORTED_STRUCTURE, f"the residual stream is also read by {what}, which would see "
                   "the centred values")


def _unmoved(model: nn.Module | None, inputs: InputsLike | None,
             readers: list[tuple[Node, Value, int]]) -> Node | None:
    """The first of ``readers`` (module calls reading a stream value) whose output changes when that value is
    centred along its axis, else None. A module the trace cannot see into may read the hidden states only
    for their dtype (transformers' rotary embeddings): the model is run once more to catch each call's
    arguments, and each call is repeated with every argument of the value's shape centred in turn."""
    if not readers or model is None or inputs is None:
        return readers[0][0] if readers else None
    wanted = {(id(node.module), node.call) for node, _, _ in readers}
    caught: dict[tuple[int, int], tuple[tuple, dict]] = {}
    counts: dict[int, int] = {}

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = counts[id(module)] = counts.get(id(module), -1) + 1
        if (id(module), call) in wanted:
            caught[(id(module), call)] = (args, kwargs)

    modules = {node.module: None for node, _, _ in readers}
    handles = [module.register_forward_pre_hook(catch, with_kwargs=True) for module in modules]
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    for node, value, axis in readers:
        arguments = caught.get((id(node.module), node.call))
        if arguments is None or not _ignores_centring(node.module, *arguments, value.shape, axis):
            return node
    return None


def _ignores_centring(module: nn.Module, args: tuple, kwargs: dict, shape: tuple[int, ...], axis: int) -> bool:
    leaves, spec = tree_flatten((args, kwargs))
    candidates = {id(t): t for t in leaves
                  if isinstance(t, torch.Tensor) and tuple(t.shape) == shape and t.is_floating_point()}
    with torch.no_grad():
        before = tree_flatten(module(*args, **kwargs))[0]
        for key, tensor in candidates.items():
            centred = tensor - tensor.mean(axis, keepdim=True)
            new_args, new_kwargs = tree_unflatten([centred if id(t) == key else t for t in leaves], spec)
            after = tree_flatten(module(*new_args, **new_kwargs))[0]
            if len(after) != len(before) or not all(
                    torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(after, before)):
                return False
    return bool(candidates)


def _check_writer(flow: Trace, writer: Writer, stream: Stream, shared: set[int],
                  untie: bool) -> list[tuple[str, str]]:
    """Refuse a writer that cannot be centred alone; return the tensors ``untie`` gives their own copy."""
    owner = writer.owner
    if writer.name is None:
        calls = flow.calls_of(owner)
        if any(not c.outputs or id(c.outputs[0]) not in stream.values for c in calls):
            raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, f"{writer.path} writes to the residual stream and also elsewhere")
        if getattr(owner, "max_norm", None) is not None:
            raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, f"{writer.path} renormalizes its rows (max_norm)")
        names = [name for name, p in owner.named_parameters(recurse=False) if id(p) in shared]
    else:
        tensor = getattr(owner, writer.name)
        _check_read_only_on_stream(flow, owner, writer.path, tensor, stream)
        names = [writer.name] if id(tensor) in shared else []
    tied = [(name, _holders(flow, owner, name)) for name in names]
    if tied and not untie:
        raise Refusal(SkipReason.SHARED_PARAMETER, f"{writer.path} shares its {tied[0][0]} with {tied[0][1]} (tied "
                      "weights): it writes to the residual stream and cannot be centred alone; pass untie=True "
                      "(CLI: --untie) to give it its own copy")
    if writer.name is None:
        untied = {id(getattr(owner, name)) for name, _ in tied}
        try:
            check_editable(flow, owner, shared - untied, output_changes=True)
        except Refusal as refusal:
            raise Refusal(refusal.reason, f"{refusal.detail}: it writes to the residual stream and cannot be "
                          "centred alone") from None
    return tied


def _check_scale(flow: Trace, scale: Scale, stream: Stream, shared: set[int]) -> None:
    tensor = getattr(scale.owner, scale.name)
    if id(tensor) in shared:
        raise Refusal(SkipReason.SHARED_PARAMETER, f"the layer scale {scale.path} is shared with another module")
    if scale.module:
        if any(not c.outputs or id(c.outputs[0]) not in stream.values for c in flow.calls_of(scale.owner)):
            raise Refusal(SkipReason.UNSUPPORTED_STRUCTURE, f"the layer scale {scale.path} also scales values off the stream")
        if flow.uses_outside(tensor):
            raise Refusal(SkipReason.FUNCTIONAL_USE, f"{scale.path} is also read outside its module")
    else:
        _check_read_only_on_stream(flow, scale.owner, scale.path, tensor, stream)


def _check_read_only_on_stream(flow: Trace, owner: nn.Module, path: str, tensor: torch.Tensor,
                               stream: Stream) -> None:
    """A parameter edited in place must be read only by the stream's ops (not inside its module too)."""
    if is_atomic(owner) and flow.calls_of(owner):
        raise Refusal(SkipReason.FUNCTIONAL_USE, f"{path} is also used inside {flow.module_paths[owner]}")
    others = [u for u in flow.uses_outside(tensor) if not u.outputs or id(u.outputs[0]) not in stream.values]
    if others:
        raise Refusal(SkipReason.FUNCTIONAL_USE, f"{path} is also read by {describe(others[0])}")


def _holders(flow: Trace, owner: nn.Module, name: str) -> str:
    """The other modules holding ``owner.name`` (or memory it shares), for the message."""
    tensor = getattr(owner, name)

    def overlaps(other: torch.Tensor) -> bool:
        return other.device == tensor.device and other.data_ptr() < _end(tensor) and tensor.data_ptr() < _end(other)

    found = [path for module, path in flow.module_paths.items() if module is not owner and any(
        p is tensor or overlaps(p) for p in (*module._parameters.values(), *module._buffers.values())
        if p is not None and p.numel())]
    return ", ".join(found) or "another tensor"


def _end(tensor: torch.Tensor) -> int:
    return tensor.data_ptr() + byte_extent(tensor)


# ------------------------------------------------------------------------------- edits


def _untie(flow: Trace, writer: Writer, tied: list[tuple[str, str]]) -> str:
    """Give the writer its own copy of each tied tensor (the other holders keep the original)."""
    size = 0
    for name, _ in tied:
        tensor = getattr(writer.owner, name)
        copy = tensor.detach().clone()
        setattr(writer.owner, name, nn.Parameter(copy, requires_grad=tensor.requires_grad)
                if isinstance(tensor, nn.Parameter) else copy)
        size += copy.numel()
    others = "; ".join(f"{name} from {holders}" for name, holders in tied)
    return f"{writer.path} untied ({others}): it has its own copy now, {size:,} more parameters"


def _untie_config(model: nn.Module) -> list[str]:
    """A transformers model re-ties its embeddings on loading unless its config says not to."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return []
    config.tie_word_embeddings = False
    return ["config.tie_word_embeddings set to False, so that from_pretrained keeps the untied weights"]


def _centre(writer: Writer, scales: Scales, untied: list | None) -> Change:
    """In place: fold the layer scales into the writer, then make each of its output rows zero-mean (float64)."""
    gamma = None
    for scale in scales:
        vector = getattr(scale.owner, scale.name).detach().double().reshape(-1)
        gamma = vector if gamma is None else gamma * vector
    if writer.name is None:
        module = writer.owner
        weight = editable_weight(module)
        assert not isinstance(weight, str)  # checked while planning
        centre_(weight.tensor, writer.dim, gamma)
        weight.commit()
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and not isinstance(module, nn.Embedding):
            centre_(bias, 0, gamma)
    else:
        centre_(getattr(writer.owner, writer.name), writer.dim, gamma)
    what = "given its own copy of its tied weight, then " if untied else ""
    scaled = f" after folding {', '.join(sorted(s.path for s in scales))} into it" if scales else ""
    return Change(Action.CENTRED, writer.path, None, f"{what}its output is made zero-mean{scaled}: W' = (I - 11ᵀ/d) W")


def centre_(tensor: torch.Tensor, dim: int, scale: torch.Tensor | None = None) -> None:
    """In place: ``t <- (I - 11ᵀ/d)(s ⊙ t)`` along ``dim`` (``s`` the per-channel scale, or 1), in float64
    chunks along another dim, cast back once."""
    others = [d for d in range(tensor.dim()) if d != dim]
    split = max(others, key=lambda d: tensor.shape[d], default=None)
    chunks = [tensor] if split is None else tensor.split(max(1, _CHUNK_ELEMENTS * tensor.shape[split]
                                                            // max(1, tensor.numel())), split)
    shape = [-1 if d == dim else 1 for d in range(tensor.dim())]
    with torch.no_grad():
        for chunk in chunks:
            values = chunk.double()
            if scale is not None:
                values = values * scale.to(values.device).reshape(shape)
            chunk.copy_(values - values.mean(dim, keepdim=True))


def _set_to_one(scale: Scale) -> None:
    with torch.no_grad():
        getattr(scale.owner, scale.name).fill_(1.0)


def _rmsnorm(info: NormInfo, weight: torch.Tensor | None) -> nn.Module:
    reference = next((t for t in (info.weight, info.bias) if t is not None), None)
    factory = {"dtype": reference.dtype, "device": reference.device} if reference is not None else {}
    new = nn.RMSNorm(info.normalized_shape, eps=info.eps, elementwise_affine=weight is not None, **factory)
    if weight is not None:
        with torch.no_grad():
            new.weight.copy_(weight.detach())
    return new
