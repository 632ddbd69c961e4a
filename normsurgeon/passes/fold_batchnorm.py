"""Fold test-time BatchNorm into the conv / linear layer next to it.

A BN is folded into the layer that *produces* its input (Conv1d/2d/3d, ConvTranspose1d/2d/3d,
Linear, grouped or not, with or without bias) when the traced dataflow proves that every call of
that layer feeds this BN and nothing else, and every call of the BN reads only that layer (an
axis-only op such as ``transpose`` may sit between them). Otherwise it is folded into the layers
that *consume* its output, when those are convs whose padding commutes with a per-channel affine
(no zero padding) or linears, and they read nothing else. The maths is in :mod:`normsurgeon.maths`.

A BN with its activation inside (timm ``BatchNormAct2d``; :func:`~normsurgeon.norms.split_batchnorm_act`)
folds its norm into its producer the same way and is replaced by that activation. ``fold`` first merges
summed conv+BN branches into one conv (:class:`~normsurgeon.passes.reparameterize.Reparameterize`,
:func:`fold_passes`), on the same trace.

Folded BNs become ``nn.Identity`` (or their activation); the model stays the user's own class (except that a grouped
ConvTranspose on CPU given a bias by the fold becomes a :class:`BiasAfterConvTranspose2d` (or 1d,
3d), whose bias is added after the conv: torch's kernel is slow with one). A BN with no foldable
neighbour is kept (or, with ``unfoldable="affine"``, replaced by a :class:`ChannelAffine`), and
the report says why.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..dataflow import Refusal, channel_axis, check_editable, describe, producer_targets, walk_down
from ..inputs import InputsLike
from ..maths import batchnorm_scale_shift, input_shift_contribution, scale_channels_
from ..modules import BIAS_AFTER_CONV_TRANSPOSE, ChannelAffine
from ..norms import BatchNormStats, is_batchnorm_like, never_updated, split_batchnorm_act
from ..pipeline import Edit, ModulePass, PassContext, Sequential, run
from ..report import Change, Report, Skip, SkipReason
from ..surgery import editable_weight, ensure_bias, hooks_lost_by_replacing, replace_module, turn_into
from ..trace import Node, Trace
from .bake_weight_standardization import BakeWeightStandardization
from .reparameterize import Reparameterize

_CONSUMERS = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class FoldPlan:
    """Fold ``norm`` into ``targets``: its producer (``into_producer``) or its consumers."""

    norm: nn.Module
    stats: BatchNormStats
    targets: list[nn.Module]
    into_producer: bool
    act: nn.Module = field(default_factory=nn.Identity)  # what takes the norm's place (its own activation, if any)


@dataclass
class _FoldState:
    """What one run's fold remembers between items: the BNs it took out, the layers it gave a bias."""

    removed: dict[nn.Module, tuple[str, nn.Module]] = field(default_factory=dict)  # BN -> (path, its replacement)
    given_a_bias: list[nn.Module] = field(default_factory=list)


def fold_batchnorm(
    model: nn.Module,
    example_inputs: InputsLike,
    *,
    inplace: bool = True,
    unfoldable: Literal["keep", "affine"] = "keep",
    allow_default_stats: bool = False,
    reparameterize: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    raise_on_mismatch: bool = True,
) -> Report:
    """Fold every test-time BatchNorm of ``model`` that can be folded exactly; return the report.

    ``example_inputs`` (a tuple of positional or a dict of keyword arguments) drive the trace
    that proves the dataflow and the check that compares the folded model with the original.
    With ``inplace=False`` the model is deep-copied first; ``report.model`` is the folded model.
    Summed conv+BN branches are merged into one conv first (``reparameterize=False``: not).
    A failed check raises :class:`VerificationError` (with ``raise_on_mismatch``).
    """
    passes = fold_passes(unfoldable=unfoldable, allow_default_stats=allow_default_stats, reparameterize=reparameterize)
    return run_fold(passes, model, example_inputs, inplace=inplace, atol=atol, rtol=rtol,
                    raise_on_mismatch=raise_on_mismatch)


