"""The module-for-module norm conversions: which exist, which are exact, and how to build the new layer.

Exact (the numerical check must pass):

* a hand-written norm -> torch's own layer of the same kind (Llama/T5 RMSNorm -> ``nn.RMSNorm``,
  an ``F.layer_norm`` module -> ``nn.LayerNorm``, a channels-first LayerNorm ->
  :class:`~normsurgeon.modules.ChannelsFirstLayerNorm`, a frozen BatchNorm ->
  :class:`~normsurgeon.modules.FrozenBatchNorm`), keeping eps, weight, bias, dtype and device;
* BatchNorm <-> FrozenBatchNorm <-> SyncBatchNorm (test-time behaviour; BatchNorm1d/2d/3d chosen from
  the input rank seen in the trace);
* InstanceNorm <-> GroupNorm(C groups): equal when the InstanceNorm uses each sample's statistics
  (``track_running_stats=False``); a GroupNorm with fewer groups than channels is not an InstanceNorm.

Approximate (for fine-tuning; ``--approximate``): BatchNorm -> GroupNorm / LayerNorm (affine copied),
RMSNorm <-> LayerNorm where the input is not centred, InstanceNorm with running stats -> GroupNorm.
LayerNorm -> RMSNorm is exact in pre-norm transformers: see :mod:`.convert_centring`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..dataflow import Refusal
from ..modules import ChannelsFirstLayerNorm, FrozenBatchNorm
from ..recognize import BATCHNORM_FAMILY, NormInfo, NormKind
from ..report import SkipReason

GN_MAX_GROUPS = 32  # Wu & He 2018: 32 groups; fewer when C has no such divisor


@dataclass(frozen=True)
class Rule:
    """Convert a ``source`` norm to ``target`` by building a replacement module.

    ``inexact`` says why the result would not be exact for this norm ('' when it is); ``build``
    raises :class:`~normsurgeon.dataflow.Refusal` when the conversion does not apply at all.
    """

    source: NormKind
    target: NormKind
    build: Callable[[NormInfo], nn.Module]
    inexact: Callable[[NormInfo], str]
    native_only: bool = False  # the rule turns a hand-written norm into torch's own layer of its kind


def _exact(info: NormInfo) -> str:
    return ""


def _factory(info: NormInfo) -> dict:
    tensor = info.weight if info.weight is not None else info.bias
    if tensor is None:
        tensor = next((t for t in (*info.module.parameters(), *info.module.buffers()) if t.is_floating_point()), None)
    if tensor is None:
        return {}
    return {"dtype": tensor.dtype, "device": tensor.device}


def _copy(target: torch.Tensor | None, source: torch.Tensor | None, fill: float | None = None) -> None:
    if target is None:
        return
    with torch.no_grad():
        if source is not None:
            target.copy_(source.detach().reshape(target.shape).to(target.dtype))
        elif fill is not None:
            target.fill_(fill)


def _rank(info: NormInfo) -> int:
    if not info.input_shape:
        raise Refusal(SkipReason.NOT_CALLED, "its input rank is unknown")
    return len(info.input_shape)


# ------------------------------------------------------------------------------- native forms


def _native_rmsnorm(info: NormInfo) -> nn.Module:
    if info.bias is not None:
        raise Refusal(SkipReason.NO_CONVERSION, "it adds a bias, which nn.RMSNorm has not")
    new = nn.RMSNorm(info.normalized_shape, eps=info.eps, elementwise_affine=info.weight is not None, **_factory(info))
    _copy(new.weight, info.scale())  # weight + scale_offset: Gemma's RMSNorm scales by 1 + w
    return new


def _native_layernorm(info: NormInfo) -> nn.Module:
    affine = info.weight is not None or info.bias is not None
    new = nn.LayerNorm(info.normalized_shape, eps=info.eps, elementwise_affine=affine,
                       bias=info.bias is not None, **_factory(info))
    _copy(new.weight, info.scale(), 1.0)  # weight + scale_offset (LayerNorm1P: 1 + w)
    _copy(new.bias, info.bias)
    return new


def _native_channels_first(info: NormInfo) -> nn.Module:
    affine = info.weight is not None or info.bias is not None
    new = ChannelsFirstLayerNorm(info.num_features, eps=info.eps, elementwise_affine=affine,
                                 bias=info.bias is not None, **_factory(info))
    _copy(new.weight, info.weight, 1.0)
    _copy(new.bias, info.bias)
    return new


def _native_groupnorm(info: NormInfo) -> nn.Module:
    affine = info.weight is not None or info.bias is not None
    new = nn.GroupNorm(info.groups, info.num_features, eps=info.eps, affine=affine, **_factory(info))
    _copy(new.weight, info.weight, 1.0)
    _copy(new.bias, info.bias, 0.0)
    return new


# ------------------------------------------------------------------------------- BatchNorm family


def _stats(info: NormInfo) -> tuple[torch.Tensor, torch.Tensor]:
    module = info.module
    if getattr(module, "training", False) and info.kind is not NormKind.FROZEN_BATCHNORM:
        raise Refusal(SkipReason.TRAINING_MODE, "call .eval() on the model first")
    mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    if mean is None or var is None or not getattr(module, "track_running_stats", True):
        raise Refusal(SkipReason.NO_RUNNING_STATS, "")
    return mean, var


def _to_frozen(info: NormInfo) -> nn.Module:
    mean, var = _stats(info)
    new = FrozenBatchNorm(info.num_features, eps=info.eps, dtype=mean.dtype, device=mean.device)
    _copy(new.running_mean, mean)
    _copy(new.running_var, var)
    _copy(new.weight, info.weight, 1.0)
    _copy(new.bias, info.bias, 0.0)
    return new


def _trainable_batchnorm(info: NormInfo, cls: type[nn.modules.batchnorm._BatchNorm]) -> nn.Module:
    mean, var = _stats(info)
    source = info.module
    momentum = getattr(source, "momentum", 0.1) if isinstance(source, nn.modules.batchnorm._BatchNorm) else 0.1
    affine = info.weight is not None or info.kind is NormKind.FROZEN_BATCHNORM
    new = cls(info.num_features, eps=info.eps, momentum=momentum, affine=affine, dtype=mean.dtype, device=mean.device)
    _copy(new.running_mean, mean)
    _copy(new.running_var, var)
    _copy(new.weight, info.weight, 1.0)
    _copy(new.bias, info.bias, 0.0)
    tracked = getattr(source, "num_batches_tracked", None)
    if isinstance(tracked, torch.Tensor):
        new.num_batches_tracked.copy_(tracked)
    if info.kind is NormKind.FROZEN_BATCHNORM:  # its tensors were buffers: keep them out of training
        new.weight.requires_grad_(False)
        new.bias.requires_grad_(False)
    return new


def _to_batchnorm(info: NormInfo) -> nn.Module:
    classes = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    rank = _rank(info)
    if rank not in classes:
        raise Refusal(SkipReason.NO_CONVERSION, f"no torch BatchNorm takes rank-{rank} inputs")
    return _trainable_batchnorm(info, classes[rank])


def _to_sync(info: NormInfo) -> nn.Module:
    return _trainable_batchnorm(info, nn.SyncBatchNorm)


# ------------------------------------------------------------------------------- InstanceNorm / GroupNorm


def _instance_inexact(info: NormInfo) -> str:
    if getattr(info.module, "track_running_stats", False):
        return ("it tracks running statistics and uses them in eval mode; GroupNorm(C, C) uses each "
                "sample's own statistics")
    return ""


def _instance_to_group(info: NormInfo) -> nn.Module:
    expected = getattr(info.module, "_get_no_batch_dim", lambda: None)()
    if expected is not None and len(info.input_shape) == expected:
        raise Refusal(SkipReason.NO_CONVERSION, "it runs on unbatched input, which GroupNorm reads as (N, C)")
    new = nn.GroupNorm(info.num_features, info.num_features, eps=info.eps, affine=info.weight is not None,
                       **_factory(info))
    _copy(new.weight, info.weight)
    _copy(new.bias, info.bias)
    return new


def _group_to_instance(info: NormInfo) -> nn.Module:
    if info.groups != info.num_features:
        raise Refusal(SkipReason.NO_CONVERSION, f"it has {info.groups} groups for {info.num_features} "
                             "channels; only GroupNorm with one channel per group is an InstanceNorm")
    classes = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}
    rank = _rank(info)
    if rank not in classes:
        raise Refusal(SkipReason.NO_CONVERSION, f"no torch InstanceNorm takes rank-{rank} (N, C, ...) inputs")
    affine = info.weight is not None or info.bias is not None
    new = classes[rank](info.num_features, eps=info.eps, affine=affine, track_running_stats=False, **_factory(info))
    _copy(new.weight, info.weight, 1.0)
    _copy(new.bias, info.bias, 0.0)
    return new


# ------------------------------------------------------------------------------- approximate


def gn_groups(channels: int) -> int:
    """The largest divisor of ``channels`` that is at most 32 (GroupNorm's usual group count)."""
    return max(g for g in range(1, min(GN_MAX_GROUPS, channels) + 1) if channels % g == 0)


def _batchnorm_inexact(info: NormInfo) -> str:
    return ("it normalizes with dataset statistics, the new layer with each sample's own (which does not "
            "depend on the batch size: better than BatchNorm below ~32 samples per batch); the model needs fine-tuning")


def _batchnorm_to_group(info: NormInfo) -> nn.Module:
    _rank(info)
    new = nn.GroupNorm(gn_groups(info.num_features), info.num_features, eps=info.eps, **_factory(info))
    _copy(new.weight, info.weight, 1.0)
    _copy(new.bias, info.bias, 0.0)
    return new


def _batchnorm_to_layer(info: NormInfo) -> nn.Module:
    rank = _rank(info)
    factory = _factory(info)
    new = nn.LayerNorm(info.num_features, eps=info.eps, **factory) if rank == 2 else \
        ChannelsFirstLayerNorm(info.num_features, eps=info.eps, **factory)
    _copy(new.weight, info.weight, 1.0)
    _copy(new.bias, info.bias, 0.0)
    return new


def _rms_to_layer(info: NormInfo) -> nn.Module:
    new = nn.LayerNorm(info.normalized_shape, eps=info.eps, elementwise_affine=info.weight is not None or info.bias is not None,
                       bias=info.bias is not None, **_factory(info))
    _copy(new.weight, info.scale(), 1.0)  # weight + scale_offset, as _native_layernorm
    _copy(new.bias, info.bias)
    return new


def _rms_inexact(info: NormInfo) -> str:
    return "LayerNorm subtracts each row's mean, RMSNorm does not: they agree only on centred inputs"


def _layer_to_rms(info: NormInfo) -> nn.Module:
    if len(info.normalized_shape) != 1:
        raise Refusal(SkipReason.NO_CONVERSION, "nn.RMSNorm here would normalize several dims")
    new = nn.RMSNorm(info.normalized_shape, eps=info.eps, elementwise_affine=info.weight is not None, **_factory(info))
    _copy(new.weight, info.scale())  # weight + scale_offset, as _native_rmsnorm
    return new


def _layer_inexact(info: NormInfo) -> str:
    dropped = " and drops its bias" if info.bias is not None and bool(info.bias.detach().any()) else ""
    return f"its input is not centred, so RMSNorm differs from LayerNorm{dropped}"


# ------------------------------------------------------------------------------- the table


def _batchnorm_rules() -> list[Rule]:
    rules = []
    targets = {NormKind.FROZEN_BATCHNORM: _to_frozen, NormKind.BATCHNORM: _to_batchnorm, NormKind.SYNC_BATCHNORM: _to_sync}
    for source in BATCHNORM_FAMILY:
        for target, build in targets.items():
            if source is not target:
                rules.append(Rule(source, target, build, _exact))
        rules.append(Rule(source, NormKind.GROUPNORM, _batchnorm_to_group, _batchnorm_inexact))
        rules.append(Rule(source, NormKind.LAYERNORM, _batchnorm_to_layer, _batchnorm_inexact))
    return rules


RULES: tuple[Rule, ...] = (
    Rule(NormKind.RMSNORM, NormKind.RMSNORM, _native_rmsnorm, _exact, native_only=True),
    Rule(NormKind.LAYERNORM, NormKind.LAYERNORM, _native_layernorm, _exact, native_only=True),
    Rule(NormKind.LAYERNORM_CHANNELS_FIRST, NormKind.LAYERNORM_CHANNELS_FIRST, _native_channels_first, _exact, native_only=True),
    Rule(NormKind.LAYERNORM_CHANNELS_FIRST, NormKind.LAYERNORM, _native_channels_first, _exact, native_only=True),
    Rule(NormKind.GROUPNORM, NormKind.GROUPNORM, _native_groupnorm, _exact, native_only=True),
    Rule(NormKind.FROZEN_BATCHNORM, NormKind.FROZEN_BATCHNORM, _to_frozen, _exact, native_only=True),
    *_batchnorm_rules(),
    Rule(NormKind.INSTANCENORM, NormKind.GROUPNORM, _instance_to_group, _instance_inexact),
    Rule(NormKind.GROUPNORM, NormKind.INSTANCENORM, _group_to_instance, _exact),
    Rule(NormKind.RMSNORM, NormKind.LAYERNORM, _rms_to_layer, _rms_inexact),
    Rule(NormKind.LAYERNORM, NormKind.RMSNORM, _layer_to_rms, _layer_inexact),
)


def find_rule(info: NormInfo, target: NormKind | None) -> Rule | None:
    """The rule converting ``info`` to ``target`` (None: to torch's own layer of its kind)."""
    if info.activation is not None:  # a BatchNorm with its activation inside: the new layer would drop it
        return None
    for rule in RULES:
        if rule.source is not info.kind or (target is not None and rule.target is not target):
            continue
        if rule.native_only and info.native:
            continue  # already torch's own layer
        if target is None and not rule.native_only:
            continue
        return rule
    return None


def described(module: nn.Module) -> str:
    """``nn.RMSNorm`` for torch classes, the class name for others."""
    cls = type(module)
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.") else cls.__name__
