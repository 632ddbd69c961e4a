"""What kind of norm a module is, and the test-time statistics of BatchNorm-like layers.

torch's BatchNorm classes are recognised by type, but only when their ``forward`` is torch's own
(a subclass that overrides it may compute anything). Hand-written frozen BatchNorms
(torchvision / detectron2 / timm ``FrozenBatchNorm2d``: buffers ``weight``, ``bias``,
``running_mean``, ``running_var``) are recognised by behaviour: the module is probed on a random
tensor and must match the BatchNorm formula.

A BatchNorm with its activation inside (timm ``BatchNormAct2d``, ``FrozenBatchNormAct2d``: the norm,
then an eval-mode drop and an activation, in one module) is split by :func:`split_batchnorm_act`,
also by behaviour: the module must compute ``act(BN(x))`` with ``act`` one of its own children (or
nothing), channel by channel and element by element.
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
_PROBE_RTOL = {torch.float64: 1e-8, torch.float32: 1e-4}  # a probe's miss, relative to its output's scale


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
    """True for torch BatchNorm layers and for modules shaped like a frozen BatchNorm (with or without
    leaf children, such as the activation of a timm ``FrozenBatchNormAct2d``)."""
    if isinstance(module, (_BatchNorm, MeanOnlyBatchNorm)):
        return True
    return _looks_like_frozen_batchnorm(module)


def has_leaf_children(module: nn.Module) -> bool:
    """True when ``module`` has children and none of them has children of its own (a norm's drop and act)."""
    children = list(module.children())
    return bool(children) and all(next(c.children(), None) is None for c in children)


def _looks_like_frozen_batchnorm(module: nn.Module) -> bool:
    if next(module.children(), None) is not None and not has_leaf_children(module):
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
    stats = _frozen_stats(module)
    if input_shape is None or not _matches_formula(module, stats, input_shape):
        raise Refusal(
            SkipReason.UNKNOWN_BEHAVIOUR,
            f"{type(module).__name__} has BatchNorm buffers but does not compute the BatchNorm formula",
        )
    return stats


def _torch_batchnorm_stats(module: _BatchNorm) -> BatchNormStats:
    if type(module).forward not in _TORCH_BATCHNORM_FORWARDS:
        raise Refusal(SkipReason.UNKNOWN_BEHAVIOUR, f"{type(module).__name__}.forward")
    return _buffer_stats(module)


def _buffer_stats(module: _BatchNorm) -> BatchNormStats:
    """The statistics a torch BatchNorm (or a subclass, whatever its forward) holds, checked for test time."""
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


def split_batchnorm_act(module: nn.Module,
                        input_shape: tuple[int, ...] | None = None) -> tuple[BatchNormStats, nn.Module]:
    """A BatchNorm-like module as its test-time statistics and the part it applies after the norm.

    For a plain BatchNorm the second part is ``nn.Identity()``. A module with BatchNorm tensors and
    leaf children (timm ``BatchNormAct2d``, ``FrozenBatchNormAct2d``: norm, eval-mode drop, activation)
    is probed on a random tensor of ``input_shape``'s rank: it must equal ``act(BN(x))``, where ``act``
    is nothing, one of its children, or all of them in order, and ``act`` must act on each element
    alone. That ``act`` (the module's own child) is returned, so a fold can fold the norm exactly as a
    plain BatchNorm and put ``act`` in the module's place. Otherwise :class:`~normsurgeon.dataflow.Refusal`.
    """
    plain = isinstance(module, _BatchNorm) and type(module).forward in _TORCH_BATCHNORM_FORWARDS
    if plain or isinstance(module, MeanOnlyBatchNorm) or next(module.children(), None) is None:
        return batchnorm_stats(module, input_shape), nn.Identity()
    if not _looks_like_frozen_batchnorm(module) and not isinstance(module, _BatchNorm):
        raise Refusal(SkipReason.NOT_A_NORM, f"{type(module).__name__} has no BatchNorm tensors")
    stats = _buffer_stats(module) if isinstance(module, _BatchNorm) else _frozen_stats(module)
    if input_shape is None or len(input_shape) < 2 or input_shape[1] != stats.num_features:
        raise Refusal(SkipReason.NOT_CALLED, f"its input shape {input_shape} does not show what "
                      f"{type(module).__name__} computes; it must be (N, C, ...) with C its number of features")
    return stats, _activation_after(module, stats, len(input_shape))


def _frozen_stats(module: nn.Module) -> BatchNormStats:
    stats = BatchNormStats(mean=module.running_mean, var=module.running_var, eps=float(getattr(module, "eps", 1e-5)),
                           weight=module.weight, bias=module.bias)
    _check_finite(stats)
    return stats


def _activation_after(module: nn.Module, stats: BatchNormStats, rank: int) -> nn.Module:
    """The part of ``module`` after its norm, found by probing (see :func:`split_batchnorm_act`)."""
    s, t = batchnorm_scale_shift(stats.mean, stats.var, stats.eps, stats.weight, stats.bias)
    view = (1, -1, *([1] * (rank - 2)))
    generator = torch.Generator().manual_seed(0)
    shape = (16, stats.num_features) if rank == 2 else (4, stats.num_features, *([3] * (rank - 2)))
    wanted = torch.randn(shape, generator=generator, dtype=torch.float64) * 3  # the norm's outputs: both signs, wide
    s, t = s.view(view), t.view(view)
    dtype = stats.mean.dtype
    x = torch.where(s != 0, (wanted - t) / torch.where(s != 0, s, 1), wanted).to(dtype)
    normed = (x.double() * s + t).to(dtype)  # what the norm makes of the input the module really gets
    children = list(module.children())
    candidates = [nn.Identity(), *children, *([nn.Sequential(*children)] if len(children) > 1 else [])]
    with torch.no_grad():
        try:
            got = module(x.clone())
        except Exception as exc:  # the probe is our input, not the user's: report, don't crash
            raise Refusal(SkipReason.UNKNOWN_BEHAVIOUR, f"{type(module).__name__} failed on a probe tensor "
                          f"({type(exc).__name__}: {exc})") from None
        for candidate in candidates:
            if _same(candidate, normed, got) and _elementwise(candidate, normed, generator):
                return candidate
    names = ", ".join(type(c).__name__ for c in children)
    raise Refusal(SkipReason.UNKNOWN_BEHAVIOUR, f"{type(module).__name__} has BatchNorm tensors but does not compute "
                  f"BatchNorm followed by nothing or by its own children ({names}), element by element")


def _same(candidate: nn.Module, x: torch.Tensor, want: torch.Tensor) -> bool:
    """True when ``candidate(x)`` equals ``want`` to ``x``'s float tolerance, relative to its scale."""
    try:
        got = candidate(x.clone())
    except Exception:
        return False
    if not isinstance(got, torch.Tensor) or not isinstance(want, torch.Tensor) or got.shape != want.shape:
        return False
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all() or not torch.isfinite(want).all():
        return False
    rtol = _PROBE_RTOL.get(x.dtype, 2e-2)
    scale = want.abs().max().item()
    return (got - want).abs().max().item() <= rtol * max(scale, 1e-3)


def _elementwise(candidate: nn.Module, x: torch.Tensor, generator: torch.Generator) -> bool:
    """True when ``candidate`` maps each element on its own (each channel may have its own function):
    shuffling every channel's elements differently, and applying it, is applying it, then shuffling."""
    channels = x.transpose(0, 1).reshape(x.shape[1], -1)
    order = torch.rand(channels.shape, generator=generator).argsort(dim=1)

    def shuffled(values: torch.Tensor) -> torch.Tensor:
        flat = values.transpose(0, 1).reshape(values.shape[1], -1).gather(1, order)
        return flat.reshape(values.transpose(0, 1).shape).transpose(0, 1)

    try:
        return _same(candidate, shuffled(x), shuffled(candidate(x.clone())))
    except Exception:
        return False


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