def fold_passes(*, unfoldable: Literal["keep", "affine"] = "keep", allow_default_stats: bool = False,
                reparameterize: bool = True) -> Sequential:
    """What ``fold`` runs: :class:`BakeWeightStandardization`, :class:`Reparameterize` (unless turned
    off), then :class:`FoldBatchNorm`.

    Weight standardization is baked first (it needs no trace, so the one trace sees plain convs a
    BatchNorm can fold into); merging summed conv+BN branches (RepVGG, MobileOne) leaves one conv
    per block and the BNs it absorbed gone; the fold then folds what is left.
    """
    fold = FoldBatchNorm(unfoldable=unfoldable, allow_default_stats=allow_default_stats)
    return Sequential(BakeWeightStandardization(), *([Reparameterize()] if reparameterize else []), fold)


def run_fold(passes: Sequential, model: nn.Module, example_inputs: InputsLike, **options: Any) -> Report:
    """:func:`~normsurgeon.pipeline.run` for a fold pipeline: the report is named ``fold`` whatever runs first."""
    report = run(passes, model, example_inputs, **options)
    report.pass_name = FoldBatchNorm.report_name
    return report


def batchnorms_left(report: Report) -> list[str]:
    """Each BatchNorm a fold's result still holds, as ``'path (why)'``: what ``fold --strict`` refuses.

    For a module, every BatchNorm-like module still in ``report.model`` (plain, frozen, or with its
    activation inside), whatever the reason; for a ``.pt2``, every batch_norm node the fold skipped.
    """
    why = {skip.module: skip.message for skip in report.skipped}
    if isinstance(report.model, nn.Module):
        paths = [path for path, _ in _batchnorm_modules(report.model)]
    else:
        paths = list(dict.fromkeys(skip.module for skip in report.skipped))
    return [f"{path} ({why.get(path, 'not folded')})" for path in paths]


class FoldBatchNorm(ModulePass):
    """Fold each BatchNorm into its producer or consumers (``unfoldable="affine"``: others become a ChannelAffine)."""

    name, report_name = "fold_batchnorm", "fold"
    check_label, subject = "folded vs original", "the folded model"
    eval_reason = "BatchNorm uses batch statistics"
    rounding_noise_ok = True

    def __init__(self, *, unfoldable: Literal["keep", "affine"] = "keep", allow_default_stats: bool = False) -> None:
        self.unfoldable = unfoldable
        self.allow_default_stats = allow_default_stats

    def plan(self, ctx: PassContext) -> Iterator[Edit | Skip]:
        """A :class:`FoldPlan` per foldable BN; its statistics for one replaced by an affine; else why not."""
        live = set(ctx.model.modules())  # an earlier pass (reparameterize) may have replaced traced modules
        for path, module in _batchnorm_modules(ctx.model):
            try:
                yield Edit(path, module, plan_batchnorm_fold(ctx.flow, module, ctx.shared, live=live,
                                                             allow_default_stats=self.allow_default_stats))
            except Refusal as refusal:
                if self.unfoldable == "affine" and refusal.stats is not None:
                    yield Edit(path, module, refusal.stats)
                else:
                    yield refusal.skip(path)

    def apply(self, ctx: PassContext, edit: Edit) -> list[Change]:
        if isinstance(edit.plan, tuple):
            return [_replace_with_affine(ctx, edit.target, *edit.plan, edit.path)]
        plan: FoldPlan = edit.plan
        state = self._state(ctx)
        state.given_a_bias += _apply(plan)
        replace_module(ctx.model, edit.target, plan.act, ctx.parents)
        state.removed[edit.target] = (edit.path, plan.act)
        side = "producer" if plan.into_producer else "consumer"
        detail = f"into its {side}"
        if not _is_identity(plan.act):
            detail = f"{norm_label(plan.act)} {detail}; {_replacement_name(plan.act)} takes its place"
        return [Change("folded", edit.path, ctx.flow.module_paths[t], detail) for t in plan.targets]

    def finish(self, ctx: PassContext, report: Report) -> None:
        _add_bias_after_grouped_conv_transposes(self._state(ctx).given_a_bias, ctx.flow, report)
        _note_functional_batchnorm(ctx.flow, report)

    def outputs(self, ctx: PassContext, report: Report) -> Any:
        """The folded model's outputs; a folded BN still called through a plain reference becomes what replaced it.

        The fold replaces a BN where the module tree registers it; a model that also keeps it in a
        Python list, a closure or a ``functools.partial`` would still call the old module, applying
        the BN twice. Such a call is caught here and that very object turned into the identity the
        fold meant (an Identity, or the BN's own activation), so every reference agrees.
        """
        removed = self._state(ctx).removed
        stale: list[nn.Module] = []
        handles = [bn.register_forward_pre_hook(lambda module, args: stale.append(module)) for bn in removed]
        try:
            outputs = ctx.forward()
        finally:
            for handle in handles:
                handle.remove()
        if not stale:
            return outputs
        for bn in dict.fromkeys(stale):
            path, act = removed[bn]
            turn_into(bn, None if _is_identity(act) else act)  # a stale reference to the folded BN
            report.notes.append(f"{path} is also called through a reference outside the module tree (a list, "
                                f"closure or partial): that object was turned into {_replacement_name(act)} as well")
        return ctx.forward()

    def _state(self, ctx: PassContext) -> _FoldState:
        return ctx.state.setdefault(self.name, _FoldState())


