"""Replace BatchNorms that directly follow weight-normed layers by mean-only BatchNorm.

Salimans & Kingma (2016) pair weight norm with *mean-only* BatchNorm: the layer's g carries
the scale, the norm only centres. Test-time BN on z = W x + b is

    BN(z)_c = s_c (z_c − μ_c) + β_c,   s = γ / sqrt(var + eps).

When the weight norm's g is per output channel (conv/linear ``dim=0``, ungrouped transposed
conv ``dim=1``) and the layer's output feeds only this BN, s moves into the layer exactly:
g' = s·g, b' = s·b, and the mean-only BN gets running_mean' = s·μ and bias β, so eval-mode
outputs do not change. Otherwise only running_mean and β are carried over and the division by
the running std is simply gone. Either way training now centres without dividing by the
batch std, so the model needs fine-tuning (or at least recalibrated means); the report says so
with the measured output difference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..check import compare_outputs
from ..dataflow import Refusal, producer_targets
from ..modules import MeanOnlyBatchNorm
from ..report import Action, Change, Report, Skip, SkipReason
from ..surgery import eval_mode, hooks_lost_by_replacing, replace_module, weight_norm_sites
from ..trace import Trace, call_model

_TORCH_BN_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}


def replace_batchnorms(model: nn.Module, flow: Trace, normed: set[nn.Module], inputs: Any, report: Report) -> None:
    """Swap BNs right after weight-normed layers for MeanOnlyBatchNorm; warn with the measured change."""
    inexact = []
    for path, bn in [(p, m) for p, m in model.named_modules() if isinstance(m, _BatchNorm)]:
        producer = _weight_normed_producer(flow, bn, normed, path, report)
        if producer is None:
            continue
        mean_only, exact = _mean_only(bn, producer)
        replace_module(model, bn, mean_only)
        how = ("γ/σ moved into the layer's g (exact in eval)" if exact
               else "running_mean and β carried over; the division by σ is gone (not exact)")
        report.changes.append(Change(Action.MEAN_ONLY, path, flow.module_paths[producer], how))
        if not exact:
            inexact.append(path)
    if report.changed(Action.MEAN_ONLY):
        _warn(model, flow, inputs, inexact, report)


def _weight_normed_producer(flow: Trace, bn: nn.Module, normed: set[nn.Module], path: str,
                            report: Report) -> nn.Module | None:
    if type(bn).forward not in _TORCH_BN_FORWARDS:
        report.skipped.append(Skip(path, SkipReason.UNKNOWN_BEHAVIOUR, f"{type(bn).__name__}.forward"))
        return None
    if not bn.track_running_stats or bn.running_mean is None:
        report.skipped.append(Skip(path, SkipReason.NO_RUNNING_STATS, "no running mean to carry over"))
        return None
    calls = flow.calls_of(bn)
    if not calls:
        report.skipped.append(Skip(path, SkipReason.NOT_CALLED, "kept as BatchNorm"))
        return None
    hooked = hooks_lost_by_replacing(bn)
    if hooked:
        report.skipped.append(Skip(path, SkipReason.HOOKED, hooked))
        return None
    try:
        (producer,) = producer_targets(flow, calls)
    except Refusal as refusal:
        report.skipped.append(Skip(path, SkipReason.NOT_AFTER_WEIGHT_NORM, refusal.detail))
        return None
    if producer not in normed and not _has_weight_norm(producer):
        name = flow.module_paths[producer]
        report.skipped.append(Skip(path, SkipReason.NOT_AFTER_WEIGHT_NORM, f"{name} is not weight-normed"))
        return None
    return producer


def _has_weight_norm(module: nn.Module) -> bool:
    return any(name == "weight" for name, _, _ in weight_norm_sites(module))


def _g_and_dim(layer: nn.Module) -> tuple[torch.Tensor, int]:
    """The layer's weight-norm g and the dim it is per (parametrization or hook API)."""
    (_, style, dim), = [s for s in weight_norm_sites(layer) if s[0] == "weight"]
    g = layer.parametrizations.weight.original0 if style == "parametrization" else layer.weight_g
    return g, dim


def _per_output_channel(layer: nn.Module, dim: int) -> bool:
    transposed = getattr(layer, "transposed", False)
    return dim == (1 if transposed else 0) and not (transposed and getattr(layer, "groups", 1) > 1)


def _mean_only(bn: _BatchNorm, layer: nn.Module) -> tuple[MeanOnlyBatchNorm, bool]:
    """The replacement for ``bn`` and whether BN's scale could be moved into ``layer`` exactly."""
    mean_only = MeanOnlyBatchNorm(bn.num_features, momentum=bn.momentum)
    mean_only.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    mean_only.train(bn.training)
    mean = bn.running_mean.detach().double()
    scale = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.detach().double()
    g, dim = _g_and_dim(layer)
    exact = _per_output_channel(layer, dim) and g.numel() == scale.numel()
    with torch.no_grad():
        if exact:
            g.copy_((g.double() * scale.view(g.shape)).to(g.dtype))
            if getattr(layer, "bias", None) is not None:
                layer.bias.copy_((layer.bias.double() * scale).to(layer.bias.dtype))
            mean = mean * scale
        mean_only.running_mean.copy_(mean.to(mean_only.running_mean.dtype))
        mean_only.num_batches_tracked.copy_(bn.num_batches_tracked)
        if bn.affine:
            mean_only.bias.copy_(bn.bias.detach())
    return mean_only, exact


def _warn(model: nn.Module, flow: Trace, inputs: Any, inexact: list[str], report: Report) -> None:
    with eval_mode(model), torch.no_grad():
        diff = compare_outputs(flow.outputs, call_model(model, inputs), label="mean-only BatchNorm vs original")
    report.facts["mean-only BN max abs diff"] = f"{diff.max_abs_diff:.3g}"
    report.facts["mean-only BN min cosine"] = f"{diff.min_cosine:.6f}"
    count = len(report.changed(Action.MEAN_ONLY))
    if inexact:
        what = (f"changed the eval-mode outputs by max abs {diff.max_abs_diff:.3g} (max rel {diff.max_rel_diff:.3g}, "
                f"cosine {diff.min_cosine:.6f}): {', '.join(inexact[:4])} no longer divide by the running std")
    else:
        what = (f"kept the eval-mode outputs (max abs diff {diff.max_abs_diff:.3g}) by moving γ/σ into g, "
                "but in training it no longer divides by the batch std")
    report.notes.append(
        f"warning: replacing {count} BatchNorm(s) by mean-only BatchNorm {what}; the model needs "
        "(re)training or fine-tuning, and at least recalibrated means (normsurgeon recalibrate)"
    )
