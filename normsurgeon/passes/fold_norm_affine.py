"""Fold a LayerNorm/RMSNorm's scale (and LN's shift) into the linear layers that read it.

A norm with affine ``y = n(x) * γ + β`` (n the parameter-free normalization) feeding linear layers
``z = y Wᵀ + b`` and nothing else computes the same as the parameter-free ``n(x)`` feeding

    W' = W · diag(γ),    b' = b + W β

(per consumer; for transformers' ``Conv1D``, whose weight is stored (in, out), the same with rows and
columns swapped; a shift into a layer without a bias gives it one). The trace must prove that every
call of the norm feeds only linear layers (q/k/v projections, MLP up/gate projections, an LM head)
and that those layers read nothing else; their weights must not be tied or used outside them. Ops
that only move, reshape or select along axes other than the hidden one may sit between (a causal
LM's ``hidden_states[:, -k:, :]`` before ``lm_head``, GPT-2's ``view``): they commute with a
per-feature scale and shift. γ is the norm's *effective* scale: Gemma's RMSNorm multiplies by
``1 + w`` (:attr:`NormInfo.scale_offset`). The norm is left parameter-free: torch's layers lose their
affine (``elementwise_affine=False``); a hand-written norm keeps its class with its weight set so the
effective scale is 1 (``w = 1``, Gemma's ``w = 0``; bias 0), frozen. Arithmetic is float64, cast back
once (a float32 weight times a scale float32 holds is one float32 multiply: the same bits, without a
float64 copy of the weight).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..dataflow import Refusal, check_editable, describe, is_passthrough, walk_down
from ..inputs import InputsLike
from ..layout import is_layout_op
from ..maths import input_shift_contribution, scale_channels_
from ..pipeline import Edit, ModulePass, PassContext, run
from ..placement import is_conv1d
from ..recognize import NormInfo, NormKind, recognize_norms
from ..report import Change, Report, Skip, SkipReason
from ..surgery import editable_weight, ensure_bias, foreign_hooks
from ..trace import Node, Trace

_FOLDABLE_KINDS = (NormKind.LAYERNORM, NormKind.RMSNORM)


def fold_norm_affines(
    model: nn.Module,
    example_inputs: InputsLike,
    *,
    inplace: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    raise_on_mismatch: bool = True,
) -> Report:
    """Fold every LayerNorm/RMSNorm affine that only linear layers read into them; return the report.

    ``example_inputs`` drive the trace that proves the dataflow and the check against the original
    outputs; a failed check raises :class:`VerificationError` (with ``raise_on_mismatch``).
    """
    return run(FoldNormAffines(), model, example_inputs, inplace=inplace, atol=atol, rtol=rtol,
               raise_on_mismatch=raise_on_mismatch)


class FoldNormAffines(ModulePass):
    """Fold each LayerNorm/RMSNorm affine into the linear layers that alone read the norm.

    Its check may accept float32 rounding noise: after a BatchNorm fold in the same run it compares
    with the original model, whose distance from the folded one can be that noise already.
    """

    name, report_name = "fold_norm_affines", "fold-affine"
    check_label, subject = "norm affines folded vs before", "the model with folded norm affines"
    eval_reason = "dropout is random"
    rounding_noise_ok = True

    def __init__(self, *, add_biases: bool = True) -> None:
        self.add_biases = add_biases  # False: a shift that would give a bias-less linear a bias is not folded

    def plan(self, ctx: PassContext) -> Iterator[Edit | Skip]:
        """The consumers of each foldable norm (an :class:`Edit` of its NormInfo), or why not."""
        recognition = recognize_norms(ctx.model, ctx.flow)
        for item in recognition.unrecognized:
            yield Skip(item.path, SkipReason.NOT_A_NORM, item.detail)
        for info in recognition.norms:
            if info.kind not in _FOLDABLE_KINDS:
                continue
            try:
                consumers = plan_affine_fold(ctx.flow, info, ctx.shared)
            except Refusal as refusal:
                yield refusal.skip(info.path)
                continue
            biasless = [m for m in consumers if info.bias is not None and getattr(m, "bias", None) is None]
            if biasless and not self.add_biases:
                yield Skip(info.path, SkipReason.NO_FOLDABLE_NEIGHBOUR,
                           f"its shift would give {ctx.flow.module_paths[biasless[0]]} a bias, which its class "
                           "builds without (a save_pretrained folder could not hold it)")
            else:
                yield Edit(info.path, info, consumers)

    def apply(self, ctx: PassContext, edit: Edit) -> list[Change]:
        return apply_affine_fold(ctx.flow, edit.target, edit.plan)


def plan_affine_fold(flow: Trace, info: NormInfo, shared: set[int]) -> list[nn.Module]:
    """The linear layers ``info``'s affine folds into, or :class:`~normsurgeon.dataflow.Refusal` with the reason."""
    if info.weight is None and info.bias is None:
        raise Refusal(SkipReason.NO_AFFINE, "nothing to fold")
    if info.kind not in _FOLDABLE_KINDS or len(info.normalized_shape) != 1:
        raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR, f"a {info.kind.spec.title} over {info.describe_normalized()} "
                      "does not scale the input features of a linear layer")
    calls = flow.calls_of(info.module)
    # Before NOT_CALLED: a norm whose weight only F.layer_norm / F.rms_norm reads did run, as a function.
    if any(flow.uses_outside(t) for t in (info.weight, info.bias) if t is not None):
        raise Refusal(SkipReason.FUNCTIONAL_USE, "its weight or bias is read by code outside it")
    if not calls:
        raise Refusal(SkipReason.NOT_CALLED, "it never ran, so its dataflow is unknown")
    hooks = foreign_hooks(info.module, pre=False)
    if hooks:
        raise Refusal(SkipReason.HOOKED, f"its forward hooks ({', '.join(hooks)}) would see its output without the affine")
    reads: dict[nn.Module, int] = {}
    for call in calls:
        for user in _linear_readers(flow, call):
            reads[user.module] = reads.get(user.module, 0) + 1
    for module, count in reads.items():
        if len(flow.calls_of(module)) != count:
            raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR, f"{flow.module_paths[module]} also reads other inputs")
        if in_features(module) != info.num_features:
            raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR, f"{flow.module_paths[module]} does not read the normalized features")
        _refuse_tied(flow, module, shared)
        check_editable(flow, module, shared)
    return list(reads)