def _note_functional_batchnorm(flow: Trace, report: Report) -> None:
    """Say so when BN ran as a function: the trace sees ``batch_norm()``, not a module, and folds nothing there."""
    calls = sum(node.kind == "function" and node.name == "batch_norm" for node in flow.nodes)
    if calls:
        report.notes.append(
            f"batch_norm() ran {calls} time(s) outside a BatchNorm module call (F.batch_norm in the model's code, "
            "or a BatchNorm's forward() called directly): only BatchNorm modules are folded, those calls stay"
        )


def _batchnorm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(path, m) for path, m in model.named_modules() if is_batchnorm_like(m)]


def plan_batchnorm_fold(flow: Trace, norm: nn.Module, shared: set[int], *, allow_default_stats: bool = False,
                        live: set[nn.Module] | None = None) -> FoldPlan:
    """How ``norm`` (a BatchNorm-like module of the traced model) folds, or :class:`Refusal` with why not.

    ``shared`` is :func:`~normsurgeon.surgery.shared_parameter_ids` of the model; ``live``, when an
    earlier pass of the run replaced modules the trace still shows, the modules the model holds now.
    A norm with its activation inside (timm ``BatchNormAct2d``) folds its norm part like a plain BN
    and keeps the activation (:func:`~normsurgeon.norms.split_batchnorm_act`); only a bare norm folds
    into its consumers. A refusal for want of a foldable neighbour carries ``(stats, act)``.
    """
    calls = flow.calls_of(norm)
    # Checked before NOT_CALLED: a BN whose stats only ``F.batch_norm`` reads (or whose forward() is
    # called directly, bypassing the hooks the trace records calls with) did run, just not as a module.
    outside = [n for t in (*norm.parameters(), *norm.buffers()) for n in flow.uses_outside(t)]
    if outside:
        names = ", ".join(sorted({f"{n.name}()" for n in outside}))
        raise Refusal(SkipReason.FUNCTIONAL_USE, f"its tensors are read by {names} outside a call of the module "
                      "(a functional call, or its forward() called directly)")
    if not calls:
        raise Refusal(SkipReason.NOT_CALLED, "it never ran, so its dataflow is unknown")
    hooked = hooks_lost_by_replacing(norm)
    if hooked:
        raise Refusal(SkipReason.HOOKED, hooked)
    first_input = flow.data_input(calls[0])
    stats, act = split_batchnorm_act(norm, first_input.shape if first_input else None)
    try:
        if never_updated(norm, stats) and not allow_default_stats:
            raise Refusal(SkipReason.NEVER_UPDATED, "recalibrate it, or pass --allow-default-stats to fold anyway")
        return _plan_targets(flow, norm, calls, stats, act, shared, live)
    except Refusal as refusal:
        if _is_identity(act):
            raise
        raise Refusal(refusal.reason, f"{norm_label(act)}: {refusal.detail}", stats=refusal.stats) from None


