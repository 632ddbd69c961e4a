"""Data-dependent init of weight-normed layers (Salimans & Kingma 2016, section 3).

Per layer, in forward order, with the data run through the layers initialised before it:
t = v·x/‖v‖ (the layer's output with g = 1, b = 0), then g = 1/σ(t) and b = −μ(t)/σ(t) per output
channel, so the layer's pre-activations on the batch have zero mean and unit variance. Where one g
serves several output channels (a grouped transposed conv, ``dim=1``) σ is pooled over them.
A layer without bias only gets g; a constant channel (σ = 0) keeps g = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..io.data import Batch
from ..report import Action, Change, Report, Skip, SkipReason
from ..surgery import eval_mode
from ..trace import call_model


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer being initialised has run."""


def data_dependent_init(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list[Batch], report: Report) -> None:
    """Salimans & Kingma's init, layer by layer in forward order, through the already-initialised ones."""
    with eval_mode(model), torch.no_grad():
        for path, module in layers:
            stats = _preactivation_stats(model, module, batches)
            if stats is None:
                report.skipped.append(Skip(path, SkipReason.NOT_CALLED, "not reached by the init data; init skipped"))
                continue
            report.changes.append(Change(Action.INITIALISED, path, None, _set_init(module, *stats)))
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) or report.changed(Action.MEAN_ONLY):
        report.notes.append("the data-dependent init changed the activations the BatchNorm layers see: "
                            "recalibrate their statistics (normsurgeon recalibrate) before evaluating")
    report.notes.append("data-dependent init: the model computes something new by design (train it from here)")


@dataclass
class _Moments:
    """Running per-channel sums (float64) of a layer's outputs."""

    count: int = 0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None

    def add(self, t: torch.Tensor) -> None:
        """``t``: (channels, values) in float64."""
        self.count += t.shape[1]
        self.total = t.sum(1) if self.total is None else self.total + t.sum(1)
        self.squares = (t * t).sum(1) if self.squares is None else self.squares + (t * t).sum(1)

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        return mean, (self.squares / self.count - mean * mean).clamp_min(0.0)


def _preactivation_stats(model: nn.Module, module: nn.Module,
                         batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Per-output-channel (mean, var, count) of v·x/‖v‖ on the batches, or None if never called."""
    g = module.parametrizations.weight.original0
    bias = getattr(module, "bias", None)
    saved_g, saved_b = g.detach().clone(), (bias.detach().clone() if bias is not None else None)
    g.fill_(1.0)
    if bias is not None:
        bias.zero_()
    moments = _Moments()
    channel_dim = -1 if isinstance(module, nn.Linear) else 1

    def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
        moments.add(output.detach().double().movedim(channel_dim, 0).flatten(1))
        raise _Stop  # the rest of the model is not needed for this layer

    handle = module.register_forward_hook(hook)
    try:
        for batch in batches:
            try:
                call_model(model, batch)
            except _Stop:
                pass
    finally:
        handle.remove()
        g.copy_(saved_g)
        if bias is not None:
            bias.copy_(saved_b)
    return (*moments.mean_var(), moments.count) if moments.count else None


def _set_init(module: nn.Module, mean: torch.Tensor, var: torch.Tensor, count: int) -> str:
    """g = 1/σ (pooled over channels sharing a g), b = −g·μ; returns the Change detail."""
    g = module.parametrizations.weight.original0
    shared = g.numel() != mean.numel()  # grouped transposed conv: g per index within a group
    groups = mean.numel() // g.numel()
    pooled = var.view(groups, -1).mean(0) if shared else var
    std = pooled.sqrt()
    dead = std <= 1e-12 + 1e-6 * std.max()
    scale = torch.where(dead, torch.ones_like(std), 1.0 / std)
    g.copy_(scale.view(g.shape).to(g.dtype))
    per_channel = scale.repeat(groups) if shared else scale
    detail = (f"g=1/std, b=-mean/std of v·x/‖v‖ over {count} values per channel "
              f"(std was {var.sqrt().min().item():.3g}..{var.sqrt().max().item():.3g})")
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias.copy_((-per_channel * mean).to(bias.dtype))
    else:
        detail += "; no bias, so only g was set (the mean is not zeroed)"
    if shared:
        detail += f"; g shared by {groups} channels (grouped transposed conv): std pooled over them"
    if dead.any():
        detail += f"; {int(dead.sum())} constant channel(s) kept g=1"
    return detail