def _linear_readers(flow: Trace, call: Node) -> list[Node]:
    """The linear-layer calls that read one call's output on its hidden (last) axis, through layout ops and
    selections along other axes; :class:`Refusal` for any other reader."""
    if not call.outputs:
        raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR, "it returned no tensor")
    output = call.outputs[0]
    found = []
    for user, axis, value in walk_down(output, through=_crossable, axis=len(output.shape) - 1):
        if not (user.kind == "module" and _is_linear_like(user.module)):
            raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR, f"its output also goes to {describe(user)}")
        if flow.data_input(user) is not value or len(user.inputs) != 1:
            raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR, f"{describe(user)} reads other tensors too")
        if axis != len(value.shape) - 1:
            raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR, f"{describe(user)} reads the normalized features "
                          "mixed with, or on, another axis")
        found.append(user)
    return found


def _storage(tensor: torch.Tensor) -> int | None:
    """Where a tensor's memory starts (None for an empty or meta one, whose address says nothing)."""
    if tensor.is_meta or not tensor.numel():
        return None
    return tensor.untyped_storage().data_ptr()


def _crossable(node: Node) -> bool:
    """An op between the norm and its linears that commutes with a per-feature affine (axes tracked)."""
    return is_layout_op(node) or is_passthrough(node)


def _refuse_tied(flow: Trace, module: nn.Module, shared: set[int]) -> None:
    """Refuse a consumer whose weight another module holds too (a tied LM head), naming that module."""
    own = {id(p): p for p in module.parameters(recurse=False) if id(p) in shared}
    if not own:
        return
    storages = {_storage(p) for p in own.values()} - {None}
    others = [path for other, path in flow.module_paths.items() if other is not module and any(
        id(p) in own or _storage(p) in storages for p in other.parameters(recurse=False))]
    if others:
        path = flow.module_paths[module]
        raise Refusal(SkipReason.SHARED_PARAMETER, f"{path} shares its weight with {', '.join(others)} (tied weights, "
                      f"e.g. input/output embeddings): a scale folded into it would change {others[0]} too; untie "
                      "them first (transformers: tie_word_embeddings=False, or give the head its own copy of the weight)")