def _plan_targets(flow: Trace, norm: nn.Module, calls: list[Node], stats: BatchNormStats, act: nn.Module,
                  shared: set[int], live: set[nn.Module] | None) -> FoldPlan:
    """The producer (or, for a bare norm, the consumers) the norm folds into; else NO_FOLDABLE_NEIGHBOUR."""
    planners = (producer_targets, _consumer_targets) if _is_identity(act) else (producer_targets,)
    reasons = []
    for planner in planners:
        try:
            targets = planner(flow, calls)
            for target in targets:
                _check_live(flow, target, live)
                check_editable(flow, target, shared, output_changes=planner is producer_targets)
            return FoldPlan(norm, stats, targets, into_producer=planner is producer_targets, act=act)
        except Refusal as refusal:
            if refusal.reason is not SkipReason.NO_FOLDABLE_NEIGHBOUR:
                raise
            reasons.append(refusal.detail)
    if not _is_identity(act):
        reasons.append(f"{_replacement_name(act)} runs after the norm inside the module, "
                       "so the norm cannot fold into the layers that read the module's output")
    raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR, "; ".join(reasons), stats=(stats, act))


def norm_label(act: nn.Module) -> str:
    """``BatchNorm`` for a bare norm, ``BatchNorm+SiLU`` (``BatchNorm+Dropout+ReLU``) for one with its activation."""
    parts = list(act) if isinstance(act, nn.Sequential) else [act]
    return "+".join(["BatchNorm", *(type(p).__name__ for p in parts if not _is_identity(p))])


def _is_identity(act: nn.Module) -> bool:
    return isinstance(act, nn.Identity) or (isinstance(act, nn.Sequential) and all(map(_is_identity, act)))


def _check_live(flow: Trace, target: nn.Module, live: set[nn.Module] | None) -> None:
    """Refuse a neighbour an earlier pass of the run replaced: the trace still shows it, the model does not."""
    if live is not None and target not in live:
        raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR,
                      f"{flow.module_paths[target]} was replaced by an earlier pass (reparameterize)")


def _consumer_targets(flow: Trace, calls: list[Node]) -> list[nn.Module]:
    reads: dict[nn.Module, int] = {}
    for call in calls:
        output = call.outputs[0] if call.outputs else None
        consumers = list(walk_down(output, axis=1)) if output is not None else []
        if not consumers:
            raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR, "its output is not used by a layer")
        for consumer, axis, value in consumers:
            label = describe(consumer)
            if not (consumer.kind == "module" and isinstance(consumer.module, _CONSUMERS)):
                raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR, f"its output goes to {label}")
            if flow.data_input(consumer) is not value or len(consumer.inputs) != 1:
                raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR, f"{label} reads other tensors too")
            if axis != channel_axis(consumer.module, len(value.shape)):
                raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR, f"{label} mixes the norm's channels differently")
            why_not = _inexact_consumer(consumer.module)
            if why_not:
                raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR, f"{label} {why_not}")
            reads[consumer.module] = reads.get(consumer.module, 0) + 1
    for module, count in reads.items():
        if len(flow.calls_of(module)) != count:
            raise Refusal(SkipReason.NO_FOLDABLE_NEIGHBOUR, f"{flow.module_paths[module]} also reads other inputs")
    return list(reads)


