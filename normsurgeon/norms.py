"""What kind of norm a module is, and the test-time statistics of BatchNorm-like layers.

torch's BatchNorm classes are recognised by type, but only when their ``forward`` is torch's own
(a subclass that overrides it may compute anything). Hand-written frozen BatchNorms
(torchvision / detectron2 / timm ``FrozenBatchNorm2d``: buffers ``weight``, ``bias``,
``running_mean``, ``running_var``) are recognised by behaviour: the module is probed on a random
tensor and must match the BatchNorm formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .dataflow import Refusal
from .maths import batchnorm_scale_shift
from .modules import MeanOnlyBatchNorm
from .report import SkipReason

_TORCH_BATCHNORM_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}
_FROZEN_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class BatchNormStats:
    """Everything test-time BatchNorm computes with; it normalizes over channel dim 1."""

    mean: torch.Tensor
    var: torch.Tensor
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @property
    def num_features(self) -> int:
        return self.mean.numel()


def is_batchnorm_like(module: nn.Module) -> bool:
    """True for torch BatchNorm layers and for modules shaped like a frozen BatchNorm."""
    if isinstance(module, (_BatchNorm, MeanOnlyBatchNorm)):
        return True
    return _looks_like_frozen_batchnorm(module)


def _looks_like_frozen_batchnorm(module: nn.Module) -> bool:
    if next(module.children(), None) is not None:
        return False
    tensors = [getattr(module, name, None) for name in _FROZEN_BN_TENSORS]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in tensors):
        return False
    return len({t.numel() for t in tensors}) == 1


def batchnorm_stats(module: nn.Module, input_shape: tuple[int, ...] | None = None) -> BatchNormStats:
    """The test-time statistics of a BatchNorm-like module, or :class:`~normsurgeon.dataflow.Refusal` with why not."""
    if isinstance(module, _BatchNorm):
        return _torch_batchnorm_stats(module)
    if isinstance(module, MeanOnlyBatchNorm):
        return _mean_only_stats(module)
    stats = BatchNormStats(
        mean=module.running_mean,
        var=module.running_var,
        eps=float(getattr(module, "eps", 1e-5)),
        weight=module.weight,
        bias=module.bias,
    )
    _check_finite(stats)
    if input_shape is None or not _matches_formula(module, stats, input_shape):
        raise Refusal(
            SkipReason.UNKNOWN_BEHAVIOUR,
            f"{type(module).__name__} has BatchNorm buffers but does not compute the BatchNorm formula",
        )
    return stats


def _torch_batchnorm_stats(module: _BatchNorm) -> BatchNormStats:
    if type(module).forward not in _TORCH_BATCHNORM_FORWARDS:
        raise Refusal(SkipReason.UNKNOWN_BEHAVIOUR, f"{type(module).__name__}.forward")
    if module.training:
        raise Refusal(SkipReason.TRAINING_MODE, "call .eval() on the model first")
    if not module.track_running_stats or module.running_mean is None:
        raise Refusal(SkipReason.NO_RUNNING_STATS)
    stats = BatchNormStats(
        mean=module.running_mean,
        var=module.running_var,
        eps=float(module.eps),
        weight=module.weight if module.affine else None,
        bias=module.bias if module.affine else None,
    )
    _check_finite(stats)
    return stats


def _mean_only_stats(module: MeanOnlyBatchNorm) -> BatchNormStats:
    """Mean-only BN is BN with var = 1, eps = 0 and no gain: y = x - running_mean + bias."""
    if type(module).forward is not MeanOnlyBatchNorm.forward:
        raise Refusal(SkipReason.UNKNOWN_BEHAVIOUR, f"{type(module).__name__}.forward")
    if module.training:
        raise Refusal(SkipReason.TRAINING_MODE, "call .eval() on the model first")
    stats = BatchNormStats(mean=module.running_mean, var=torch.ones_like(module.running_mean),
                           eps=0.0, weight=None, bias=module.bias)
    _check_finite(stats)
    return stats


def _check_finite(stats: BatchNormStats) -> None:
    tensors = {name: t for name in ("mean", "var", "weight", "bias") if (t := getattr(stats, name)) is not None}
    if not torch.isfinite(torch.cat([t.detach().reshape(-1) for t in tensors.values()])).all():  # one op per BN
        culprit = next(name for name, t in tensors.items() if not torch.isfinite(t).all())
        raise Refusal(SkipReason.NONFINITE_STATS, f"non-finite values in {culprit}")
    if (stats.var < 0).any():
        raise Refusal(SkipReason.NONFINITE_STATS, "negative running_var")
    if (stats.var.double() + stats.eps == 0).any():
        raise Refusal(SkipReason.NONFINITE_STATS, "running_var + eps is 0: it divides by zero")


def never_updated(module: nn.Module, stats: BatchNormStats) -> bool:
    """True when the running stats are torch's initial values and no batch was ever tracked."""
    tracked = getattr(module, "num_batches_tracked", None)
    if tracked is None or int(tracked) != 0:
        return False
    return bool((stats.mean == 0).all() and (stats.var == 1).all())


def _matches_formula(module: nn.Module, stats: BatchNormStats, input_shape: tuple[int, ...]) -> bool:
    if len(input_shape) < 2 or input_shape[1] != stats.num_features:
        return False
    probe_shape = (2, stats.num_features, *(min(d, 3) for d in input_shape[2:]))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(probe_shape, generator=generator, dtype=torch.float64)
    s, t = batchnorm_scale_shift(stats.mean, stats.var, stats.eps, stats.weight, stats.bias)
    expected = x * s.view(1, -1, *([1] * (x.dim() - 2))) + t.view(1, -1, *([1] * (x.dim() - 2)))
    try:
        with torch.no_grad():
            got = module(x.to(stats.mean.dtype)).double()
    except Exception:
        return False
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-3, atol=1e-4)