def apply_affine_fold(flow: Trace, info: NormInfo, consumers: list[nn.Module]) -> list[Change]:
    """Fold ``info``'s affine into ``consumers`` (planned by :func:`plan_affine_fold`); the norm ends parameter-free."""
    gamma = _as_vector(info.weight, info.num_features) + info.scale_offset
    beta = _as_vector(info.bias, info.num_features, fill=0.0)
    changes = []
    for module in consumers:
        fold_input_affine(module, gamma, beta if info.bias is not None and bool(beta.any()) else None)
        changes.append(Change("folded-affine", info.path, flow.module_paths[module],
                              "scale" + (" and shift" if info.bias is not None else "") + " into its consumer"))
    strip_affine(info)
    return changes


def fold_input_affine(module: nn.Module, gamma: torch.Tensor, beta: torch.Tensor | None) -> None:
    """In place: ``module(x * gamma + beta) == module'(x)`` for a Linear or Conv1D (float64 maths)."""
    weight = editable_weight(module)
    assert not isinstance(weight, str)  # checked while planning
    w = weight.tensor
    in_dim = input_dim(module)
    if beta is not None:
        if in_dim == 1:
            shift = input_shift_contribution(w, beta)
        else:
            shift = beta.to(w.device) @ w.detach().double()
        bias = ensure_bias(module, w.shape[1 - in_dim], w)
        new_bias = bias.detach().double() + shift.to(bias.device)
    scale_inputs_(w, gamma, in_dim)
    weight.commit()
    if beta is not None:
        with torch.no_grad():
            bias.copy_(new_bias.to(bias.dtype))


def scale_inputs_(weight: torch.Tensor, gamma: torch.Tensor, in_dim: int) -> None:
    """In place: each input feature's weights (along ``in_dim``) times its float64 ``gamma``, rounded once.

    A float32 weight times a gamma that float32 holds exactly (a norm's stored scale) is one float32
    multiply: the product of two float32 values is exact in float64, so float32's correctly rounded
    product is the float64 product rounded, bit for bit, with no float64 copy of the weight. Anything
    else (bf16 weights, a Gemma ``1 + w`` that float32 cannot hold) goes through float64 chunks.
    """
    narrow = gamma.to(torch.float32)
    if weight.dtype != torch.float32 or not torch.equal(narrow.double(), gamma):
        scale_channels_(weight, gamma.to(weight.device), channel_dim=in_dim)
        return
    shape = [1] * weight.dim()
    shape[in_dim] = -1
    with torch.no_grad():
        weight.mul_(narrow.to(weight.device).view(shape))


def strip_affine(info: NormInfo) -> None:
    """Leave the norm parameter-free: torch's layers drop their affine, hand-written ones get an effective
    scale of 1 (weight ``1 - scale_offset``: 1, or Gemma's 0) and bias 0, frozen."""
    module = info.module
    if info.native and isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        module.weight = None
        if isinstance(module, nn.LayerNorm):
            module.bias = None
        module.elementwise_affine = False
        return
    with torch.no_grad():
        for tensor, value in ((info.weight, 1.0 - info.scale_offset), (info.bias, 0.0)):
            if tensor is not None:
                tensor.fill_(value)
                tensor.requires_grad_(False)


def input_dim(module: nn.Module) -> int:
    """The weight dim indexed by input features: 1 for nn.Linear (out, in), 0 for Conv1D (in, out)."""
    return 0 if is_conv1d(module) else 1


def in_features(module: nn.Module) -> int:
    return int(module.weight.shape[input_dim(module)])


def _is_linear_like(module: nn.Module | None) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _as_vector(tensor: torch.Tensor | None, size: int, fill: float = 1.0) -> torch.Tensor:
    if tensor is None:
        return torch.full((size,), fill, dtype=torch.float64)
    return tensor.detach().double().reshape(-1).cpu()