def _inexact_consumer(module: nn.Module) -> str:
    """Why folding a per-channel shift into this consumer would not be exact ('' if it is)."""
    if isinstance(module, nn.Linear):
        return ""
    if module.transposed:
        return "is a transposed conv: a shift of its input does not add a constant to its output"
    if module.padding_mode != "zeros":
        return ""
    padding = module.padding
    if padding == "same":
        padding = tuple(0 if k == 1 else 1 for k in module.kernel_size)
    if padding == "valid" or not any(padding):
        return ""
    return f"has zero padding {module.padding}: the shift would not apply to the padded zeros"


def _apply(plan: FoldPlan) -> list[nn.Module]:
    """Fold the BN into its targets; returns the targets that had no bias before."""
    given_a_bias = [module for module in plan.targets if getattr(module, "bias", None) is None]
    s, t = batchnorm_scale_shift(plan.stats.mean, plan.stats.var, plan.stats.eps, plan.stats.weight, plan.stats.bias)
    for module in plan.targets:
        weight = editable_weight(module)
        assert not isinstance(weight, str)  # checked while planning
        w = weight.tensor
        groups = getattr(module, "groups", 1)
        is_transposed = getattr(module, "transposed", False)
        if plan.into_producer:
            bias = ensure_bias(module, s.numel(), w)
            new_bias = bias.detach().double() * s.to(bias.device) + t.to(bias.device)
            scale_channels_(w, s, channel_dim=1 if is_transposed else 0, groups=groups)
        else:
            out_features = w.shape[1] * groups if is_transposed else w.shape[0]
            bias = ensure_bias(module, out_features, w)
            new_bias = bias.detach().double() + input_shift_contribution(w, t, groups=groups).to(bias.device)
            scale_channels_(w, s, channel_dim=1, groups=groups)
        weight.commit()
        with torch.no_grad():
            bias.copy_(new_bias.to(bias.dtype))
    return given_a_bias


def _add_bias_after_grouped_conv_transposes(given_a_bias: list[nn.Module], flow: Trace, report: Report) -> None:
    """A grouped ConvTranspose on CPU that got its bias from the fold adds it after the conv (eager only).

    torch's CPU kernel for many grouped ConvTranspose shapes is ~2x slower with a bias than
    without (see :class:`~normsurgeon.modules.BiasAfterConvTranspose2d`), which made a folded
    decoder slower than the original. A layer that had a bias already keeps its class: the
    original paid that price too.
    """
    for module in given_a_bias:
        replacement = BIAS_AFTER_CONV_TRANSPOSE.get(type(module))
        if replacement is None or module.groups == 1 or module.weight.device.type != "cpu":
            continue
        module.__class__ = replacement  # same parameters and state_dict keys, as torch's parametrize does
        report.notes.append(
            f"layer {flow.module_paths[module]} is now a {replacement.__name__}: it adds the bias the fold gave it after "
            "the convolution, because torch's CPU grouped ConvTranspose is ~2x slower with a bias; it exports as "
            "one op, and loading the pickled model needs normsurgeon installed (the state_dict keys are unchanged)"
        )


def _replace_with_affine(ctx: PassContext, norm: nn.Module, stats: BatchNormStats, act: nn.Module, path: str) -> Change:
    """``--to-affine``: the norm becomes a ChannelAffine (followed by its own activation, if it has one)."""
    s, t = batchnorm_scale_shift(stats.mean, stats.var, stats.eps, stats.weight, stats.bias)
    dtype = stats.mean.dtype
    affine = ChannelAffine(s.to(dtype), t.to(dtype))
    replace_module(ctx.model, norm, affine if _is_identity(act) else nn.Sequential(affine, act), ctx.parents)
    detail = "by a per-channel affine (no foldable neighbour)"
    if not _is_identity(act):
        detail = f"{norm_label(act)}: by a per-channel affine, then {_replacement_name(act)} (no foldable neighbour)"
    return Change("replaced", path, None, detail)


def _replacement_name(act: nn.Module) -> str:
    """How reports name what takes a folded norm's place: an Identity, or its activation (``its SiLU``)."""
    return "an nn.Identity" if _is_identity(act) else f"its {norm_label(act).removeprefix('BatchNorm+')}"


